"""UsageAggregate.sent_gpu_seconds: what each period's meter event carries.

Until now a period with zero or negative net usage sent nothing and the others sent their
usage, so that is what the existing rows sent.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("billing", "0003_ledger_created_by_protect")]

    operations = [
        migrations.AddField(
            model_name="usageaggregate",
            name="sent_gpu_seconds",
            field=models.BigIntegerField(
                default=0, help_text="The meter event's value; 0: no event for this period."
            ),
        ),
        migrations.RunSQL(
            "UPDATE billing_usageaggregate SET sent_gpu_seconds = GREATEST(gpu_seconds, 0)",
            migrations.RunSQL.noop,
        ),
    ]
