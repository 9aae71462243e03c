"""Resold time inside a curtailment's window carries the room its term took there: the buyer
gets a take for its GPUs over the hours it bought, the seller's is cut by as much, and a
buyer giving the time back gives the seller its take back. What the window counts as sold is
the load that runs there, whoever cancels.

The site's H100s draw 0.805 kW each at rated power (700 W × PUE 1.15)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection

from config.errors import NotAvailable
from marketplace.models import CurtailmentTake, ListingStatus, ResaleListing
from marketplace.services.curtailment import curtailment_announce, curtailment_replan
from marketplace.services.resale import listing_create
from marketplace.services.reservations import reservation_cancel, reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow
from tests.marketplace.resale_helpers import H, fund, overlapping_live_pairs

pytestmark = pytest.mark.django_db


@pytest.fixture
def window():
    """Four 8-GPU nodes; an interruptible 16 GPUs (12.88 kW) shed for a 1 kW call from 20 h
    to 30 h, so 11.88 kW is over-shed; then a seller's 8-GPU reserved term booked across the
    window (its take: 6.44 kW) and half of it listed for 22 h to 26 h."""
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    site = SiteFactory()
    make_nodes(site, model, 4, gpus=8)
    seller, buyer, other = OrganizationFactory(), OrganizationFactory(), OrganizationFactory()
    for org in (seller, buyer, other):
        fund(org)
    start = tomorrow()

    def book(org, *, gpus, lo, hi, tier="on_demand", **kw):
        return reservation_create(
            organization=org, gpu_model=model.slug, gpu_count=gpus, site=site.slug,
            starts_at=start + lo * H, ends_at=start + hi * H, tier=tier, **kw,
        )  # fmt: skip

    book(other, gpus=16, lo=10, hi=40, tier="interruptible")
    curtailment = curtailment_announce(
        site=site, shed_at=start + 20 * H, until=start + 30 * H,
        target_mw=Decimal("0.001"), reason="ERCOT EEA 1",
    )  # fmt: skip
    assert curtailment.headroom_kw == Decimal("11.880")
    term = book(seller, gpus=8, lo=0, hi=8 * 24, tier="reserved", term="1w")
    lst = listing_create(
        organization=seller, reservation=term, gpu_count=4,
        starts_at=start + 22 * H, ends_at=start + 26 * H, price_per_gpu_hour=Decimal("1.5000"),
    )  # fmt: skip
    bought = reservation_create(
        organization=buyer, listing=lst, gpu_count=4,
        starts_at=lst.starts_at, ends_at=lst.ends_at,
    )  # fmt: skip
    return {
        "start": start, "curtailment": curtailment, "term": term, "listing": lst,
        "bought": bought, "book": book, "other": other,
    }  # fmt: skip


def _sold_at(curtailment, at) -> Decimal:
    """What the window counts as sold at the instant `at` (placement's own function)."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT marketplace_curtailment_sold_kw(%s, %s, %s + interval '1 microsecond')",
            [curtailment.pk, at, at],
        )
        return cur.fetchone()[0]


def _takes(reservation) -> list[tuple[Decimal, timedelta, timedelta]]:
    start = reservation.starts_at
    return sorted(
        (t.kw, t.period.lower - start, t.period.upper - start)
        for t in CurtailmentTake.objects.filter(reservation=reservation)
        if not t.period.isempty
    )


def test_the_buyer_takes_its_share_of_the_sellers_room_for_the_hours_bought(window):
    c, term, bought, start = (window[k] for k in ("curtailment", "term", "bought", "start"))

    assert _takes(bought) == [(Decimal("3.220"), timedelta(0), 4 * H)]
    assert _takes(term) == [
        (Decimal("3.220"), 22 * H, 26 * H),
        (Decimal("6.440"), 20 * H, 22 * H),
        (Decimal("6.440"), 26 * H, 30 * H),
    ]
    # Still 8 GPUs' draw all through the window: sold once, not twice, not less.
    for hour in (20, 22, 25, 26, 29):
        assert _sold_at(c, start + hour * H) == Decimal("6.440"), hour
    assert overlapping_live_pairs() == 0


def test_a_cancelled_seller_term_leaves_the_buyers_draw_counted_as_sold(window):
    c, term, bought, start = (window[k] for k in ("curtailment", "term", "bought", "start"))

    reservation_cancel(reservation=term, actor_label="seller")

    # The buyer's 4 GPUs still run in the window; the term's room is given back around them.
    assert _sold_at(c, start + 23 * H) == Decimal("3.220")
    assert _sold_at(c, start + 21 * H) == Decimal("0")
    assert _takes(bought) == [(Decimal("3.220"), timedelta(0), 4 * H)]
    # 11.88 - 3.22 = 8.66 kW left while the buyer runs: 8 GPUs (6.44 kW), then 2 (1.61 kW),
    # but never 3 more (2.415 kW against the 2.22 left).
    book, other = window["book"], window["other"]
    assert book(other, gpus=8, lo=23, hi=24).gpu_count == 8
    with pytest.raises(NotAvailable) as refused:
        book(other, gpus=3, lo=23, hi=24)
    assert refused.value.code == "site_curtailed"
    assert _sold_at(c, start + 23 * H) == Decimal("9.660")
    assert book(other, gpus=2, lo=23, hi=24).gpu_count == 2
    assert _sold_at(c, start + 23 * H) == Decimal("11.270") <= c.headroom_kw


def test_a_buyer_giving_the_time_back_gives_the_seller_its_room_back(window):
    c, term, bought, start = (window[k] for k in ("curtailment", "term", "bought", "start"))

    reservation_cancel(reservation=bought, actor_label="buyer")  # before the window

    lst = ResaleListing.objects.get(pk=window["listing"].pk)
    assert lst.status == ListingStatus.RETURNED
    assert _takes(bought) == []
    for hour in (20, 22, 25, 29):
        assert _sold_at(c, start + hour * H) == Decimal("6.440"), hour
    # The term's own cancel then gives back all 8 GPUs' room, the returned hours included.
    reservation_cancel(reservation=term, actor_label="seller")
    for hour in (20, 22, 25, 29):
        assert _sold_at(c, start + hour * H) == Decimal("0"), hour


def test_a_replan_cuts_the_split_takes_to_the_new_window_without_merging_them(window):
    c, term, bought, start = (window[k] for k in ("curtailment", "term", "bought", "start"))

    c = curtailment_replan(
        curtailment=c, shed_at=c.shed_at, until=start + 32 * H,
        target_mw=c.target_mw, reason="ERCOT extended the call",
    )  # fmt: skip

    # The seller's hours after the sale run on to the new end; the sold hours stay split.
    assert _takes(term) == [
        (Decimal("3.220"), 22 * H, 26 * H),
        (Decimal("6.440"), 20 * H, 22 * H),
        (Decimal("6.440"), 26 * H, 32 * H),
    ]
    assert _takes(bought) == [(Decimal("3.220"), timedelta(0), 4 * H)]
    for hour in (20, 23, 27, 31):
        assert _sold_at(c, start + hour * H) == Decimal("6.440"), hour
