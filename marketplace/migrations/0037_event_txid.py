"""Each event's writing transaction id (xid8), for the commit-safe forward poll of the events API.

Existing rows get '0': a constant default is stored once in the catalogue (no table rewrite),
and 0 sorts them before every event written from now on (in id order among themselves, which
is the order they were inserted in), and below any snapshot's xmin, so they are settled at
once. New rows get pg_current_xact_id(): the default, and a BEFORE INSERT trigger that sets it
whatever the INSERT says, because the ORM, config.db.model_insert and the transition
service's statement all name every column (NULL for this one). A row restored from a dump by
COPY fires the trigger too, so it never carries another cluster's transaction ids.
"""

from django.db import migrations

import marketplace.models.events

FORWARD = """
ALTER TABLE marketplace_event ADD COLUMN txid xid8 NOT NULL DEFAULT '0';
ALTER TABLE marketplace_event ALTER COLUMN txid SET DEFAULT pg_current_xact_id();

CREATE OR REPLACE FUNCTION marketplace_event_set_txid() RETURNS trigger AS $$
BEGIN
    NEW.txid := pg_current_xact_id();
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER marketplace_event_txid
    BEFORE INSERT ON marketplace_event
    FOR EACH ROW EXECUTE FUNCTION marketplace_event_set_txid();
"""

BACKWARD = """
DROP TRIGGER IF EXISTS marketplace_event_txid ON marketplace_event;
DROP FUNCTION IF EXISTS marketplace_event_set_txid();
ALTER TABLE marketplace_event DROP COLUMN txid;
"""


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0036_listing_returned_event"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(FORWARD, BACKWARD)],
            state_operations=[
                migrations.AddField(
                    model_name="event",
                    name="txid",
                    field=marketplace.models.events.TransactionIdField(
                        editable=False,
                        help_text="The id of the transaction that wrote the event (xid8).",
                    ),
                ),
            ],
        ),
    ]
