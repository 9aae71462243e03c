"""A re-plan that stretches or moves a curtailment's window over hours booked since the call:
what was sold there since the call was announced counts as sold (a take, on top of the
target), and gives its room back when it leaves; what was booked before the call is the call's
baseline (no take, nothing more shed for it). Resold hours there are taken by whoever holds
them. Draws as in test_curtailment_megawatts.py: 0.805 kW per H100 at abilene-1."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from config.errors import NotAvailable
from marketplace.models import Allocation, Curtailment, Reservation, ReservationStatus
from marketplace.services.curtailment import curtailment_replan
from marketplace.services.resale import listing_create
from marketplace.services.reservations import (
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from tests.factories import OrganizationFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    market,
    org,
    owner,
)
from tests.marketplace.resale_helpers import H, fund
from tests.marketplace.test_curtailment_megawatts import (  # noqa: F401
    _announce,
    _book,
    _run_together,
    _sold_at_most,
    _victims,
    fleet,
)
from tests.marketplace.test_resale_curtailment_takes import _sold_at, _takes, window  # noqa: F401

S = ReservationStatus
GPU_KW = Decimal("0.805")


def _stretch(curtailment, *, hours=3) -> Curtailment:
    return curtailment_replan(
        curtailment=curtailment,
        shed_at=curtailment.shed_at,
        until=curtailment.until + timedelta(hours=hours),
        target_mw=curtailment.target_mw,
        reason="ERCOT stretched the call",
    )


def _draw_at_once(reservations, curtailment) -> Decimal:
    """The most the given reservations' live GPUs draw at once in the window (from their
    allocations, not from the takes)."""
    lo, hi = curtailment.shed_at, curtailment.until
    periods = [
        (max(a.period.lower, lo), min(a.period.upper, hi))
        for a in Allocation.objects.filter(reservation__in=reservations, is_live=True)
        if a.period.lower < hi and a.period.upper > lo
    ]
    at_once = max((sum(1 for p in periods if p[0] <= t < p[1]) for t, _ in periods), default=0)
    return at_once * GPU_KW


@pytest.mark.django_db
def test_a_booking_in_the_new_hours_cancelled_after_the_replan_gives_its_room_back(
    fleet, market, org
):
    site, _ = market
    curtailment = _announce(site, mw="0.002")  # r2 (3.22 kW): 1.22 kW over, one GPU at once
    at = curtailment.until + timedelta(hours=1)
    booked = _book(org, tier="on_demand", gpus=1, start=at, hours=1)  # outside the window then
    assert not curtailment.takes.exists()

    curtailment = _stretch(curtailment)

    (take,) = curtailment.takes.filter(reservation=booked)
    assert (take.kw, take.period.lower, take.period.upper) == (GPU_KW, at, at + H)
    assert curtailment.headroom_kw == Decimal("1.220") and curtailment.short_kw == 0
    # Its GPU holds the room there: a second one would be over the call.
    with pytest.raises(NotAvailable) as refused:
        _book(org, tier="on_demand", gpus=1, start=at, hours=1)
    assert refused.value.code == "site_curtailed"

    reservation_cancel(reservation=booked, actor_label="customer")

    take.refresh_from_db()
    assert take.period.isempty  # had not begun: none of it is sold any more
    again = _book(org, tier="on_demand", gpus=1, start=at, hours=1)
    assert again.status == S.PENDING
    assert _sold_at_most(curtailment) == GPU_KW <= curtailment.headroom_kw
    with pytest.raises(NotAvailable):  # and still never two at once
        _book(org, tier="on_demand", gpus=1, start=at, hours=1)


@pytest.mark.django_db
def test_a_replan_sheds_for_what_was_sold_since_the_call_in_its_new_hours_not_for_the_baseline(
    fleet, market, org
):
    site, _ = market
    at = timezone.now() + timedelta(hours=8)  # after the window _announce makes (1 h to 7 h)
    baseline = _book(org, tier="on_demand", gpus=2, start=at, hours=1)  # before the call
    curtailment = _announce(site, mw="0.002")
    since = _book(org, tier="on_demand", gpus=2, start=at, hours=1)  # after it
    assert _victims(curtailment) == {fleet["r2"].pk}

    curtailment = _stretch(curtailment)

    # 2 kW + the 1.61 kW sold since = 3.61 kW: r2 (3.22) alone no longer covers it; the
    # fewest that do, cheapest first: r4 (1.61) and r2. The booking from before the call is
    # the call's baseline: counted too, 5.22 kW would have needed three.
    assert not curtailment.takes.filter(reservation=baseline).exists()
    (take,) = curtailment.takes.filter(reservation=since)
    assert (take.kw, take.period.lower, take.period.upper) == (Decimal("1.610"), at, at + H)
    assert _victims(curtailment) == {fleet["r2"].pk, fleet["r4"].pk}
    assert (curtailment.shed_kw, curtailment.short_kw, curtailment.headroom_kw) == (
        Decimal("4.830"),
        Decimal(0),
        Decimal("2.830"),
    )
    assert _draw_at_once([since], curtailment) == _sold_at_most(curtailment) == Decimal("1.610")
    # Left at that hour: 2.83 - 1.61 = 1.22 kW, one GPU.
    _book(org, tier="on_demand", gpus=1, start=at, hours=1)
    with pytest.raises(NotAvailable):
        _book(org, tier="on_demand", gpus=1, start=at, hours=1)


@pytest.mark.django_db
def test_a_replan_counts_as_sold_only_the_hours_an_extension_since_the_call_added(
    fleet, market, org
):
    site, _ = market
    at = timezone.now() + timedelta(hours=8)  # after the window _announce makes (1 h to 7 h)
    earlier = _book(org, tier="on_demand", gpus=1, start=at, hours=1)  # before the call
    curtailment = _announce(site, mw="0.002")
    reservation_extend(reservation=earlier, new_ends_at=at + 2 * H, actor_label="t")
    assert not curtailment.takes.exists()  # outside the window then

    curtailment = _stretch(curtailment)

    (take,) = curtailment.takes.filter(reservation=earlier)
    assert (take.kw, take.period.lower, take.period.upper) == (GPU_KW, at + H, at + 2 * H)
    # Its first hour is baseline: 1.22 kW left beside it, one GPU; in its second, none.
    _book(org, tier="on_demand", gpus=1, start=at, hours=1)
    with pytest.raises(NotAvailable):
        _book(org, tier="on_demand", gpus=1, start=at + H, hours=1)


@pytest.mark.django_db
def test_a_replan_over_resold_hours_gives_the_buyer_its_take_and_cuts_the_sellers(window):
    c, term, start = (window[k] for k in ("curtailment", "term", "start"))
    buyer = OrganizationFactory()
    fund(buyer)
    # Half the term resold from 32 h to 36 h: after the window (20 h to 30 h), so no take.
    lst = listing_create(
        organization=window["term"].organization, reservation=term, gpu_count=4,
        starts_at=start + 32 * H, ends_at=start + 36 * H, price_per_gpu_hour=Decimal("1.5000"),
    )  # fmt: skip
    later = reservation_create(
        organization=buyer, listing=lst, gpu_count=4, starts_at=lst.starts_at,
        ends_at=lst.ends_at,
    )  # fmt: skip
    assert _takes(later) == []

    c = curtailment_replan(
        curtailment=c, shed_at=c.shed_at, until=start + 40 * H,
        target_mw=c.target_mw, reason="ERCOT extended the call",
    )  # fmt: skip

    # The term was sold since the call: its hours to the new end are sold, its GPUs' draw
    # split with the buyer where it holds them (sold once, not twice).
    assert _takes(later) == [(Decimal("3.220"), timedelta(0), 4 * H)]
    assert [t for t in _takes(term) if t[1] >= 30 * H] == [
        (Decimal("3.220"), 32 * H, 36 * H),
        (Decimal("6.440"), 30 * H, 32 * H),
        (Decimal("6.440"), 36 * H, 40 * H),
    ]
    for hour in (21, 23, 29, 31, 33, 37, 39):
        assert _sold_at(c, start + hour * H) == Decimal("6.440"), hour

    # The seller's cancel gives back the term's room; the buyer's GPUs still run and stay sold.
    reservation_cancel(reservation=term, actor_label="seller")
    assert _sold_at(c, start + 33 * H) == Decimal("3.220")
    assert _sold_at(c, start + 37 * H) == Decimal("0")


# --- Races ------------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_replan_racing_a_booking_for_its_new_hours_never_oversells(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw="0.002")
    at = curtailment.until + timedelta(hours=1)
    since = _book(org, tier="on_demand", gpus=2, start=at, hours=1)  # sold since the call

    def replan():
        return _stretch(curtailment)

    def book():
        return _book(org, tier="on_demand", gpus=1, start=at, hours=1)

    replanned, booked = _run_together(replan, book)

    assert isinstance(replanned, Curtailment), replanned
    sold = [since]
    if isinstance(booked, Reservation):  # before the re-plan (then shed for), or after (a take)
        sold.append(booked)
    else:
        assert isinstance(booked, NotAvailable), booked
    replanned.refresh_from_db()
    assert _sold_at_most(replanned) == _draw_at_once(sold, replanned) <= replanned.headroom_kw
    assert replanned.short_kw == 0


@pytest.mark.django_db(transaction=True)
def test_a_replan_racing_a_cancel_in_its_new_hours_never_oversells_nor_keeps_its_room(
    fleet, market, org
):
    site, _ = market
    curtailment = _announce(site, mw="0.002")
    at = curtailment.until + timedelta(hours=1)
    leaving = _book(org, tier="on_demand", gpus=2, start=at, hours=1)
    staying = _book(org, tier="on_demand", gpus=1, start=at, hours=1)

    def replan():
        return _stretch(curtailment)

    def cancel():
        return reservation_cancel(reservation=leaving, actor_label="customer")

    replanned, cancelled = _run_together(replan, cancel)

    assert isinstance(replanned, Curtailment), replanned
    assert isinstance(cancelled, Reservation) and cancelled.status == S.CANCELLED, cancelled
    replanned.refresh_from_db()
    # Whichever came first, the cancelled booking holds no room from then on, and what stays
    # sold is the booking that stays.
    assert not [t for t in replanned.takes.filter(reservation=leaving) if not t.period.isempty]
    assert _sold_at_most(replanned) == _draw_at_once([staying], replanned) == GPU_KW
    assert _sold_at_most(replanned) <= replanned.headroom_kw
