"""billing_openholdsdelta: a statement adds its change to a row of the organisation's instead
of inserting one, when it can do so without waiting.

Billing 0009 inserted a row per statement and organisation, folded only by the metering run
(and, past 32, by the funding gate), so an organisation booking many times a minute left a row
and an index entry per booking, read by every booking's gate until folded and vacuumed. Now a
statement locks the organisation's first delta row that no other transaction holds (SKIP
LOCKED: it never waits) and adds its change to it, an update that leaves the indexes alone
(`fillfactor` leaves room on the page for it); it inserts a row only when every row of the
organisation is held by another transaction (a metering run charging holds, a booking not yet
committed), which the folds merge later. Inserts only, as before, when the organisation has
no row yet.
"""

from django.db import migrations

# The same function names and transition tables as billing 0009; only the bodies change.
_FUNCTION = """
CREATE OR REPLACE FUNCTION billing_open_holds_{event}() RETURNS trigger AS $$
BEGIN
    {body}
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
"""
_IN_PLACE = """
    WITH changed AS (
        SELECT organization_id, sum(delta) AS delta FROM ({changes}) changes
        GROUP BY organization_id HAVING sum(delta) <> 0
    ), target AS (
        SELECT c.organization_id, c.delta, (
            SELECT d.id FROM billing_openholdsdelta d
            WHERE d.organization_id = c.organization_id
            ORDER BY d.id LIMIT 1 FOR UPDATE SKIP LOCKED) AS id
        FROM changed c
    ), added AS (
        UPDATE billing_openholdsdelta d SET amount_minor = d.amount_minor + t.delta
        FROM target t WHERE d.id = t.id
    )
    INSERT INTO billing_openholdsdelta (organization_id, amount_minor)
    SELECT organization_id, delta FROM target WHERE id IS NULL ORDER BY organization_id;"""
_INSERTED = """
    INSERT INTO billing_openholdsdelta (organization_id, amount_minor)
    SELECT organization_id, sum(delta) FROM ({changes}) changes
    GROUP BY organization_id HAVING sum(delta) <> 0 ORDER BY organization_id;"""

_ADDED = (
    "SELECT organization_id, amount_minor - charged_minor AS delta FROM added WHERE status = 'open'"
)
_REMOVED = (
    "SELECT organization_id, charged_minor - amount_minor AS delta FROM removed "
    "WHERE status = 'open'"
)
_CHANGES = {
    "inserted": _ADDED,
    "updated": f"{_ADDED} UNION ALL {_REMOVED}",
    "deleted": _REMOVED,
}


def _functions(body: str) -> str:
    return "".join(
        _FUNCTION.format(event=event, body=body.format(changes=changes))
        for event, changes in _CHANGES.items()
    )


FORWARD_SQL = _functions(_IN_PLACE) + "ALTER TABLE billing_openholdsdelta SET (fillfactor = 50);\n"
REVERSE_SQL = _functions(_INSERTED) + "ALTER TABLE billing_openholdsdelta RESET (fillfactor);\n"


class Migration(migrations.Migration):
    dependencies = [("billing", "0009_open_holds_delta")]

    operations = [migrations.RunSQL(FORWARD_SQL, REVERSE_SQL)]
