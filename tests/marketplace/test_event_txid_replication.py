"""An event's txid (the forward feed's position) is the transaction that wrote it on this
server, also when the row was applied by logical replication: the apply worker runs with
session_replication_role = replica, under which a trigger that is merely ENABLED does not
fire, so the trigger is ENABLE ALWAYS (marketplace migration 0040)."""

import pytest
from django.db import connection, transaction

from marketplace.models import Event
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def org():
    return OrganizationFactory()


def _apply_as_replica(org) -> tuple[int, int]:
    """Insert an event as a logical replication apply worker would (its session in replica
    role, the row carrying the publisher's txid); (this transaction's id, the row's txid)."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute("SET LOCAL session_replication_role = replica")
        cur.execute("SELECT pg_current_xact_id()::text")
        (current,) = cur.fetchone()
        cur.execute(
            "INSERT INTO marketplace_event (public_id, organization_id, type, object_type,"
            " object_id, data, created_at, txid) VALUES ('evt_applied', %s, 'api_key.created',"
            " 'api_key', 'k', '{}', now(), '7') RETURNING txid::text",
            [org.pk],
        )
        (txid,) = cur.fetchone()
        cur.execute("SET LOCAL session_replication_role = origin")
    return int(current), int(txid)


def test_an_event_applied_by_logical_replication_gets_the_applying_transactions_id(org):
    current, txid = _apply_as_replica(org)

    assert txid == current != 7
    assert Event.objects.get(public_id="evt_applied").txid == current


def test_the_txid_trigger_fires_always_and_only_the_txid_trigger_does(org):
    with connection.cursor() as cur:
        cur.execute(
            "SELECT tgname, tgenabled FROM pg_trigger"
            " WHERE tgrelid = 'marketplace_event'::regclass AND NOT tgisinternal"
        )
        assert dict(cur.fetchall()) == {"marketplace_event_txid": "A"}
