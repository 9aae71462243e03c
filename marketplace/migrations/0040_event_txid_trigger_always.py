"""The txid trigger (0037) fires always: also when a row is applied by logical replication.

The apply worker of a logical subscriber (and any session that sets session_replication_role,
as some bulk loaders do) runs as `replica`, under which a trigger that is merely ENABLED does
not fire: the row would keep the publisher's transaction id, a number from another
cluster's counter that means nothing against this server's snapshots, so the subscriber's
forward feed would order and hold back its events wrongly. ENABLE ALWAYS makes every insert
take its own writing transaction's id, wherever it comes from. Only this trigger: the others
(allocations' `busy`, the balances, the open holds' sums) keep derived rows that a
subscriber receives too, and must not run twice.

ALTER TABLE … ENABLE ALWAYS TRIGGER takes a SHARE ROW EXCLUSIVE lock for an instant (a
catalogue change, no scan or rewrite).
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0039_pending_signup"),
    ]

    operations = [
        migrations.RunSQL(
            "ALTER TABLE marketplace_event ENABLE ALWAYS TRIGGER marketplace_event_txid;",
            "ALTER TABLE marketplace_event ENABLE TRIGGER marketplace_event_txid;",
        ),
    ]
