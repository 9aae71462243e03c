from django.db import migrations, models

import marketplace.ids

# As billing 0011 did for the ledger: a volatile default, so the table rewrite gives every
# existing top-up its own id; the ORM sends its own (marketplace.ids.top_up_id).
FORWARD = """
ALTER TABLE billing_topup ADD COLUMN public_id varchar(40) NOT NULL
    DEFAULT ('tu_' || replace(gen_random_uuid()::text, '-', '')) UNIQUE;
CREATE INDEX billing_topup_public_id_like ON billing_topup (public_id varchar_pattern_ops);
"""
BACKWARD = "ALTER TABLE billing_topup DROP COLUMN public_id;"


class Migration(migrations.Migration):
    dependencies = [("billing", "0011_ledger_public_id")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(FORWARD, BACKWARD)],
            state_operations=[
                migrations.AddField(
                    model_name="topup",
                    name="public_id",
                    field=models.CharField(
                        default=marketplace.ids.top_up_id,
                        editable=False,
                        max_length=40,
                        unique=True,
                    ),
                ),
            ],
        ),
    ]
