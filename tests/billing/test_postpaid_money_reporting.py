"""Postpaid organisations are invoiced for exactly what their ledger says, in money, once.

localstripe has neither Billing Meters nor customer balance transactions, so (as in
test_meter_events.py) these tests record the exact requests our adapter sends through the
stripe library's own HTTP client interface, and check them against Stripe's documented
parameters: POST /v1/billing/meter_events (event_name, identifier, payload[stripe_customer_id],
payload[value], timestamp) and POST /v1/customers/{id}/balance_transactions (amount, negative
for a credit; currency; description; metadata)."""

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.utils import timezone

from billing.models import (
    BillingAccount,
    BillingMode,
    LedgerEntry,
    LedgerKind,
    OutboxMessage,
    OutboxStatus,
    UsageAggregate,
)
from billing.services.accounts import billing_account_approve_postpaid
from billing.services.ledger import ledger_entry_add
from billing.services.outbox import outbox_send
from billing.services.postpaid import usage_aggregate_create, usage_report_postpaid_run
from billing.services.usage import reservation_meter, reserved_base_charge
from billing.stripe_gateway import (
    StripeGateway,
    TransientStripeError,
)
from billing.tasks import outbox_flush
from marketplace.models import Tier
from tests.billing.conftest import make_reservation
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

H0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)


@pytest.fixture
def clock(monkeypatch):
    """Django's clock, set by the test (auto_now_add stamps ledger lines with it)."""

    def set_to(at):
        monkeypatch.setattr(timezone, "now", lambda: at)

    return set_to


def postpaid_org(customer_id="cus_x"):
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org)
    BillingAccount.objects.filter(organization=org).update(
        mode=BillingMode.POSTPAID, stripe_customer_id=customer_id
    )
    return org


def line(org, kind, amount_minor, key, *, gpu_seconds=0):
    ledger_entry_add(organization=org, kind=kind, amount_minor=amount_minor, currency="usd",
                     idempotency_key=key, gpu_seconds=gpu_seconds)  # fmt: skip


def report(at, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        created = usage_report_postpaid_run(now=at)
    outbox_flush()
    return created


def test_the_invoice_gets_the_ledgers_money_not_gpu_seconds(
    recorder, clock, django_capture_on_commit_callbacks, settings
):
    """The outside probe: a reserved term (−200.00) and two hours of GPU at 1.00/h and 8.00/h
    (−1.00, −8.00) reached Stripe as one meter event of 7,200 (GPU-seconds); the ledger says
    −209.00, and that, in cents, is what Stripe must be told."""
    org = postpaid_org()
    clock(H0 + timedelta(minutes=10))
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, total=Decimal("200.00"),
                            starts_at=H0 + timedelta(days=1), hours=100)  # fmt: skip
    reserved_base_charge(term, term.total_amount)
    line(org, LedgerKind.USAGE, -100, "u1", gpu_seconds=3600)
    line(org, LedgerKind.USAGE, -800, "u2", gpu_seconds=3600)

    assert report(H0 + timedelta(hours=1, minutes=5), django_capture_on_commit_callbacks) == 1

    [(path, form)] = recorder.sent()
    [aggregate] = UsageAggregate.objects.all()
    assert path == "/v1/billing/meter_events"
    assert form == {
        "event_name": [settings.STRIPE_METER_EVENT_NAME],
        "identifier": [aggregate.identifier],
        "payload[stripe_customer_id]": ["cus_x"],
        "payload[value]": ["20900"],  # cents, at 1 cent per unit: 209.00
        "timestamp": [str(int(H0.timestamp()))],
    }
    assert (aggregate.amount_minor, aggregate.gpu_seconds) == (20900, 7200)
    assert -sum(LedgerEntry.objects.values_list("amount_minor", flat=True)) == 20900
    assert recorder.requests[0][2]["Idempotency-Key"] == f"meter:{aggregate.pk}"


def test_credits_and_cancellation_refunds_reach_stripe_as_a_balance_credit(
    recorder, clock, django_capture_on_commit_callbacks
):
    """An hour whose credits (SLA, staff, a cancelled term's refund) outweigh its charges is
    given back as a credit on the Stripe customer's balance, to the cent."""
    org = postpaid_org("cus_credits")
    clock(H0 + timedelta(minutes=20))
    line(org, LedgerKind.USAGE, -150, "u1", gpu_seconds=540)
    line(org, LedgerKind.SLA_CREDIT, 250, "sla:1")
    line(org, LedgerKind.CREDIT, 1000, "goodwill:1")
    line(org, LedgerKind.CREDIT, 10000, "cancellation:1")

    assert report(H0 + timedelta(hours=1, minutes=5), django_capture_on_commit_callbacks) == 1

    [(path, form)] = recorder.sent()
    [aggregate] = UsageAggregate.objects.all()
    assert path == "/v1/customers/cus_credits/balance_transactions"
    assert form == {
        "amount": ["-11100"],
        "currency": ["usd"],
        "description": ["Credits and corrections, 2026-11-24 10:00 UTC"],
        "metadata[aggregate]": [aggregate.identifier],
    }
    assert recorder.requests[0][2]["Idempotency-Key"] == f"balance_credit:{aggregate.pk}"
    message = OutboxMessage.objects.get()
    assert (message.status, message.stripe_object_id) == (OutboxStatus.SENT, "cbtxn_1")


def test_money_that_moved_over_the_card_is_not_invoiced_again(
    recorder, clock, django_capture_on_commit_callbacks
):
    org = postpaid_org()
    clock(H0 + timedelta(minutes=20))
    line(org, LedgerKind.TOP_UP, 50000, "top_up:1")
    line(org, LedgerKind.REFUND, -20000, "refund:1")
    line(org, LedgerKind.ADJUSTMENT, 20000, "refund_reversal:1")
    line(org, LedgerKind.USAGE, -300, "u1", gpu_seconds=1080)

    report(H0 + timedelta(hours=1, minutes=5), django_capture_on_commit_callbacks)

    assert [form["payload[value]"] for _, form in recorder.sent()] == [["300"]]


def test_prepaid_organisations_are_not_reported(
    recorder, clock, django_capture_on_commit_callbacks
):
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, stripe_customer_id="cus_pre")
    clock(H0 + timedelta(minutes=20))
    line(org, LedgerKind.USAGE, -300, "u1", gpu_seconds=1080)

    assert report(H0 + timedelta(hours=1, minutes=5), django_capture_on_commit_callbacks) == 0
    assert recorder.requests == []


def test_a_line_that_lands_late_in_a_reported_hour_is_reported_once_on_its_own(
    recorder, clock, django_capture_on_commit_callbacks
):
    """A line stamped in an hour that was already reported (its transaction committed after
    the run) is reported by the next run as the difference: each line once, none lost."""
    org = postpaid_org()
    clock(H0 + timedelta(minutes=20))
    line(org, LedgerKind.USAGE, -500, "u1", gpu_seconds=1800)
    assert report(H0 + timedelta(hours=1, minutes=5), django_capture_on_commit_callbacks) == 1
    clock(H0 + timedelta(minutes=59))  # stamped 10:59, committed after the 11:05 run
    line(org, LedgerKind.RESERVED_CHARGE, -7000, "reserved:late")
    line(org, LedgerKind.SLA_CREDIT, 200, "sla:late")

    assert report(H0 + timedelta(hours=1, minutes=10), django_capture_on_commit_callbacks) == 1
    assert report(H0 + timedelta(hours=1, minutes=15), django_capture_on_commit_callbacks) == 0

    values = [int(form["payload[value]"][0]) for _, form in recorder.sent()]
    assert values == [500, 6800]
    assert sorted(UsageAggregate.objects.values_list("amount_minor", flat=True)) == [500, 6800]
    assert sum(values) == -sum(LedgerEntry.objects.values_list("amount_minor", flat=True))


def test_stripe_calls_follow_organisations_and_hours_not_ledger_lines(
    recorder, clock, django_capture_on_commit_callbacks
):
    orgs = [postpaid_org(f"cus_{i}") for i in range(3)]
    for hour in range(2):
        clock(H0 + timedelta(hours=hour, minutes=15))
        for i, org in enumerate(orgs):
            for n in range(10):  # ten charges and a credit per organisation and hour
                line(org, LedgerKind.USAGE, -(n + 1), f"u:{i}:{hour}:{n}", gpu_seconds=10)
            line(org, LedgerKind.SLA_CREDIT, 5, f"sla:{i}:{hour}")

    assert report(H0 + timedelta(hours=2, minutes=5), django_capture_on_commit_callbacks) == 6

    assert len(recorder.requests) == 6  # 3 organisations × 2 hours, for 66 lines
    assert sorted(
        (form["payload[stripe_customer_id]"][0], form["timestamp"][0], form["payload[value]"][0])
        for _, form in recorder.sent()
    ) == [
        (f"cus_{i}", str(int((H0 + timedelta(hours=h)).timestamp())), "50")  # 55 − 5
        for i in range(3)
        for h in range(2)
    ]


def test_a_stripe_outage_replays_the_same_report_with_the_same_key(
    recorder, clock, django_capture_on_commit_callbacks, monkeypatch
):
    org = postpaid_org()
    clock(H0 + timedelta(minutes=20))
    line(org, LedgerKind.USAGE, -900, "u1", gpu_seconds=3600)
    with django_capture_on_commit_callbacks(execute=False):
        usage_report_postpaid_run(now=H0 + timedelta(hours=1, minutes=5))
    message = OutboxMessage.objects.get()
    real = StripeGateway.meter_event_create

    def down_then_up(self, **kwargs):
        down_then_up.calls.append(kwargs["idempotency_key"])
        if len(down_then_up.calls) == 1:
            raise TransientStripeError("503 from Stripe")
        return real(self, **kwargs)

    down_then_up.calls = []
    monkeypatch.setattr(StripeGateway, "meter_event_create", down_then_up)

    clock(datetime.now(UTC))  # the outbox schedules retries on the real clock
    assert outbox_send(message_id=message.pk) == OutboxStatus.PENDING
    OutboxMessage.objects.filter(pk=message.pk).update(next_attempt_at=datetime.now(UTC))
    assert outbox_send(message_id=message.pk) == OutboxStatus.SENT
    # The run again finds nothing new: the hour was recorded before Stripe was called.
    assert usage_report_postpaid_run(now=H0 + timedelta(hours=1, minutes=10)) == 0

    assert down_then_up.calls == [f"meter:{message.payload['aggregate_id']}"] * 2
    assert [form["payload[value]"] for _, form in recorder.sent()] == [["900"]]


def test_switching_to_postpaid_invoices_only_what_is_used_after_the_switch(
    recorder, clock, django_capture_on_commit_callbacks
):
    """Usage accrued while prepaid is paid from the balance: it is booked at the switch and
    not invoiced, nor is anything else written before it (a reserved term paid from the
    balance the day before); usage after the switch is invoiced, once."""
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, stripe_customer_id="cus_switch")
    clock(H0 - timedelta(days=1))
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, total=Decimal("300.00"),
                            starts_at=H0 + timedelta(days=2), hours=100)  # fmt: skip
    reserved_base_charge(term, term.total_amount)
    running = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), starts_at=H0,
                               activated_at=H0, hours=5)  # fmt: skip

    clock(H0 + timedelta(minutes=30))
    billing_account_approve_postpaid(organization=org, approved_by=UserFactory(password="!"))
    clock(H0 + timedelta(minutes=75))
    reservation_meter(reservation_id=running.pk, now=H0 + timedelta(minutes=75))

    report(H0 + timedelta(hours=2, minutes=5), django_capture_on_commit_callbacks)

    usage = LedgerEntry.objects.filter(kind=LedgerKind.USAGE).order_by("created_at")
    # 3.60/h = 1 cent per 10 s: 30 minutes while prepaid, 45 minutes after.
    assert list(usage.values_list("amount_minor", flat=True)) == [-180, -270]
    [(_, form)] = recorder.sent()
    assert (form["payload[stripe_customer_id]"], form["payload[value]"]) == (
        ["cus_switch"],
        ["270"],
    )


@pytest.mark.django_db(transaction=True)
def test_two_reports_of_the_same_hour_at_once_report_it_once():
    """Threads on their own connections: the first records the hour and holds its transaction
    open; the second, meanwhile, waits on the account's lock and then finds nothing left."""
    org = postpaid_org()
    line(org, LedgerKind.USAGE, -700, "u1", gpu_seconds=3600)
    hour = LedgerEntry.objects.get().created_at.replace(minute=0, second=0, microsecond=0)
    recorded, results = threading.Event(), {}

    def first():
        try:
            with transaction.atomic():
                results["first"] = usage_aggregate_create(
                    organization_id=org.pk, period_start=hour, currency="usd"
                )
                recorded.set()
                threading.Event().wait(0.5)
        finally:
            connection.close()

    def second():
        try:
            assert recorded.wait(10)
            results["second"] = usage_aggregate_create(
                organization_id=org.pk, period_start=hour, currency="usd"
            )
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)

    assert results["first"] is not None and results["second"] is None
    assert list(UsageAggregate.objects.values_list("amount_minor", flat=True)) == [700]
    assert OutboxMessage.objects.count() == 1
