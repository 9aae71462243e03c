"""A node's outage counts against a reservation only while that reservation was on the node:
the overlap of the outage with the reservation's allocation on it, not every reservation that
ever had an allocation there."""

from datetime import timedelta
from decimal import Decimal

import pytest
from psycopg.types.range import Range

from billing.models import LedgerEntry, LedgerKind
from billing.services.credits import reservation_month_uptime
from billing.services.usage import reservation_delivered_seconds, reservation_meter
from inventory.models import Outage, OutageCause
from marketplace.models import Allocation, ReservationStatus, Tier
from marketplace.provisioning.services import allocations_end
from marketplace.services.resale import listing_create
from marketplace.services.reservations import reservation_create
from tests.billing.conftest import T0, make_reservation
from tests.factories import NodeFactory
from tests.marketplace.resale_helpers import market

pytestmark = pytest.mark.django_db

HOUR = T0 + timedelta(hours=1)


def minutes(n: int):
    return T0 + timedelta(minutes=n)


def move(reservation, *, at, to):
    """What a move does to the record: the allocation on the old node is cut to `at` (or,
    not begun yet, ended as it was) and a live one on `to` serves from then on."""
    old = Allocation.objects.filter(reservation=reservation, is_live=True)
    allocations_end(old, now=at)
    for gpu in to.gpus.order_by("index")[: reservation.gpu_count]:
        Allocation.objects.create(
            reservation=reservation, gpu=gpu, node=to,
            period=Range(max(at, reservation.starts_at), reservation.ends_at, "[)"),
        )  # fmt: skip


def node_down(node, start, end):
    Outage.objects.create(node=node, started_at=start, ended_at=end,
                          cause=OutageCause.HARDWARE_FAILURE)  # fmt: skip


def metered_seconds(reservation, now):
    reservation_meter(reservation_id=reservation.pk, now=now)
    return sum(
        LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.USAGE).values_list(
            "gpu_seconds", flat=True
        )
    )


@pytest.fixture
def nodes():
    a = NodeFactory(gpus=8)
    return a, NodeFactory(gpus=8, site=a.site, gpu_model=a.gpu_model)


def test_a_reservation_moved_off_a_node_before_its_outage_is_billed_in_full(org, nodes):
    a, b = nodes
    reservation = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0,
                                   node=a)  # fmt: skip
    move(reservation, at=minutes(20), to=b)
    node_down(a, minutes(30), minutes(45))

    assert metered_seconds(reservation, HOUR) == 3600
    assert reservation_delivered_seconds(reservation=reservation, until=HOUR) == 3600


def test_a_reservation_moved_during_the_outage_is_spared_only_the_overlap(org, nodes):
    a, b = nodes
    reservation = make_reservation(org, gpu_count=2, price=Decimal("3.6000"), activated_at=T0,
                                   node=a)  # fmt: skip
    node_down(a, minutes(30), minutes(45))
    move(reservation, at=minutes(35), to=b)

    # On A from 30 to 35 while it was down: 5 minutes of 2 GPUs not billed.
    assert metered_seconds(reservation, HOUR) == 2 * (3600 - 300)
    assert reservation_delivered_seconds(reservation=reservation, until=HOUR) == 3600 - 300


def test_a_reservation_moved_onto_a_node_after_its_outage_is_billed_in_full(org, nodes):
    a, b = nodes
    reservation = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0,
                                   node=b)  # fmt: skip
    node_down(a, minutes(10), minutes(25))
    move(reservation, at=minutes(40), to=a)

    assert metered_seconds(reservation, HOUR) == 3600


def test_an_allocation_ended_before_it_began_does_not_count_an_outage(org, nodes):
    # Moved while scheduled (a GPU failed before the start): it never ran on A.
    a, b = nodes
    reservation = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), node=a,
                                   status=ReservationStatus.SCHEDULED)  # fmt: skip
    move(reservation, at=T0 - timedelta(hours=1), to=b)
    type(reservation).objects.filter(pk=reservation.pk).update(
        status=ReservationStatus.ACTIVE, activated_at=T0
    )
    reservation.refresh_from_db()
    node_down(a, minutes(30), minutes(45))

    assert metered_seconds(reservation, HOUR) == 3600


def test_the_reservation_still_on_the_node_is_spared_the_whole_outage(org, nodes):
    a, b = nodes
    moved = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0, node=a)
    move(moved, at=minutes(20), to=b)
    # On the GPU `moved` left, from the start (its allocation there is a record now).
    stayed = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0, node=a)
    node_down(a, minutes(30), minutes(45))

    assert metered_seconds(stayed, HOUR) == 3600 - 900
    assert metered_seconds(moved, HOUR) == 3600


def test_the_sla_credit_counts_an_outage_only_while_the_term_was_on_the_node(org, nodes):
    a, b = nodes
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, activated_at=T0, node=a,
                            hours=24)  # fmt: skip
    node_down(a, minutes(30), minutes(90))
    move(term, at=minutes(60), to=b)
    node_down(a, minutes(120), minutes(180))  # after the move: not the term's

    end = T0 + timedelta(hours=24)
    assert reservation_month_uptime(reservation=term, month=T0.date(), now=end) == (86400, 1800)


def test_the_sla_credit_leaves_out_an_outage_in_a_window_the_term_sold(org):
    m = market(gpus=2, term_gpus=2)
    sale_start, sale_end = m.start + timedelta(hours=24), m.start + timedelta(hours=48)
    listing = listing_create(organization=m.seller, reservation=m.term, gpu_count=2,
                             starts_at=sale_start, ends_at=sale_end,
                             price_per_gpu_hour=Decimal("1.0000"))  # fmt: skip
    reservation_create(organization=m.buyer, listing=listing, gpu_count=2,
                       starts_at=sale_start, ends_at=sale_end)  # fmt: skip
    type(m.term).objects.filter(pk=m.term.pk).update(activated_at=m.start)
    m.term.refresh_from_db()
    node_down(m.node, sale_start + timedelta(hours=1), sale_start + timedelta(hours=3))  # sold
    node_down(m.node, m.start + timedelta(hours=2), m.start + timedelta(hours=3))  # its own

    now = m.start + timedelta(days=3)
    # Summed over the months the three days fall in (they may cross a month's end).
    months = sorted({m.start.date().replace(day=1), now.date().replace(day=1)})
    measured = [reservation_month_uptime(reservation=m.term, month=mo, now=now) for mo in months]
    uptime = tuple(map(sum, zip(*measured, strict=True)))
    assert uptime == (2 * 86400, 3600)  # the day sold whole is not the term's to measure
