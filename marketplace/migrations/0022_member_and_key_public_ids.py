"""Memberships and API keys get random public ids (mem_…, key_…) like every other object,
instead of ids made from their primary keys. Existing rows get one each; the old form still
finds them until the next release (marketplace.selectors.organizations._by_public_id)."""

from django.db import migrations, models

import marketplace.ids


def fill(apps, schema_editor):
    for model, new_id in (("Membership", marketplace.ids.member_id),
                          ("ApiKey", marketplace.ids.api_key_id)):
        rows = apps.get_model("marketplace", model).objects.filter(public_id__isnull=True)
        for row in rows.only("pk").iterator():
            type(row).objects.filter(pk=row.pk).update(public_id=new_id())


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0021_allocation_drop_gpu_model"),
    ]

    operations = [
        migrations.AddField(
            model_name="membership",
            name="public_id",
            field=models.CharField(max_length=32, null=True, editable=False),
        ),
        migrations.AddField(
            model_name="apikey",
            name="public_id",
            field=models.CharField(max_length=32, null=True, editable=False),
        ),
        migrations.RunPython(fill, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="membership",
            name="public_id",
            field=models.CharField(
                default=marketplace.ids.member_id, editable=False, max_length=32, unique=True
            ),
        ),
        migrations.AlterField(
            model_name="apikey",
            name="public_id",
            field=models.CharField(
                default=marketplace.ids.api_key_id, editable=False, max_length=32, unique=True
            ),
        ),
    ]
