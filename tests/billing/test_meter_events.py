"""Postpaid usage → Stripe Billing Meters, in money (minor units; the meter's price is 1 minor
unit per unit). localstripe has no Meters, so these tests check the
exact request our adapter sends (through the stripe library's own HTTP client interface,
recording instead of sending) against Stripe's documented parameters for
POST /v1/billing/meter_events: event_name, payload[stripe_customer_id], payload[value],
identifier (≤ 100 chars), timestamp (Unix seconds, within the past 35 days)."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import parse_qs

import pytest
from django.conf import settings

from billing.models import (
    BillingAccount,
    BillingMode,
    LedgerEntry,
    LedgerKind,
    OutboxMessage,
    OutboxStatus,
    UsageAggregate,
)
from billing.services.postpaid import usage_report_postpaid_run
from billing.services.usage import reservation_meter
from billing.stripe_gateway import StripeGateway, build_client
from billing.tasks import outbox_flush
from marketplace.models import Reservation
from tests.billing.conftest import make_reservation
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def postpaid_org(customer_id: str):
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, mode=BillingMode.POSTPAID,
                                  stripe_customer_id=customer_id)  # fmt: skip
    return org


def test_the_adapter_sends_exactly_stripes_documented_meter_event_request(recorder, settings):
    gateway = StripeGateway(build_client(http_client=recorder))
    at = datetime(2026, 11, 24, 13, 0, tzinfo=UTC)

    gateway.meter_event_create(event_name="gpu_seconds", identifier="sy-usage-42",
                               customer_id="cus_ABC", value=7200, timestamp=at,
                               idempotency_key="meter:42")  # fmt: skip

    [(method, url, headers, body)] = recorder.requests
    assert (method, url) == ("post", "https://api.stripe.com/v1/billing/meter_events")
    assert parse_qs(body) == {
        "event_name": ["gpu_seconds"],
        "identifier": ["sy-usage-42"],
        "payload[stripe_customer_id]": ["cus_ABC"],
        "payload[value]": ["7200"],
        "timestamp": [str(int(at.timestamp()))],
    }
    assert headers["Idempotency-Key"] == "meter:42"
    assert headers["Stripe-Version"] == settings.STRIPE_API_VERSION
    assert headers["Authorization"] == "Bearer sk_test_recording"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"


def test_meter_values_are_whole_quantities_never_floats(recorder):
    gateway = StripeGateway(build_client(http_client=recorder))
    with pytest.raises(TypeError):
        gateway.meter_event_create(event_name="gpu_seconds", identifier="x", customer_id="cus_A",
                                   value=1.5, timestamp=datetime.now(UTC), idempotency_key="k")  # fmt: skip
    assert recorder.requests == []


def test_stripe_calls_scale_with_organisations_and_hours_not_reservations(
    recorder, django_capture_on_commit_callbacks
):
    h0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    orgs = [postpaid_org(f"cus_{i}") for i in range(3)]
    for org in orgs:
        for _ in range(4):  # 4 reservations of 1 GPU each, all active from h0
            r = make_reservation(org, gpu_count=1, price=Decimal("1.0000"), starts_at=h0,
                                 activated_at=h0, hours=5)  # fmt: skip
            # Metered at 10:30 (in hour 10) and at 11:15 (in hour 11).
            from django.utils import timezone

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(timezone, "now", lambda: h0 + timedelta(minutes=30))
                reservation_meter(reservation_id=r.pk, now=h0 + timedelta(minutes=30))
                mp.setattr(timezone, "now", lambda: h0 + timedelta(minutes=75))
                reservation_meter(reservation_id=r.pk, now=h0 + timedelta(minutes=75))

    with django_capture_on_commit_callbacks(execute=False):
        # An hour is aggregated two minutes after it ends (lines stamped just before the
        # hour may commit just after it): at 12:01 hour 10, at 12:03 hour 11 too.
        assert usage_report_postpaid_run(now=h0 + timedelta(hours=2, minutes=1)) == 3
        assert usage_report_postpaid_run(now=h0 + timedelta(hours=2, minutes=3)) == 3
        assert usage_report_postpaid_run(now=h0 + timedelta(hours=2, minutes=4)) == 0
    assert outbox_flush() == 6
    assert outbox_flush() == 0

    assert len(recorder.requests) == 6  # 3 organisations × 2 hours, for 12 reservations
    sent = sorted(
        (form["payload[stripe_customer_id]"][0], form["timestamp"][0], form["payload[value]"][0],
         form["identifier"][0])
        for form in (parse_qs(body) for _, _, _, body in recorder.requests)
    )  # fmt: skip
    aggregates = {a.identifier: a for a in UsageAggregate.objects.all()}
    assert sorted(aggregates) == sorted(s[3] for s in sent)
    assert [s[:3] for s in sent] == [
        (f"cus_{i}", str(int((h0 + timedelta(hours=h)).timestamp())), v)
        for i in range(3)
        # At 1.00 per GPU-hour: 4 × 1,800 s is 2.00, 4 × 2,700 s 3.00, sent in cents.
        for h, v in ((0, "200"), (1, "300"))
    ]
    assert set(OutboxMessage.objects.values_list("status", flat=True)) == {OutboxStatus.SENT}


def test_a_correction_hour_is_given_back_at_once_not_carried_forward(
    recorder, django_capture_on_commit_callbacks, monkeypatch
):
    """A meter event cannot be negative: an hour whose corrections outweigh its usage (an
    outage credited late) is a credit on the customer's Stripe balance, to the cent, and the
    next hours are metered in full (no credit left behind if no usage follows)."""
    from django.utils import timezone

    org = postpaid_org("cus_corrected")
    h0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    net_usage = [3600, -5000, 2000]  # in cents; hour 1: an outage credited late
    for hour, cents in enumerate(net_usage):
        monkeypatch.setattr(timezone, "now", lambda h=hour: h0 + timedelta(hours=h, minutes=20))
        LedgerEntry.objects.create(organization=org, kind=LedgerKind.USAGE, amount_minor=-cents,
                                   currency="usd", idempotency_key=f"usage:{hour}")  # fmt: skip
    monkeypatch.undo()
    with django_capture_on_commit_callbacks(execute=False):
        assert usage_report_postpaid_run(now=h0 + timedelta(hours=3, minutes=5)) == 3
    outbox_flush()

    sent = [(url.rsplit("/v1/", 1)[1], parse_qs(body)) for _, url, _, body in recorder.requests]
    assert [(path, f.get("payload[value]") or f["amount"]) for path, f in sent] == [
        ("billing/meter_events", ["3600"]),
        ("customers/cus_corrected/balance_transactions", ["-5000"]),
        ("billing/meter_events", ["2000"]),
    ]
    aggregates = UsageAggregate.objects.filter(organization=org).order_by("period_start")
    assert [a.amount_minor for a in aggregates] == net_usage


def test_accrued_usage_reaches_stripe_as_one_event_per_organisation_and_hour(
    recorder, django_capture_on_commit_callbacks, monkeypatch
):
    """Metering every minute for two hours books hourly lines; the meter events follow the
    hours and the postpaid organisations, not the minutes or the reservations."""
    from django.utils import timezone

    from billing.services.metering import usage_meter_run

    h0 = datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    orgs = [postpaid_org(f"cus_acc{i}") for i in range(3)]
    for org in orgs:
        for _ in range(4):
            make_reservation(org, gpu_count=2, price=Decimal("1.0000"), starts_at=h0,
                             activated_at=h0, hours=5)  # fmt: skip
    spread = settings.BILLING_USAGE_BOOK_SPREAD_MINUTES
    reservation_ids = sorted(
        Reservation.objects.filter(organization__in=orgs).values_list("pk", flat=True)
    )
    at = h0 + timedelta(minutes=1)
    while at <= h0 + timedelta(hours=2, minutes=59):
        monkeypatch.setattr(timezone, "now", lambda at=at: at)
        usage_meter_run(now=at)
        if at.hour == 11 and at.minute < spread:
            # The hour's lines are spread over the next hour's first minutes (id % spread).
            assert sorted(LedgerEntry.objects.filter(kind=LedgerKind.USAGE).values_list(
                "reservation_id", flat=True)) == [i for i in reservation_ids if i % spread <= at.minute]  # fmt: skip
        if at.hour == 12 and at.minute == 5:
            # Hour 11 (every line written in it, at whatever minute): one event per organisation.
            assert usage_report_postpaid_run(now=at) == 3
        at += timedelta(minutes=1)
    monkeypatch.undo()
    # Two lines per reservation (booked in hour 11 and in hour 12), not 175.
    assert LedgerEntry.objects.filter(kind=LedgerKind.USAGE).count() == 3 * 4 * 2

    with django_capture_on_commit_callbacks(execute=False):
        assert usage_report_postpaid_run(now=h0 + timedelta(hours=3, minutes=3)) == 3
        assert usage_report_postpaid_run(now=h0 + timedelta(hours=3, minutes=4)) == 0
    assert outbox_flush() == 6

    sent = sorted(
        (form["payload[stripe_customer_id]"][0], int(form["timestamp"][0]),
         int(form["payload[value]"][0]))
        for form in (parse_qs(body) for _, _, _, body in recorder.requests)
    )  # fmt: skip
    # Booked in hour 11 and in hour 12, whatever the minute: 4 reservations × 2 GPUs × 3600 s
    # at 1.00 per GPU-hour each (8.00, in cents), every line in exactly one event.
    assert sent == [
        (f"cus_acc{i}", int((h0 + timedelta(hours=h)).timestamp()), 800)
        for i in range(3)
        for h in (1, 2)
    ]
    assert sum(v for *_, v in sent) == -sum(
        LedgerEntry.objects.filter(kind=LedgerKind.USAGE).values_list("amount_minor", flat=True)
    )
