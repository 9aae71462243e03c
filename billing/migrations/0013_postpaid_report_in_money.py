# Postpaid reporting in money (billing.services.postpaid): an hour's lines may be reported in
# more than one row (a line that lands late adds the difference), so the one-row-per-hour
# constraint gives way to a plain index on the same columns. No row changes.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("billing", "0012_top_up_public_id")]

    operations = [
        migrations.RemoveConstraint(
            model_name="usageaggregate",
            name="usage_aggregate_once_per_period",
        ),
        migrations.AlterField(
            model_name="usageaggregate",
            name="amount_minor",
            field=models.BigIntegerField(help_text="Owed (+) or given back (−), minor units."),
        ),
        migrations.AlterField(
            model_name="usageaggregate",
            name="gpu_seconds",
            field=models.BigIntegerField(help_text="The usage lines' GPU-seconds (for reading)."),
        ),
        migrations.AlterField(
            model_name="usageaggregate",
            name="sent_gpu_seconds",
            field=models.BigIntegerField(
                default=0,
                help_text="Before billing 0013 only: the GPU-seconds a meter event carried.",
            ),
        ),
        migrations.AddIndex(
            model_name="usageaggregate",
            index=models.Index(
                fields=["organization", "period_start"], name="usage_aggregate_org_period_idx"
            ),
        ),
    ]
