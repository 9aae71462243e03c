"""The SLA measures a reserved term over its own time only: a window it sold whole (every GPU
the buyer's) is neither its measured time nor its downtime, whatever outage of its runs
through it; the buyer, who holds the GPUs then, is measured and credited for it instead. The
seller's outages outside its sold windows, and in a window it sold only part of, still count
(docs/money.md; billing.services.credits)."""

from datetime import UTC, date, datetime, timedelta

import pytest

from billing.models import LedgerEntry, LedgerKind
from billing.services.credits import reservation_month_uptime, sla_credit_issue
from billing.services.usage import reservation_meter
from inventory.models import Outage, OutageCause
from marketplace.models import Reservation, ReservationOutage, ReservationStatus
from marketplace.provisioning.services import (
    WORKLOAD_LOST_CAUSE,
    reservation_outages_close_for_node,
    reservation_outages_record_for_node,
)
from tests.marketplace.resale_helpers import H, buy, listing, market, time_passes

pytestmark = pytest.mark.django_db

S = datetime(2026, 3, 2, 10, tzinfo=UTC)  # the term's start: its 8 days lie in March
MARCH = date(2026, 3, 1)
SETTLED = datetime(2026, 5, 1, tzinfo=UTC)
DAY = 24 * H


def _seconds(delta: timedelta) -> int:
    return int(delta.total_seconds())


def _sold(*, gpus=8, nodes=1, node_gpus=8, start_h=24, hours=48, then=None):
    """The seller's 8-GPU term (8 days from S, charged, running from S) with `gpus` GPUs of
    its first node sold for [S + start_h, + hours) to the buyer, who runs from the window's
    start; `then`: (GPUs, start_h, hours) of a second sale there, booked and running alike."""
    m = market(gpus=node_gpus, nodes=nodes)
    sales = [(gpus, start_h, hours), *([then] if then else [])]
    bought = []
    for n, h, length in sales:
        lst = listing(m, gpus=n, start_h=h, hours=length, node=m.node.hostname)
        bought.append(buy(m, lst, start_h=h, hours=length))
    time_passes(m.start - S)
    Reservation.objects.filter(pk=m.term.pk).update(status=ReservationStatus.ACTIVE, activated_at=S)
    for reservation, (_, h, _) in zip(bought, sales, strict=True):
        Reservation.objects.filter(pk=reservation.pk).update(
            status=ReservationStatus.ACTIVE, activated_at=S + h * H
        )
    reservation_meter(reservation_id=m.term.pk)  # the term, charged up front
    return m, Reservation.objects.get(pk=m.term.pk), Reservation.objects.get(pk=bought[0].pk)


def _node_down(node, start, end) -> None:
    """A node outage as provisioning records it: on whoever it serves at its start, closed at
    its end."""
    outage = Outage.objects.create(
        node=node, started_at=start, cause=OutageCause.HARDWARE_FAILURE, detail="PSU"
    )
    reservation_outages_record_for_node(
        node=node, started_at=start, cause=outage.cause, source_outage=outage, now=start
    )
    Outage.objects.filter(pk=outage.pk).update(ended_at=end)
    reservation_outages_close_for_node(node=node, ended_at=end)


def _uptime(reservation) -> tuple[int, int]:
    return reservation_month_uptime(
        reservation=Reservation.objects.get(pk=reservation.pk), month=MARCH, now=SETTLED
    )


def _sla_credits(reservation) -> int:
    return sum(
        LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.SLA_CREDIT).values_list(
            "amount_minor", flat=True
        )
    )


def test_a_node_outage_running_into_a_window_the_term_sold_whole_is_down_only_until_it():
    m, term, bought = _sold()
    _node_down(m.node, S + 20 * H, S + 30 * H)  # hits the term at 20 h, the buyer's from 24 h

    assert ReservationOutage.objects.filter(reservation=term).count() == 1
    # Measured: 8 days less the 2 sold; down: 20 h to the window's start, not to 30 h.
    assert _uptime(term) == (_seconds(6 * DAY), _seconds(4 * H))
    # The buyer holds the GPUs from 24 h: its own 6 h of the outage, over its 48 h.
    assert _uptime(bought) == (_seconds(48 * H), _seconds(6 * H))


def test_a_lost_workload_through_a_sold_window_is_credited_to_the_buyer_only():
    m, term, bought = _sold()
    # The term's workload lost at 23 h: every GPU is the buyer's from 24 h, so it is active
    # again only after the window (72 h), when its GPUs are back.
    ReservationOutage.objects.create(
        reservation=term, node=m.node, started_at=S + 23 * H, ended_at=S + 73 * H,
        cause=WORKLOAD_LOST_CAUSE,
    )  # fmt: skip
    _node_down(m.node, S + 30 * H, S + 31 * H)  # the buyer's hour
    reservation_meter(reservation_id=bought.pk, now=S + 72 * H)  # the buyer pays the seller

    assert _uptime(term) == (_seconds(6 * DAY), _seconds(2 * H))
    assert _uptime(bought) == (_seconds(48 * H), _seconds(H))
    term_credit = sla_credit_issue(reservation_id=term.pk, month=MARCH, now=SETTLED)
    buyer_credit = sla_credit_issue(reservation_id=bought.pk, month=MARCH, now=SETTLED)

    # The term: 2918.40 charged, 564.00 of proceeds less 56.40 of fees back: 2410.80 net;
    # 2 h down of 144 h (98.61 %) → 25 %, not 100 % for 50 h "down" of 192 h, 48 of them sold.
    assert term_credit.amount_minor == 60270
    assert "(7200 s down of 518400 s) → 25 % of 2410.80" in term_credit.description
    # The buyer: 1 h down of its 48 (97.92 %) → 25 % of the 564.00 it paid.
    assert buyer_credit.amount_minor == 14100
    assert _sla_credits(term) == 60270 and _sla_credits(bought) == 14100


def test_a_sellers_outage_outside_its_sold_windows_still_counts_in_full():
    m, term, _bought = _sold()
    _node_down(m.node, S + 4 * H, S + 6 * H)
    ReservationOutage.objects.create(
        reservation=term, node=m.node, started_at=S + 100 * H, ended_at=S + 101 * H,
        cause=WORKLOAD_LOST_CAUSE,
    )  # fmt: skip

    assert _uptime(term) == (_seconds(6 * DAY), _seconds(3 * H))


def test_a_window_sold_in_part_is_still_the_terms_time_and_its_outage_counts():
    m, term, bought = _sold(gpus=4)  # it keeps 4 GPUs on the node through the window
    _node_down(m.node, S + 20 * H, S + 30 * H)

    assert _uptime(term) == (_seconds(8 * DAY), _seconds(10 * H))
    assert _uptime(bought) == (_seconds(48 * H), _seconds(6 * H))


def test_a_node_outage_through_a_node_the_term_sold_whole_stops_at_the_window():
    # 8 GPUs over two 4-GPU nodes; the first node's 4 sold: the term runs on the second.
    m, term, bought = _sold(gpus=4, nodes=2, node_gpus=4)
    _node_down(m.node, S + 20 * H, S + 30 * H)

    assert ReservationOutage.objects.filter(reservation=term, node=m.node).count() == 1
    assert _uptime(term) == (_seconds(8 * DAY), _seconds(4 * H))
    assert _uptime(bought) == (_seconds(48 * H), _seconds(6 * H))


def test_only_the_time_every_gpu_is_sold_is_left_out_of_the_terms_measure():
    # 4 GPUs sold from 24 h to 72 h, the other 4 from 48 h to 96 h.
    m, term, _bought = _sold(gpus=4, then=(4, 48, 48))
    ReservationOutage.objects.create(
        reservation=term, node=m.node, started_at=S + 40 * H, ended_at=S + 80 * H,
        cause=WORKLOAD_LOST_CAUSE,
    )  # fmt: skip

    # Sold whole only from 48 h to 72 h: the rest of the outage is the term's.
    assert _uptime(term) == (_seconds(8 * DAY - 24 * H), _seconds(16 * H))
