"""Probes of the late-start rule (marketplace.services.reservations.start_overdue_at) against
resale: a reserved term whose first hours were all sold waits for its own hours, as its
holder chose; that wait is not the platform's delay, so it is neither SLA downtime nor a
reason to refund the rest of the term in full (docs/money.md, docs/resale.md)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.services.credits import month_bounds, reservation_month_uptime
from config.errors import Conflict
from marketplace.models import ListingStatus, Reservation, ReservationStatus
from marketplace.services.reservations import (
    cancellation_terms,
    reservation_create,
    start_overdue_at,
)
from tests.marketplace.resale_helpers import H, buy, listing, market, time_passes_until

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def allowance(settings):
    settings.PROVISIONING_READINESS_TIMEOUT_SECONDS = 120


def _all_gpus_sold_for_the_first_hours(hours: int = 3):
    """A seller's 8-GPU term whose 8 GPUs were all sold for its first `hours`; now 2 hours
    into the sold window, the term still waiting (not active) for its own hours."""
    m = market()
    lst = listing(m, gpus=8, start_h=0, hours=hours)
    buy(m, lst, start_h=0, hours=hours)
    time_passes_until(m.start + 2 * H)
    Reservation.objects.filter(pk=m.term.pk).update(status=ReservationStatus.SCHEDULED)
    return m, Reservation.objects.get(pk=m.term.pk)


def test_a_term_waiting_out_a_window_it_sold_is_not_overdue():
    m, term = _all_gpus_sold_for_the_first_hours(hours=3)

    # Its own hours begin when the sold window ends: late only an allowance after that.
    assert start_overdue_at(term) == term.starts_at + 3 * H + timedelta(seconds=120)


def test_cancelling_a_term_after_its_start_while_its_first_hours_are_sold_refunds_nothing():
    m, term = _all_gpus_sold_for_the_first_hours(hours=3)

    shown = cancellation_terms(term)

    # After the start, under the notice rule: a term is a commitment; the wait is the
    # seller's own sale (which the buyer pays it for), not our delay.
    assert (shown.refund_fraction, shown.refund_amount) == (Decimal("0"), Decimal("0.00"))
    assert "the delay is ours" not in shown.rule


def test_the_hours_a_term_sold_are_not_sla_downtime_while_it_waits_for_its_own():
    m, term = _all_gpus_sold_for_the_first_hours(hours=3)
    now = timezone.now()
    month = term.starts_at.date().replace(day=1)

    measured, down = reservation_month_uptime(reservation=term, month=month, now=now)

    # Hours sold whole are the buyer's: neither the term's measured time nor its downtime.
    assert (measured, down) == (0, 0)


def test_a_term_not_running_an_allowance_after_its_sold_window_is_overdue_then():
    m, term = _all_gpus_sold_for_the_first_hours(hours=1)  # its own hours began 1 h ago
    now = timezone.now()
    own_from = term.starts_at + H
    month = term.starts_at.date().replace(day=1)

    shown = cancellation_terms(term, at=now)
    assert shown.refund_fraction == Decimal("1") and "the delay is ours" in shown.rule
    measured, down = reservation_month_uptime(reservation=term, month=month, now=now)
    # Down from its own hours plus the allowance, not from its start (as far as the month).
    m0, m1 = month_bounds(month)
    late_from = max(own_from + timedelta(seconds=120), m0)
    assert down == max(0, int((min(now, m1) - late_from).total_seconds()))


# --- max_price on resold time: the listing's asking price, equal allowed ---------------------


def test_a_listing_is_booked_at_a_max_price_equal_to_its_asking_price_and_refused_below():
    m = market()
    lst = listing(m, gpus=4, start_h=24, hours=24, price="1.5000")

    with pytest.raises(Conflict) as refused:
        reservation_create(
            organization=m.buyer, listing=lst, gpu_count=4, starts_at=lst.starts_at,
            ends_at=lst.ends_at, max_price_per_gpu_hour=Decimal("1.4999"),
        )  # fmt: skip
    assert refused.value.code == "price_above_max"
    lst.refresh_from_db()
    assert lst.status == ListingStatus.OPEN
    assert not Reservation.objects.filter(organization=m.buyer).exists()

    bought = reservation_create(
        organization=m.buyer, listing=lst, gpu_count=4, starts_at=lst.starts_at,
        ends_at=lst.ends_at, max_price_per_gpu_hour=Decimal("1.5"),
    )  # fmt: skip
    assert bought.price_per_gpu_hour == Decimal("1.5000")
