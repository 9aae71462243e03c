"""Races on real PostgreSQL between buyers of a listing and its seller (starting the term,
cancelling it, extending it): the locks and the exclusion constraint decide, and whatever the
order, no GPU is held twice and the seller never runs on a GPU it sold."""

import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from marketplace.models import (
    Allocation,
    ListingStatus,
    ResaleListing,
    Reservation,
    ReservationStatus,
)
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.services import reservation_provision_step
from marketplace.services.reservations import (
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from tests.factories import OrganizationFactory
from tests.marketplace.resale_helpers import (
    fund,
    listing,
    live_rows,
    market,
    overlapping_live_pairs,
)
from tests.races import run_together

pytestmark = pytest.mark.django_db(transaction=True)

H = timedelta(hours=1)


def buyer_of(m, lst, org=None):
    org = org or m.buyer

    def buy():
        reservation_create(
            organization=org,
            listing=lst,
            gpu_count=lst.gpu_count,
            starts_at=lst.starts_at,
            ends_at=lst.ends_at,
        )

    return buy


def test_many_buyers_race_for_one_listing_and_exactly_one_gets_it():
    m = market()
    lst = listing(m, gpus=4, start_h=24, hours=24, price="1.0000")
    buyers = [OrganizationFactory() for _ in range(8)]
    for org in buyers:
        fund(org)

    outcomes = run_together(*(buyer_of(m, lst, org) for org in buyers))

    assert sorted(outcomes) == ["listing_not_available"] * 7 + ["ok"]
    assert overlapping_live_pairs() == 0
    lst.refresh_from_db()
    assert lst.status == ListingStatus.SOLD
    assert Reservation.objects.filter(organization__in=buyers).count() == 1


@pytest.mark.parametrize("round_", range(3))
def test_the_seller_cancelling_while_a_buyer_buys_ends_one_way_or_the_other(round_):
    m = market(starts_at=timezone.now() + timedelta(days=10))
    lst = listing(m, gpus=4, start_h=24, hours=24, price="1.0000")
    price = m.term.price_per_gpu_hour

    outcomes = run_together(
        buyer_of(m, lst),
        lambda: reservation_cancel(reservation=m.term, actor_label="seller"),
    )

    assert outcomes[1] == "ok"  # the seller may always cancel
    term = Reservation.objects.get(pk=m.term.pk)
    lst.refresh_from_db()
    assert live_rows(term) == []
    assert overlapping_live_pairs() == 0
    full = (price * 8 * 192).quantize(Decimal("0.01"))
    if outcomes[0] == "ok":  # bought first: the buyer keeps it, the refund leaves it out
        assert lst.status == ListingStatus.SOLD
        assert len(live_rows(lst.buyer_reservation)) == 4
        resold = (price * 4 * 24).quantize(Decimal("0.01"))
        assert Decimal(term.cancellation["unused_amount"]) == full - resold
    else:  # cancelled first: the listing went with the term, nothing was sold
        assert outcomes[0] == "listing_not_available"
        assert lst.status == ListingStatus.WITHDRAWN
        assert not Reservation.objects.filter(organization=m.buyer).exists()
        assert Decimal(term.cancellation["unused_amount"]) == full


@pytest.mark.parametrize("round_", range(3))
def test_the_seller_extending_while_a_buyer_buys_the_tail_both_succeed(round_):
    m = market()
    end = m.term.ends_at
    lst = listing(m, gpus=2, start_h=7 * 24, hours=24, price="1.0000")  # the last day

    outcomes = run_together(
        buyer_of(m, lst),
        lambda: reservation_extend(
            reservation=m.term, new_ends_at=end + timedelta(days=2), actor_label="seller"
        ),
    )

    assert outcomes == ["ok", "ok"]
    assert overlapping_live_pairs() == 0
    term = Reservation.objects.get(pk=m.term.pk)
    assert term.ends_at == end + timedelta(days=2)
    rows = live_rows(term)
    new_end = end + timedelta(days=2)
    # Every GPU is the seller's from the old end on; the two sold for the last day are not.
    for index in range(8):
        assert any(i == index and lo <= end and hi == new_end for i, lo, hi in rows)
    assert not [r for r in rows if r[0] in (0, 1) and r[1] < end and r[2] > end - 24 * H]


@pytest.mark.parametrize("round_", range(4))
def test_the_term_starting_while_a_buyer_buys_its_first_hours_never_shares_a_gpu(round_):
    start = timezone.now().replace(microsecond=0) + timedelta(seconds=3)
    m = market(starts_at=start)
    lst = listing(m, gpus=3, start_h=0, hours=5, price="1.0000")
    driver = SimulatedDriver()

    def seller_starts():
        # Tries from just before the start until it is due (as the dispatcher does).
        while True:
            result = reservation_provision_step(
                reservation_id=m.term.pk, driver=driver, check_window=0
            )
            if result.outcome != "noop":
                return
            time.sleep(0.01)

    def buyer_at_the_last_moment():
        # From well before the start (the buyer usually wins) to right on it (the seller).
        delay = (start - timezone.now()).total_seconds() - (0.4, 0.15, 0.05, 0.0)[round_]
        time.sleep(max(delay, 0))
        buyer_of(m, lst)()

    outcomes = run_together(buyer_at_the_last_moment, seller_starts)

    assert outcomes[1] == "ok"
    assert outcomes[0] in ("ok", "listing_not_available")
    term = Reservation.objects.get(pk=m.term.pk)
    assert term.status == ReservationStatus.ACTIVE
    (node,) = term.connection["nodes"]
    running = set(node["gpu_indexes"])
    assert overlapping_live_pairs() == 0
    if outcomes[0] == "ok":
        bought = ResaleListing.objects.get(pk=lst.pk).buyer_reservation
        sold = {
            a.gpu.index for a in Allocation.objects.filter(reservation=bought).select_related("gpu")
        }
        assert sold == {0, 1, 2}
        assert running == {3, 4, 5, 6, 7}
    else:
        assert running == set(range(8))
