"""Races on real PostgreSQL around a buyer giving resold time back: against the seller
cancelling its term, and against a third organisation booking the same GPUs. The locks and
the exclusion constraint decide; whatever the order, no GPU is held twice, and the seller's
refund counts the window as sold exactly when the sale still says so."""

import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db.models import Sum
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from marketplace.models import ListingStatus, Reservation, ReservationStatus
from marketplace.services.pricing import period_total
from marketplace.services.reservations import reservation_cancel, reservation_create
from tests.factories import OrganizationFactory
from tests.marketplace.resale_helpers import (
    buy,
    fund,
    listing,
    live_rows,
    market,
    overlapping_live_pairs,
)
from tests.marketplace.test_resale_race import run_together

pytestmark = pytest.mark.django_db(transaction=True)

H = timedelta(hours=1)


# The seller starts that much later: at once it usually wins, later the buyer does.
@pytest.mark.parametrize("seller_delay", [0, 0, 0.01, 0.03, 1.0])
def test_a_buyer_giving_time_back_while_the_seller_cancels_ends_one_way_or_the_other(
    seller_delay,
):
    m = market(starts_at=timezone.now() + timedelta(days=10))
    lst = listing(m, gpus=4, start_h=24, hours=24, price="1.0000")
    bought = buy(m, lst)
    price = m.term.price_per_gpu_hour

    def seller_cancels():
        time.sleep(seller_delay)
        reservation_cancel(reservation=m.term, actor_label="seller")

    outcomes = run_together(
        lambda: reservation_cancel(reservation=bought, actor_label="buyer"), seller_cancels
    )

    assert outcomes == ["ok", "ok"]
    term = Reservation.objects.get(pk=m.term.pk)
    assert term.status == ReservationStatus.CANCELLED
    assert Reservation.objects.get(pk=bought.pk).status == ReservationStatus.CANCELLED
    assert live_rows(term) == [] and live_rows(bought) == []
    assert overlapping_live_pairs() == 0
    lst.refresh_from_db()
    full = period_total(
        price_per_gpu_hour=price, gpu_count=1, seconds=8 * 192 * 3600, currency="usd"
    )
    resold = period_total(
        price_per_gpu_hour=price, gpu_count=1, seconds=4 * 24 * 3600, currency="usd"
    )
    # Either way the window is no longer sold, and the seller (10 days' notice: all of it
    # back) is refunded the whole term: given back first, its cancellation counts the window;
    # the term ended first, the window is refunded when it comes back.
    assert lst.status == ListingStatus.RETURNED
    assert (lst.starts_at, lst.ends_at) == (m.start + 24 * H, m.start + 48 * H)
    unused = Decimal(term.cancellation["unused_amount"])
    assert unused in (full, full - resold)
    refunded = LedgerEntry.objects.filter(reservation=term, kind=LedgerKind.TERM_REFUND).aggregate(
        s=Sum("amount_minor")
    )["s"]
    assert refunded == int(full * 100)
    returned_credit = LedgerEntry.objects.filter(idempotency_key=f"resale-return:{lst.pk}")
    assert returned_credit.exists() == (unused == full - resold)


@pytest.mark.parametrize("round_", range(3))
def test_a_third_organisation_booking_while_a_buyer_gives_time_back_never_gets_the_gpus(round_):
    m = market()
    lst = listing(m, gpus=8, start_h=24, hours=24, price="1.0000")
    bought = buy(m, lst)
    third = OrganizationFactory()
    fund(third)

    def third_books():
        reservation_create(
            organization=third,
            gpu_model=m.model.slug,
            gpu_count=8,
            starts_at=m.start + 24 * H,
            ends_at=m.start + 48 * H,
            tier="on_demand",
            site=m.site.slug,
        )

    outcomes = run_together(
        lambda: reservation_cancel(reservation=bought, actor_label="buyer"), third_books
    )

    assert outcomes == ["ok", "not_available"]
    assert not Reservation.objects.filter(organization=third).exists()
    term = Reservation.objects.get(pk=m.term.pk)
    assert live_rows(term) == [(i, term.starts_at, term.ends_at) for i in range(8)]
    lst.refresh_from_db()
    assert lst.status == ListingStatus.RETURNED
    assert overlapping_live_pairs() == 0
