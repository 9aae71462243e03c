"""A reserved term's refund for time it did not get is a ledger kind of its own (term_refund),
apart from a staff goodwill credit (credit): an accountant tells them apart in the statement
(page, CSV, API), the ledger (API, CSV) and the staff dashboard. Billing 0016 gave the lines
written before it the new kind without moving any balance."""

import csv
import importlib
import io
from decimal import Decimal

import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.selectors import balance_minor
from billing.services.credits import cancellation_settle, credit_issue
from marketplace.models import ReservationStatus, Role, Tier
from tests.billing.conftest import make_reservation
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

migration = importlib.import_module("billing.migrations.0016_ledger_term_refund_kind")


@pytest.fixture
def owner_client(org):
    client = HttpsClient()
    client.force_login(
        MembershipFactory(organization=org, role=Role.MEMBER, user__password="!").user
    )
    return client


def _csv_rows(response) -> list[list[str]]:
    return list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))


def test_a_cancellation_refund_and_a_goodwill_credit_are_apart_in_every_view(org, owner_client):
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, hours=168,
                            status=ReservationStatus.CANCELLED, total=Decimal("500.00"))  # fmt: skip
    term.cancellation = {"refund_amount": "250.00", "rule": "50 % refund."}
    term.save(update_fields=["cancellation"])
    refund = cancellation_settle(reservation_id=term.pk)
    goodwill = credit_issue(organization=org, amount=Decimal("10.00"), reason="Slow support",
                            created_by=None, actor="staff")  # fmt: skip
    month = timezone.now().strftime("%Y-%m")

    assert (refund.kind, goodwill.kind) == (LedgerKind.TERM_REFUND, LedgerKind.CREDIT)
    assert balance_minor(organization=org) == -50000 + 25000 + 1000
    statement = owner_client.get(f"/api/v1/billing/statements/{month}").json()
    assert statement["totals"] == {
        "reserved_charge": "-500.00", "term_refund": "250.00", "credit": "10.00"
    }  # fmt: skip
    # What the term cost net of its refund; the goodwill credit does not lower it.
    assert statement["usage"] == [
        {"reservation": term.public_id, "gpu_seconds": 0, "amount": "250.00"}
    ]
    ledger = owner_client.get("/api/v1/billing/ledger").json()["results"]
    assert sorted((x["kind"], x["amount"]) for x in ledger) == [
        ("credit", "10.00"), ("reserved_charge", "-500.00"), ("term_refund", "250.00")
    ]  # fmt: skip
    rows = _csv_rows(owner_client.get(f"/billing/statements/{month}.csv"))
    assert sorted((r[1], r[7]) for r in rows[1:-1] if r[1] != "opening_balance") == [
        ("credit", "10.00"), ("reserved_charge", "-500.00"), ("term_refund", "250.00")
    ]  # fmt: skip
    rows = _csv_rows(owner_client.get("/api/v1/billing/ledger.csv"))
    assert sorted((r[2], r[3]) for r in rows[1:]) == [
        ("credit", "10.00"), ("reserved_charge", "-500.00"), ("term_refund", "250.00")
    ]  # fmt: skip
    page = owner_client.get(f"/billing/statements/{month}").content.decode()
    assert (
        '<tr><th>Reserved-term refunds (time not delivered)</th><td class="num">250.00 USD</td>'
        "</tr>" in page
    )
    assert '<tr><th>Credits</th><td class="num">10.00 USD</td></tr>' in page


def test_the_staff_dashboard_does_not_count_a_term_refund_as_goodwill(client, org):
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, hours=168,
                            status=ReservationStatus.CANCELLED, total=Decimal("500.00"))  # fmt: skip
    term.cancellation = {"refund_amount": "500.00", "rule": "Full refund."}
    term.save(update_fields=["cancellation"])
    cancellation_settle(reservation_id=term.pk)
    credit_issue(organization=org, amount=Decimal("10.00"), reason="Slow support",
                 created_by=None, actor="staff")  # fmt: skip
    client.force_login(UserFactory(username="ops", is_staff=True, is_superuser=True))

    html = client.get("/staff/").content.decode()

    money = html.split('id="money-table"')[1].split("</table>")[0]
    row = '<tr><th scope="row">{}</th><td class="num">{}</td></tr>'
    assert row.format("Credits (goodwill and SLA)", "10.00 USD") in money
    assert row.format("Reserved-term refunds (time not delivered)", "500.00 USD") in money


def _insert(org, kind, amount_minor, key):
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO billing_ledgerentry (organization_id, kind, amount_minor, currency, "
            "gpu_seconds, idempotency_key, description, created_at) "
            "VALUES (%s, %s, %s, 'usd', 0, %s, '', now())",
            [org.pk, kind, amount_minor, key],
        )


def _kinds() -> dict[str, str]:
    return dict(LedgerEntry.objects.values_list("idempotency_key", "kind"))


def test_the_migration_gives_old_refunds_their_kind_and_moves_no_balance():
    a, b = OrganizationFactory(), OrganizationFactory()
    # As written before billing 0016: every refund of a term a `credit`.
    _insert(a, "reserved_charge", -50000, "reserved:1")
    _insert(a, "credit", 25000, "cancel:1")
    _insert(a, "credit", 1200, "curtail:2:refund")
    _insert(a, "sla_credit", 800, "curtail:2:sla")
    _insert(b, "credit", 700, "resale-return:3")
    _insert(b, "credit", 1000, "credit:9f2c")  # staff goodwill
    _insert(b, "credit", 300, "fund:cancel:1")  # not a refund's key, though it names one
    before = {o.pk: balance_minor(organization=o) for o in (a, b)}

    with connection.cursor() as cur:
        # The test's transaction has the inserts' deferred checks pending; a migration has none.
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cur.execute(migration._retag("credit", "term_refund"))

    assert _kinds() == {
        "reserved:1": "reserved_charge", "cancel:1": "term_refund",
        "curtail:2:refund": "term_refund", "curtail:2:sla": "sla_credit",
        "resale-return:3": "term_refund", "credit:9f2c": "credit", "fund:cancel:1": "credit",
    }  # fmt: skip
    assert {o.pk: balance_minor(organization=o) for o in (a, b)} == before == {
        a.pk: -50000 + 25000 + 1200 + 800, b.pk: 700 + 1000 + 300
    }  # fmt: skip
    # The ledger refuses changes again once it is done.
    with pytest.raises(DatabaseError), transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("UPDATE billing_ledgerentry SET kind = 'credit'")

    with connection.cursor() as cur:
        cur.execute(migration._retag("term_refund", "credit"))
    assert set(_kinds().values()) == {"reserved_charge", "credit", "sla_credit"}


def test_the_usage_pages_spend_is_net_of_a_terms_refund_as_the_months_spend_is(org, owner_client):
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, hours=168,
                            status=ReservationStatus.CANCELLED, total=Decimal("500.00"))  # fmt: skip
    term.cancellation = {"refund_amount": "500.00", "rule": "Full refund."}
    term.save(update_fields=["cancellation"])
    cancellation_settle(reservation_id=term.pk)
    credit_issue(organization=org, amount=Decimal("10.00"), reason="Slow support",
                 created_by=None, actor="staff")  # fmt: skip

    html = owner_client.get("/billing/usage").content.decode()
    balance = owner_client.get("/api/v1/billing/balance").json()

    # Cancelled with a full refund: nothing was charged, on the chart as in the month's spend.
    assert "Charged in this period: <strong>0.00 USD</strong>" in html
    assert balance["spent_this_month"] == "0.00"
