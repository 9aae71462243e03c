"""Prepaid accounts get a receipt for each top-up and a monthly statement (ledger, usage and
credits), printable as a page and downloadable as CSV."""

import csv
import io
from datetime import UTC, datetime

import pytest
from django.core import mail
from django.db import connection

from billing.models import BillingNotice, LedgerKind, PaymentMethod, TopUp
from billing.services.topups import top_up_succeed
from marketplace.models import Role
from tests.billing.conftest import make_reservation
from tests.clients import HttpsClient
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


def entry_at(org, kind, amount_minor, at, *, reservation=None, gpu_seconds=0, key, text=""):
    """A ledger line written at `at` (the ledger's created_at is set by the database on insert,
    and the table refuses updates, so the line is inserted as it would have been then)."""
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO billing_ledgerentry (organization_id, kind, amount_minor, currency, "
            "reservation_id, gpu_seconds, idempotency_key, description, created_at) "
            "VALUES (%s, %s, %s, 'usd', %s, %s, %s, %s, %s)",
            [org.pk, kind, amount_minor, reservation.pk if reservation else None, gpu_seconds,
             key, text, at],
        )  # fmt: skip


@pytest.fixture
def owner_client(org):
    client = HttpsClient()
    client.force_login(
        MembershipFactory(organization=org, role=Role.MEMBER, user__password="!").user
    )
    return client


@pytest.fixture
def november(org):
    """October leaves 100.00; November: a top-up, usage, a reserved term, credits."""
    r1 = make_reservation(org, gpu_count=1)
    r2 = make_reservation(org, gpu_count=1)
    at = lambda d, h=12: datetime(2026, 11, d, h, tzinfo=UTC)  # noqa: E731
    entry_at(org, LedgerKind.TOP_UP, 10000, datetime(2026, 10, 31, 23, 59, tzinfo=UTC), key="oct")
    entry_at(org, LedgerKind.TOP_UP, 5000, at(2), key="t1", text="Top-up (pi_1)")
    entry_at(org, LedgerKind.USAGE, -1234, at(3), reservation=r1, gpu_seconds=3600, key="u1",
             text="=cmd|' /C calc'!A0")  # fmt: skip
    entry_at(org, LedgerKind.USAGE, -766, at(4), reservation=r1, gpu_seconds=1800, key="u2")
    entry_at(org, LedgerKind.RESERVED_CHARGE, -4000, at(5), reservation=r2, key="r2")
    entry_at(org, LedgerKind.SLA_CREDIT, 400, at(6), reservation=r2, key="s2")
    entry_at(org, LedgerKind.CREDIT, 100, at(30, 23), key="c1", text="goodwill")
    entry_at(org, LedgerKind.TOP_UP, 99999, datetime(2026, 12, 1, 0, 0, tzinfo=UTC), key="dec")
    other = MembershipFactory(user__password="!").organization
    entry_at(other, LedgerKind.TOP_UP, 777, at(10), key="theirs")
    return r1, r2


def test_the_monthly_statement_csv_has_the_opening_every_line_and_the_closing(
    org, owner_client, november
):
    r1, r2 = november

    response = owner_client.get("/billing/statements/2026-11.csv")

    assert response.status_code == 200
    assert response.streaming  # a month of hourly usage lines is read a chunk at a time
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    assert f"switchyard-statement-{org.public_id}-2026-11.csv" in response["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0][:2] == ["date_utc", "kind"]
    assert [(r[1], r[3], r[6], r[7], r[9]) for r in rows[1:]] == [
        ("opening_balance", "", "", "", "100.00"),
        ("top_up", "", "0", "50.00", "150.00"),
        ("usage", r1.public_id, "3600", "-12.34", "137.66"),
        ("usage", r1.public_id, "1800", "-7.66", "130.00"),
        ("reserved_charge", r2.public_id, "0", "-40.00", "90.00"),
        ("sla_credit", r2.public_id, "0", "4.00", "94.00"),
        ("credit", "", "0", "1.00", "95.00"),
        ("closing_balance", "", "", "", "95.00"),
    ]
    assert rows[3][2] == "'=cmd|' /C calc'!A0"  # never a formula in a spreadsheet


def test_the_printable_statement_sums_by_kind_and_usage_by_reservation(org, owner_client, november):
    r1, r2 = november

    page = owner_client.get("/billing/statements/2026-11").content.decode()

    assert "Statement for November 2026" in page
    assert '<tr><th>Opening balance</th><td class="num">100.00 USD</td></tr>' in page
    assert '<tr><th>Usage</th><td class="num">-20.00 USD</td></tr>' in page
    assert '<tr><th>SLA credits</th><td class="num">4.00 USD</td></tr>' in page
    assert '<td class="num" id="closing">95.00 USD</td>' in page
    assert (
        f'<tr><td>{r1.public_id}</td><td class="num">1.50</td><td class="num">20.00 USD</td>'
        in page
    )
    assert '<td class="num">40.00 USD</td>' in page and "7.77" not in page
    listed = owner_client.get("/billing/statements").content.decode()
    assert 'href="/billing/statements/2026-11"' in listed
    assert 'href="/billing/statements/2026-10.csv"' in listed


@pytest.mark.parametrize("month", ["2026-13", "2026-00", "1999-12", "9999-12", "2999-01"])
def test_a_month_without_a_statement_is_a_404_on_every_page(owner_client, month):
    # 9999-12 once ran into year 10000 (a 500); a month after this one has no statement yet.
    for path in (f"/billing/statements/{month}", f"/billing/statements/{month}.csv",
                 f"/api/v1/billing/statements/{month}"):  # fmt: skip
        assert owner_client.get(path).status_code == 404, path
    assert owner_client.get("/api/v1/billing/statements/" + month).json()["error"]["code"] == (
        "not_found"
    )


def test_each_top_up_is_receipted_by_email(org, django_capture_on_commit_callbacks):
    # A billing member whose account was deactivated has lost its access: not e-mailed.
    MembershipFactory(
        organization=org, role=Role.BILLING, user__is_active=False, user__password="!"
    )
    PaymentMethod.objects.create(organization=org, stripe_payment_method_id="pm_visa",
                                 brand="visa", last4="4242")  # fmt: skip
    top_up = TopUp.objects.create(organization=org, amount_minor=7500, currency="usd",
                                  payment_method_id="pm_visa")  # fmt: skip

    with django_capture_on_commit_callbacks(execute=True):
        assert top_up_succeed(top_up_id=top_up.pk, payment_intent_id="pi_123") is True
        assert top_up_succeed(top_up_id=top_up.pk, payment_intent_id="pi_123") is False

    (receipt,) = BillingNotice.objects.filter(organization=org, kind="receipt")
    # The card as its owner knows it, not Stripe's id for it.
    assert receipt.message.startswith("Receipt: 75.00 USD charged to your Visa ending 4242 on ")
    assert "pm_visa" not in receipt.message
    assert "payment pi_123" in receipt.message and "balance is now 75.00 USD" in receipt.message
    # The top-up by its public id, never its sequential one (billing 0012).
    assert f"top-up {top_up.public_id}." in receipt.message
    assert f"top-up {top_up.pk}." not in receipt.message
    (sent,) = [m for m in mail.outbox if m.subject == "Switchyard billing: receipt"]
    assert sent.to == ["owner@example.com"] and "pi_123" in sent.body


def test_the_api_gives_the_same_statement(org, owner_client, november):
    r1, r2 = november

    body = owner_client.get("/api/v1/billing/statements/2026-11").json()

    assert (body["month"], body["opening_balance"], body["closing_balance"]) == (
        "2026-11", "100.00", "95.00"
    )  # fmt: skip
    assert body["totals"] == {"credit": "1.00", "reserved_charge": "-40.00", "sla_credit": "4.00",
                              "top_up": "50.00", "usage": "-20.00"}  # fmt: skip
    assert body["usage"] == sorted(
        [
            {"reservation": r1.public_id, "gpu_seconds": 5400, "amount": "20.00"},
            {"reservation": r2.public_id, "gpu_seconds": 0, "amount": "40.00"},
        ],
        key=lambda row: row["reservation"],
    )
    assert [(x["kind"], x["amount"], x["balance_after"]) for x in body["lines"]][:2] == [
        ("top_up", "50.00", "150.00"), ("usage", "-12.34", "137.66"),
    ]  # fmt: skip
    assert len(body["lines"]) == 6
    assert owner_client.get("/api/v1/billing/statements/2026-13").status_code == 404


def test_reading_a_statement_writes_nothing(owner_client, org):
    """A GET (a read-only key's too) never opens a billing account on the way."""
    from billing.models import BillingAccount

    BillingAccount.objects.filter(organization=org).delete()
    body = owner_client.get("/api/v1/billing/statements/2026-11").json()
    assert body["currency"] == "usd" and body["lines"] == []
    assert not BillingAccount.objects.filter(organization=org).exists()
