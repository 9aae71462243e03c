"""A month's SLA credits are written once everything that can land in the month has landed:
its last hour's usage (booked up to BILLING_USAGE_BOOK_SPREAD_MINUTES after it) and late
outage records (the meter keeps an ended reservation open for them RECENTLY_RELEASED)."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest

import billing.tasks
from billing.models import LedgerEntry, LedgerKind
from billing.services.credits import (
    credit_issue,
    sla_credit_issue,
    sla_credits_issue_for_month,
    sla_month_settled_at,
)
from billing.services.metering import usage_meter_run
from billing.services.usage import RECENTLY_RELEASED
from inventory.models import Outage, OutageCause
from tests.billing.conftest import make_reservation

pytestmark = pytest.mark.django_db

APRIL = date(2026, 4, 1)
MAY_1 = datetime(2026, 5, 1, tzinfo=UTC)
MIN = timedelta(minutes=1)


def _sla_credits() -> list[int]:
    return list(
        LedgerEntry.objects.filter(kind=LedgerKind.SLA_CREDIT).values_list(
            "amount_minor", flat=True
        )
    )


@pytest.fixture
def org(org):
    """Funded, so the funding rules leave its reservations running."""
    credit_issue(organization=org, amount=Decimal("1000.00"), reason="test funds", created_by=None)
    return org


def _down(reservation, start, end):
    Outage.objects.create(
        node=reservation.allocations.first().node, started_at=start, ended_at=end,
        cause=OutageCause.HARDWARE_FAILURE,
    )  # fmt: skip


def test_april_settles_two_days_and_the_booking_spread_after_its_end(settings):
    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 30

    assert RECENTLY_RELEASED == timedelta(days=2)
    assert sla_month_settled_at(APRIL) == datetime(2026, 5, 3, 0, 30, tzinfo=UTC)


def test_the_month_is_credited_on_its_last_hour_too_not_before_it_is_booked(org, settings):
    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 30
    # On demand at 10.00/h, 30 April 20:00 → 1 May 02:00, 30 minutes down on 30 April.
    reservation = make_reservation(
        org, gpu_count=1, price=Decimal("10.0000"), starts_at=MAY_1 - 4 * 60 * MIN, hours=6,
        activated_at=MAY_1 - 4 * 60 * MIN,
    )  # fmt: skip
    _down(reservation, MAY_1 - 3 * 60 * MIN, MAY_1 - 150 * MIN)
    for minutes in (-239, -61, -1, 0.5):
        usage_meter_run(now=MAY_1 + minutes * MIN)

    # The first run after the month's end: 23:00–24:00 may not be booked yet. Nothing written.
    assert sla_credits_issue_for_month(month=APRIL, now=MAY_1 + 40 * MIN / 60) == 0
    assert sla_credit_issue(reservation_id=reservation.pk, month=APRIL, now=MAY_1 + MIN) is None
    assert _sla_credits() == []

    for minutes in (45, 105, 121):
        usage_meter_run(now=MAY_1 + minutes * MIN)
    settled = sla_month_settled_at(APRIL)
    assert sla_credits_issue_for_month(month=APRIL, now=settled - MIN) == 0
    assert sla_credits_issue_for_month(month=APRIL, now=settled) == 1
    assert sla_credits_issue_for_month(month=APRIL, now=settled + 60 * MIN) == 0

    # April: 4 h, 30 min down (87.5 %) → 100 % of April's 3.5 h = 35.00, its last hour included.
    assert _sla_credits() == [3500]


def test_an_outage_recorded_late_counts_towards_the_months_tier(org, settings):
    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 30
    # 30 April 20:00–22:00 (its booked end) at 10.00/h, 1 minute down known when it ended.
    start = MAY_1 - 4 * 60 * MIN
    reservation = make_reservation(
        org, gpu_count=1, price=Decimal("10.0000"), starts_at=start, hours=2, activated_at=start,
    )  # fmt: skip
    _down(reservation, start + 10 * MIN, start + 11 * MIN)
    usage_meter_run(now=start + 121 * MIN)  # 119 min: 19.83
    assert sla_credits_issue_for_month(month=APRIL, now=MAY_1 + MIN) == 0

    # Recorded a day and a half later (the meter still takes it): 6 more minutes of April down.
    _down(reservation, start + 60 * MIN, start + 66 * MIN)
    usage_meter_run(now=MAY_1 + timedelta(hours=34))  # gives 1.00 back
    assert sla_credits_issue_for_month(month=APRIL, now=sla_month_settled_at(APRIL)) == 1

    # 7 min of 120 down: 94.17 % → 100 % of the 18.83 paid (not 10 % of 19.83 = 1.98).
    assert _sla_credits() == [1883]
    assert (
        -sum(
            LedgerEntry.objects.filter(kind=LedgerKind.USAGE).values_list("amount_minor", flat=True)
        )
        == 1883
    )


def test_the_hourly_task_credits_the_last_month_once_it_has_settled(org, settings, monkeypatch):
    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 30
    start = MAY_1 - 4 * 60 * MIN
    reservation = make_reservation(
        org, gpu_count=1, price=Decimal("10.0000"), starts_at=start, hours=2, activated_at=start,
    )  # fmt: skip
    _down(reservation, start, start + 60 * MIN)
    usage_meter_run(now=start + 121 * MIN)

    def task_at(now):
        monkeypatch.setattr(billing.tasks, "timezone", SimpleNamespace(now=lambda: now))
        return billing.tasks.sla_credits_issue()

    assert task_at(MAY_1 + 5 * MIN) == 0
    assert task_at(datetime(2026, 5, 3, 0, 29, tzinfo=UTC)) == 0
    assert task_at(datetime(2026, 5, 3, 1, 0, tzinfo=UTC)) == 1
    assert task_at(datetime(2026, 5, 20, tzinfo=UTC)) == 0
    assert _sla_credits() == [1000]  # 50 % uptime: 100 % of the 10.00 paid
