"""billing_openholdsdelta: an organisation's open holds as a sum of changes, kept by triggers.

Each statement that inserts, updates or deletes holds adds, per organisation it touched, what
it changed of the open holds' sum (amount − charged of holds with status open): one insert of
a row per organisation, ordered, taking no lock anyone else waits for. The table is filled
with each organisation's open holds in this migration's transaction, after the triggers exist
(creating them holds writers of holds back until the commit), so the sums start exact.
"""

import django.db.models.deletion
from django.db import migrations, models

# One function per event: a statement trigger sees only the transition tables it declares.
_DELTA_FUNCTION = """
CREATE FUNCTION billing_open_holds_{event}() RETURNS trigger AS $$
BEGIN
    INSERT INTO billing_openholdsdelta (organization_id, amount_minor)
    SELECT organization_id, sum(delta) FROM ({changes}) changes
    GROUP BY organization_id HAVING sum(delta) <> 0 ORDER BY organization_id;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER billing_hold_open_{event}
    AFTER {event_upper} ON billing_hold REFERENCING {tables}
    FOR EACH STATEMENT EXECUTE FUNCTION billing_open_holds_{event}();
"""
_ADDED = (
    "SELECT organization_id, amount_minor - charged_minor AS delta FROM added WHERE status = 'open'"
)
_REMOVED = (
    "SELECT organization_id, charged_minor - amount_minor AS delta FROM removed "
    "WHERE status = 'open'"
)

FORWARD_SQL = (
    _DELTA_FUNCTION.format(
        event="inserted", event_upper="INSERT", tables="NEW TABLE AS added", changes=_ADDED
    )
    + _DELTA_FUNCTION.format(
        event="updated",
        event_upper="UPDATE",
        tables="OLD TABLE AS removed NEW TABLE AS added",
        changes=f"{_ADDED} UNION ALL {_REMOVED}",
    )
    + _DELTA_FUNCTION.format(
        event="deleted", event_upper="DELETE", tables="OLD TABLE AS removed", changes=_REMOVED
    )
    + """
INSERT INTO billing_openholdsdelta (organization_id, amount_minor)
SELECT organization_id, sum(amount_minor - charged_minor) FROM billing_hold
WHERE status = 'open' GROUP BY organization_id HAVING sum(amount_minor - charged_minor) <> 0;
"""
)

REVERSE_SQL = """
DROP TRIGGER billing_hold_open_inserted ON billing_hold;
DROP TRIGGER billing_hold_open_updated ON billing_hold;
DROP TRIGGER billing_hold_open_deleted ON billing_hold;
DROP FUNCTION billing_open_holds_inserted();
DROP FUNCTION billing_open_holds_updated();
DROP FUNCTION billing_open_holds_deleted();
"""


class Migration(migrations.Migration):
    dependencies = [
        ("billing", "0008_resale_ledger_kinds"),
        ("marketplace", "0031_listing_expired"),
    ]

    operations = [
        migrations.CreateModel(
            name="OpenHoldsDelta",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("amount_minor", models.BigIntegerField()),
                (
                    "organization",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="marketplace.organization",
                    ),
                ),
            ],
        ),
        migrations.RunSQL(FORWARD_SQL, REVERSE_SQL),
    ]
