from django.db import migrations, models

import marketplace.ids

# Added with a volatile default, so PostgreSQL rewrites the table and gives every existing line
# its own id (a rewrite fires no row trigger, so the append-only ledger needs no exception),
# and keeps the default for the lines the metering run inserts in SQL. The ORM sends its own
# (marketplace.ids.ledger_entry_id).
FORWARD = """
ALTER TABLE billing_ledgerentry ADD COLUMN public_id varchar(40) NOT NULL
    DEFAULT ('led_' || replace(gen_random_uuid()::text, '-', '')) UNIQUE;
CREATE INDEX billing_ledgerentry_public_id_like
    ON billing_ledgerentry (public_id varchar_pattern_ops);
"""
BACKWARD = "ALTER TABLE billing_ledgerentry DROP COLUMN public_id;"


class Migration(migrations.Migration):
    dependencies = [("billing", "0010_open_holds_delta_in_place")]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(FORWARD, BACKWARD)],
            state_operations=[
                migrations.AddField(
                    model_name="ledgerentry",
                    name="public_id",
                    field=models.CharField(
                        default=marketplace.ids.ledger_entry_id,
                        editable=False,
                        max_length=40,
                        unique=True,
                    ),
                ),
            ],
        ),
    ]
