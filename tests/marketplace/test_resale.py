"""Resale of reserved time: listing, search, the transfer a buyer's booking makes, withdrawal,
and what the seller's term keeps (extending, cancelling, its provisioning placement)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from config.errors import Conflict, InvalidTransition, NotAvailable, NotFound, ValidationFailed
from marketplace.models import (
    Allocation,
    ListingStatus,
    ResaleFee,
    ResaleListing,
    Reservation,
    ReservationStatus,
)
from marketplace.selectors.availability import AvailabilityQuery, availability_search
from marketplace.services.resale import listing_create, listing_withdraw
from marketplace.services.reservations import (
    cancellation_terms,
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from marketplace.services.transitions import reservation_allowed_actions
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import make_nodes
from tests.marketplace.resale_helpers import (
    FLOOR,
    H,
    buy,
    fund,
    listing,
    live_rows,
    market,
    overlapping_live_pairs,
    time_passes,
    time_passes_until,
)

pytestmark = pytest.mark.django_db


def snapshot():
    """Everything a refused request must leave as it was."""
    return (
        sorted(Allocation.objects.values_list("reservation_id", "gpu_id", "period", "is_live")),
        sorted(
            ResaleListing.objects.values_list(
                "public_id", "status", "gpu_count", "starts_at", "ends_at"
            )
        ),
        Reservation.objects.count(),
    )


# --- listing ------------------------------------------------------------------------------


def test_a_holder_lists_whole_gpus_of_one_node_for_a_future_window():
    m = market()

    lst = listing(m, gpus=4)

    assert lst.status == ListingStatus.OPEN
    assert lst.gpu_count == 4 and lst.node == m.node
    assert lst.price_per_gpu_hour == Decimal("1.5000") and lst.currency == "usd"
    # The first four GPUs of the node, by index; the seller still holds them until sold.
    assert sorted(g.index for g in m.node.gpus.filter(pk__in=lst.gpu_ids)) == [0, 1, 2, 3]
    assert len(live_rows(m.term)) == 8


@pytest.mark.parametrize(
    ("kwargs", "code", "field"),
    [
        ({"start_h": -1, "hours": 5}, "window_outside_term", "starts_at"),
        ({"start_h": 190, "hours": 5}, "window_outside_term", "ends_at"),
        ({"price": "0.0371"}, "price_below_floor", "price_per_gpu_hour"),
        ({"price": "0"}, "invalid_price", "price_per_gpu_hour"),
        ({"price": "1.00001"}, "invalid_price", "price_per_gpu_hour"),
        ({"tier": "reserved"}, "invalid_tier", "tier"),
        ({"hours": 0}, "period_invalid", "ends_at"),
        ({"hours": 0.01}, "period_too_short", "ends_at"),  # 36 s
        ({"gpus": 0}, "invalid", "gpu_count"),
        ({"node": "no-such-node"}, "unknown_node", "node"),
    ],
)
def test_bad_listings_are_refused_and_change_nothing(kwargs, code, field):
    m = market()
    before = snapshot()

    with pytest.raises(ValidationFailed) as error:
        listing(m, **kwargs)

    assert (error.value.code, error.value.field) == (code, field)
    assert snapshot() == before


def test_the_floor_is_the_energy_cost_plus_margin_and_a_price_on_it_is_accepted():
    m = market()
    assert listing(m, price=str(FLOOR)).price_per_gpu_hour == FLOOR


def test_a_window_that_has_started_cannot_be_listed():
    m = market(starts_at=timezone.now().replace(microsecond=0) + timedelta(minutes=1))
    time_passes(timedelta(hours=2))
    m.term.refresh_from_db()
    before = snapshot()
    with pytest.raises(ValidationFailed) as error:
        listing(m, start_h=1, hours=5)  # began an hour ago
    assert error.value.code == "window_started"
    assert snapshot() == before


def test_only_the_holder_can_list_its_term():
    m = market()
    before = snapshot()
    with pytest.raises(NotFound):
        listing_create(
            organization=m.buyer,
            reservation=m.term,
            gpu_count=1,
            starts_at=m.start + 24 * H,
            ends_at=m.start + 48 * H,
            price_per_gpu_hour=Decimal("1.0000"),
        )
    assert snapshot() == before


def test_only_a_reserved_term_can_be_listed():
    m = market()
    # The node is taken by the term; give the seller an on-demand reservation on another.
    make_nodes(m.site, m.model, 1, gpus=2)
    on_demand = reservation_create(
        organization=m.seller,
        gpu_model=m.model.slug,
        gpu_count=1,
        starts_at=m.start,
        ends_at=m.start + 48 * H,
        tier="on_demand",
        site=m.site.slug,
    )
    before = snapshot()
    with pytest.raises(Conflict) as error:
        listing_create(
            organization=m.seller,
            reservation=on_demand,
            gpu_count=1,
            starts_at=m.start + 24 * H,
            ends_at=m.start + 30 * H,
            price_per_gpu_hour=Decimal("1.0000"),
        )
    assert error.value.code == "not_reserved_term"
    assert snapshot() == before


def test_gpus_already_listed_for_an_overlapping_window_cannot_be_listed_again():
    m = market()
    listing(m, gpus=6)
    before = snapshot()

    with pytest.raises(Conflict) as error:
        listing(m, gpus=3, start_h=40, hours=24)  # overlaps; only 2 GPUs are left unlisted

    assert error.value.code == "not_enough_gpus"
    assert snapshot() == before
    # Two are still free to list, and a window after the first is free again.
    assert listing(m, gpus=2, start_h=40, hours=24).gpu_count == 2
    assert listing(m, gpus=8, start_h=64, hours=24).gpu_count == 8


# --- search -------------------------------------------------------------------------------


def test_listed_time_is_offered_in_search_marked_as_resale_at_its_asking_price():
    m = market()
    lst = listing(m, gpus=4, price="0.9000")

    offers = availability_search(
        AvailabilityQuery(
            gpu_count=2,
            starts_at=m.start + 30 * H,
            ends_at=m.start + 40 * H,
            tier="on_demand",
            gpu_model=m.model.slug,
            include_resale=True,
        )
    )

    (offer,) = offers  # the only node is the seller's: no other capacity
    assert offer.listing == lst
    assert offer.price_per_gpu_hour == Decimal("0.9000")
    assert offer.total == Decimal("18.00")  # 0.90 × 2 GPUs × 10 h
    assert offer.breakdown.rate_source == f"resale:{lst.public_id}"


@pytest.mark.parametrize(
    ("gpus", "start_h", "hours", "tier"),
    [
        (5, 30, 10, "on_demand"),  # more GPUs than listed
        (2, 20, 10, "on_demand"),  # starts before the window
        (2, 40, 10, "on_demand"),  # ends after it
        (2, 30, 10, "interruptible"),  # another tier
    ],
)
def test_search_offers_a_listing_only_for_what_it_can_sell(gpus, start_h, hours, tier):
    m = market()
    listing(m, gpus=4)
    offers = availability_search(
        AvailabilityQuery(
            gpu_count=gpus,
            starts_at=m.start + start_h * H,
            ends_at=m.start + (start_h + hours) * H,
            tier=tier,
            include_resale=True,
        )
    )
    assert [o for o in offers if o.listing is not None] == []


def test_search_leaves_out_withdrawn_listings_and_quotes_leave_out_resale():
    m = market()
    lst = listing(m, gpus=4)
    args = dict(gpu_count=1, starts_at=m.start + 30 * H, ends_at=m.start + 31 * H, tier="on_demand")
    assert (
        availability_search(AvailabilityQuery(**args)) == []
    )  # without include_resale: operator capacity only
    listing_withdraw(organization=m.seller, listing=lst)
    assert availability_search(AvailabilityQuery(**args, include_resale=True)) == []


# --- buying -------------------------------------------------------------------------------


def test_buying_moves_the_gpus_for_the_window_from_the_seller_to_the_buyer():
    m = market()
    lst = listing(m, gpus=2, price="1.2000")
    s, e = m.start + 24 * H, m.start + 48 * H

    bought = buy(m, lst)

    assert bought.organization == m.buyer
    assert (bought.tier, bought.price_per_gpu_hour, bought.total_amount) == (
        "on_demand",
        Decimal("1.2000"),
        Decimal("57.60"),  # 1.20 × 2 × 24 h
    )
    assert live_rows(bought) == [(0, s, e), (1, s, e)]
    seller_rows = live_rows(m.term)
    assert (0, m.term.starts_at, s) in seller_rows and (0, e, m.term.ends_at) in seller_rows
    assert not [r for r in seller_rows if r[0] in (0, 1) and r[1] < e and r[2] > s]
    assert len([r for r in seller_rows if r[0] >= 2]) == 6  # untouched
    # The sold piece stays on the seller's record, not live.
    assert Allocation.objects.filter(reservation=m.term, is_live=False).count() == 2
    assert overlapping_live_pairs() == 0
    lst.refresh_from_db()
    assert lst.status == ListingStatus.SOLD and lst.buyer_reservation == bought
    assert lst.fee_pct == Decimal("10")


def test_a_partial_sale_sells_part_and_leaves_the_rest_listed():
    m = market()
    ResaleFee.objects.create(fee_pct=Decimal("7.50"))
    lst = listing(m, gpus=4, start_h=24, hours=24)

    buy(m, lst, gpus=3, start_h=30, hours=6)

    lst.refresh_from_db()
    assert (lst.status, lst.gpu_count, lst.fee_pct) == ("sold", 3, Decimal("7.50"))
    assert (lst.starts_at, lst.ends_at) == (m.start + 30 * H, m.start + 36 * H)
    rest = sorted(
        (r.gpu_count, r.starts_at, r.ends_at)
        for r in ResaleListing.objects.filter(parent=lst, status="open")
    )
    assert rest == [
        (1, m.start + 30 * H, m.start + 36 * H),  # the GPU not taken, for the sold window
        (4, m.start + 24 * H, m.start + 30 * H),  # before it
        (4, m.start + 36 * H, m.start + 48 * H),  # after it
    ]
    # What is left can be bought too, by someone else.
    other = OrganizationFactory()
    fund(other)
    after = ResaleListing.objects.get(parent=lst, starts_at=m.start + 36 * H)
    buy(m, after, org=other, start_h=36, hours=12)
    assert overlapping_live_pairs() == 0


@pytest.mark.parametrize(
    ("change", "error", "code"),
    [
        ({"gpus": 5}, ValidationFailed, "too_many_gpus"),
        ({"start_h": 20}, ValidationFailed, "window_outside_listing"),
        ({"tier": "interruptible"}, ValidationFailed, None),
    ],
)
def test_a_purchase_that_does_not_fit_the_listing_is_refused(change, error, code):
    m = market()
    lst = listing(m, gpus=4)
    before = snapshot()
    with pytest.raises(error) as raised:
        buy(m, lst, **change)
    if code:
        assert raised.value.code == code
    assert snapshot() == before


def test_a_slice_of_a_listing_under_a_minute_cannot_be_bought():
    # A half-second slice was priced over zero seconds; a few seconds' slice cost nothing
    # and split the seller's listing (and its term) for free.
    m = market()
    lst = listing(m)
    before = snapshot()

    for hours in (0.5 / 3600, 30 / 3600):
        with pytest.raises(ValidationFailed) as error:
            buy(m, lst, gpus=1, hours=hours)
        assert (error.value.code, error.value.field) == ("period_too_short", "ends_at")

    assert snapshot() == before
    lst.refresh_from_db()
    assert lst.status == ListingStatus.OPEN


def test_a_seller_cannot_buy_its_own_listing_and_a_sold_one_cannot_be_bought_twice():
    m = market()
    lst = listing(m, gpus=2)
    with pytest.raises(Conflict) as error:
        buy(m, lst, org=m.seller)
    assert error.value.code == "own_listing"
    buy(m, lst)
    before = snapshot()
    other = OrganizationFactory()
    fund(other)
    with pytest.raises(NotAvailable) as error:
        buy(m, lst, org=other)
    assert error.value.code == "listing_not_available"
    assert snapshot() == before


def test_withdrawn_listings_cannot_be_bought_and_withdrawing_twice_is_harmless():
    m = market()
    lst = listing(m, gpus=2)
    listing_withdraw(organization=m.seller, listing=lst)
    assert listing_withdraw(organization=m.seller, listing=lst).status == "withdrawn"
    before = snapshot()
    with pytest.raises(NotAvailable):
        buy(m, lst)
    assert snapshot() == before


def test_a_sold_listing_cannot_be_withdrawn():
    m = market()
    lst = listing(m, gpus=2)
    buy(m, lst)
    with pytest.raises(Conflict) as error:
        listing_withdraw(organization=m.seller, listing=lst)
    assert error.value.code == "listing_sold"


# --- the seller's term afterwards ----------------------------------------------------------


def test_cancelling_the_term_withdraws_its_listings_and_refunds_only_what_was_not_resold():
    m = market(starts_at=timezone.now() + timedelta(days=10))
    lst = listing(m, gpus=4, start_h=24, hours=24)
    unsold = listing(m, gpus=4, start_h=60, hours=10)
    full = cancellation_terms(m.term).unused_amount
    buy(m, lst)

    terms = cancellation_terms(m.term)
    # 4 GPUs × 24 h resold at the term's price are not the seller's to give back.
    resold_share = (m.term.price_per_gpu_hour * 4 * 24).quantize(Decimal("0.01"))
    assert terms.unused_amount == full - resold_share
    reservation_cancel(reservation=m.term, actor_label="test")

    unsold.refresh_from_db()
    assert unsold.status == ListingStatus.WITHDRAWN
    # The buyer keeps the bought GPUs; the seller's are freed.
    bought = ResaleListing.objects.get(pk=lst.pk).buyer_reservation
    assert len(live_rows(bought)) == 4
    assert live_rows(m.term) == []


def test_bought_time_is_not_extended_at_the_sellers_price():
    """After the listing's window the GPUs are the operator's again: more time is a new
    booking at the operator's price, never the seller's asking price stretched on."""
    m = market()
    lst = listing(m, gpus=8, start_h=6 * 24, hours=24, price="0.0500")
    bought = buy(m, lst, start_h=6 * 24, hours=24)
    assert "extend" not in reservation_allowed_actions(bought)
    with pytest.raises(InvalidTransition) as refused:
        reservation_extend(
            reservation=bought, new_ends_at=bought.ends_at + timedelta(days=300),
            actor_label="test",
        )  # fmt: skip
    assert refused.value.code == "extend_not_allowed"
    bought.refresh_from_db()
    assert bought.ends_at == m.start + 7 * 24 * H and bought.total_amount == Decimal("9.60")


def test_extending_a_term_whose_tail_was_resold_gives_the_gpus_back_after_the_old_end():
    m = market()
    end = m.term.ends_at
    lst = listing(m, gpus=2, start_h=8 * 24 - 24, hours=24)  # the last day
    buy(m, lst, start_h=8 * 24 - 24, hours=24)

    extended = reservation_extend(
        reservation=m.term, new_ends_at=end + timedelta(days=1), actor_label="test"
    )

    rows = live_rows(extended)
    assert (0, end, end + timedelta(days=1)) in rows and (1, end, end + timedelta(days=1)) in rows
    assert (7, m.start, end + timedelta(days=1)) in rows
    assert overlapping_live_pairs() == 0
    assert (
        Allocation.objects.filter(reservation=extended, is_live=True)
        .values("gpu_id")
        .distinct()
        .count()
        == 8
    )


def test_the_term_provisions_only_on_gpus_it_holds_at_its_start():
    from marketplace.provisioning.drivers import SimulatedDriver
    from marketplace.provisioning.services import reservation_provision_step

    start = timezone.now().replace(microsecond=0) + timedelta(minutes=2)
    m = market(starts_at=start)
    lst = listing(m, gpus=3, start_h=0, hours=5)  # the term's first five hours
    buy(m, lst, start_h=0, hours=5)
    time_passes(timedelta(minutes=3))  # the term and the sold window have begun
    driver = SimulatedDriver()

    reservation_provision_step(reservation_id=m.term.pk, driver=driver, check_window=0)

    term = Reservation.objects.get(pk=m.term.pk)
    assert term.status == ReservationStatus.ACTIVE
    (node,) = term.connection["nodes"]
    assert node["gpu_indexes"] == [3, 4, 5, 6, 7]


# --- a running term at the edges of the windows it sold ------------------------------------


def _running_term(m):
    """The term provisioned now on the simulated driver (it is active)."""
    from marketplace.provisioning.drivers import SimulatedDriver
    from marketplace.provisioning.services import reservation_provision_step

    time_passes(timedelta(days=1, minutes=1))  # the term began a minute ago
    reservation_provision_step(reservation_id=m.term.pk, driver=SimulatedDriver(), check_window=0)
    term = Reservation.objects.get(pk=m.term.pk)
    assert term.status == ReservationStatus.ACTIVE
    return term


def _dispatch():
    from marketplace.provisioning.drivers import SimulatedDriver
    from marketplace.provisioning.scheduler import reservations_dispatch_due
    from marketplace.provisioning.services import reservation_provision_step

    counts = reservations_dispatch_due()
    for r in Reservation.objects.filter(status=ReservationStatus.PROVISIONING):
        reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver(), check_window=0)
    return counts


def _edge(listing_pk, *, end=False) -> None:
    """Time passes to just after the start (or end) of a sold window."""
    lst = ResaleListing.objects.get(pk=listing_pk)
    time_passes_until(lst.ends_at if end else lst.starts_at)


def _running_on(term) -> list[int]:
    term.refresh_from_db()
    return sorted(i for n in term.connection.get("nodes", []) for i in n["gpu_indexes"])


def test_a_running_term_leaves_the_gpus_it_sold_for_the_window_and_gets_them_back_after():
    m = market()
    lst = listing(m, gpus=3, start_h=26, hours=2)  # in two days' time, before the clock moves
    buy(m, lst, start_h=26, hours=2)
    term = _running_term(m)
    assert _running_on(term) == list(range(8))
    time_passes_until(ResaleListing.objects.get(pk=lst.pk).starts_at, past=-timedelta(seconds=5))
    assert _dispatch()["resold"] == 0  # not yet

    _edge(lst.pk)
    assert _dispatch()["resold"] == 1
    assert _running_on(term) == [3, 4, 5, 6, 7]
    assert term.status == ReservationStatus.ACTIVE
    assert _dispatch()["resold"] == 0  # done once

    _edge(lst.pk, end=True)
    assert _dispatch()["resold"] == 1
    assert _running_on(term) == list(range(8))
    moves = list(term.transitions.values_list("to_status", flat=True))
    assert moves.count("provisioning") == 3  # the start, and a restart at each edge
    assert overlapping_live_pairs() == 0


def test_a_running_term_that_sold_every_gpu_for_a_window_pauses_and_one_that_sold_its_rest_ends():
    m = market()
    first = listing(m, gpus=8, start_h=26, hours=2)
    buy(m, first, start_h=26, hours=2)
    tail = listing(m, gpus=8, start_h=7 * 24, hours=24)
    buy(m, tail, start_h=7 * 24, hours=24)
    term = _running_term(m)

    _edge(first.pk)
    assert _dispatch()["resold"] == 1
    term.refresh_from_db()
    assert (term.status, term.connection) == (ReservationStatus.ACTIVE, {})
    assert _dispatch()["resold"] == 0
    _edge(first.pk, end=True)
    assert _dispatch()["resold"] == 1
    assert _running_on(term) == list(range(8))

    _edge(tail.pk)
    assert _dispatch()["resold"] == 1
    term.refresh_from_db()
    assert term.status == ReservationStatus.RELEASING


def test_a_failed_gpu_whose_time_was_partly_resold_is_replaced_once():
    from inventory.models import Gpu, GpuHealth
    from marketplace.services.gpu_failures import reservation_gpu_failure_handle

    m = market()
    make_nodes(m.site, m.model, 1, gpus=8)  # somewhere to move to
    lst = listing(m, gpus=1, start_h=24, hours=24)
    buy(m, lst, gpus=1)
    failed = Gpu.objects.get(pk=lst.gpu_ids[0])  # the seller holds it before and after
    Gpu.objects.filter(pk=failed.pk).update(health=GpuHealth.FAILED)

    assert reservation_gpu_failure_handle(reservation_id=m.term.pk) == "moved"

    held = Allocation.objects.filter(reservation=m.term, is_live=True)
    assert held.values("gpu_id").distinct().count() == 8
    assert not held.filter(gpu=failed).exists()
    assert overlapping_live_pairs() == 0


def _agent_runs_jobs(nodes) -> list[tuple[int, str, int]]:
    """Each node's site agent does every job it is handed: (node id, reservation id, kind)."""
    from marketplace.provisioning.agent_jobs import agent_job_complete, agent_job_lease

    done = []
    for node in nodes:
        while (job := agent_job_lease(node=node)) is not None:
            result = {"host": node.hostname, "ssh_port": 22, "ports": {}}
            agent_job_complete(node=node, job_id=job.pk, lease_id=job.lease_owner, result=result)
            done.append((node.pk, job.reservation_id, job.kind))
    return done


def test_a_term_that_sold_a_whole_node_for_a_window_runs_on_the_other_and_gets_it_back():
    """Under the site agent: the node whose every GPU was sold gets a stop and no start while
    the window lasts, and a start again when it ends; the term is active throughout."""
    from marketplace.provisioning.drivers import SiteAgentDriver
    from marketplace.provisioning.scheduler import reservations_dispatch_due
    from marketplace.provisioning.services import reservation_provision_step

    m = market(gpus=4, term_gpus=8, nodes=2)
    nodes = sorted({a.node for a in Allocation.objects.filter(reservation=m.term)}, key=str)
    assert len(nodes) == 2
    sold_node, kept_node = nodes
    lst = listing(m, gpus=4, start_h=26, hours=2, node=sold_node.hostname)
    buy(m, lst, start_h=26, hours=2)
    driver = SiteAgentDriver()

    done = []

    def dispatch_and_provision():
        done.clear()
        counts = reservations_dispatch_due()
        for _ in range(3):
            for r in Reservation.objects.exclude(status=ReservationStatus.ACTIVE):
                reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0)
            done.extend(_agent_runs_jobs(nodes))
        return counts

    time_passes(timedelta(days=1, minutes=1))
    dispatch_and_provision()
    term = Reservation.objects.get(pk=m.term.pk)
    assert term.status == ReservationStatus.ACTIVE
    assert sorted(n["host"] for n in term.connection["nodes"]) == sorted(n.hostname for n in nodes)

    _edge(lst.pk)
    assert dispatch_and_provision()["resold"] == 1
    term.refresh_from_db()
    assert term.status == ReservationStatus.ACTIVE
    assert [n["host"] for n in term.connection["nodes"]] == [kept_node.hostname]
    jobs = term.agent_jobs.filter(generation=term.placement_generation)
    assert set(jobs.values_list("node_id", "kind")) == {
        (kept_node.pk, "prepare"),
        (kept_node.pk, "start"),
    }
    # The old container on the sold node was stopped, and only then the buyer's started there.
    buyer_r = Reservation.objects.get(organization=m.buyer)
    assert buyer_r.status == ReservationStatus.ACTIVE
    on_sold = [(r, kind) for node_id, r, kind in done if node_id == sold_node.pk]
    assert on_sold.index((term.pk, "stop")) < on_sold.index((buyer_r.pk, "start"))

    _edge(lst.pk, end=True)
    assert dispatch_and_provision()["resold"] == 1
    term.refresh_from_db()
    assert term.status == ReservationStatus.ACTIVE
    assert sorted(n["host"] for n in term.connection["nodes"]) == sorted(n.hostname for n in nodes)
    start = term.agent_jobs.get(node=sold_node, kind="start", generation=term.placement_generation)
    assert start.status == "done"


def test_a_piece_left_too_short_to_book_is_kept_by_the_seller_not_listed():
    """Bought from 30 s after the listing's start: the 30 s before it were listed on their own,
    a listing no booking could ever take (under RESERVATION_MIN_SECONDS)."""
    m = market()
    lst = listing(m, gpus=4, start_h=24, hours=24)

    buy(m, lst, gpus=4, start_h=24 + 30 / 3600, hours=6)

    rest = [
        (r.gpu_count, r.starts_at, r.ends_at)
        for r in ResaleListing.objects.filter(parent=lst, status="open")
    ]
    assert rest == [(4, m.start + 30 * H + timedelta(seconds=30), m.start + 48 * H)]
    assert overlapping_live_pairs() == 0
