"""A node failing while a term's GPUs on it are resold: the outage is the buyer's, who holds
them, not the seller's (no SLA downtime, so no credit, for hours it sold); a seller still
holding some of the node's GPUs is hit as any reservation."""

import pytest
from django.utils import timezone

from billing.services.credits import reservation_month_uptime
from marketplace.models import Reservation, ReservationOutage, ReservationStatus
from marketplace.provisioning.services import node_mark_failed, reservation_outages_reconcile
from tests.marketplace.resale_helpers import H, buy, listing, market, time_passes_until

pytestmark = pytest.mark.django_db


def _running_into_the_window(m, lst, bought):
    Reservation.objects.filter(pk__in=[m.term.pk, bought.pk]).update(
        status=ReservationStatus.ACTIVE, activated_at=m.start
    )
    time_passes_until(lst.starts_at + 2 * H)
    Reservation.objects.filter(pk=bought.pk).update(activated_at=timezone.now() - 2 * H)


def test_a_node_failing_in_a_window_sold_whole_is_the_buyers_outage_not_the_sellers():
    m = market()
    lst = listing(m, gpus=8, start_h=24, hours=24)  # every GPU of the term's only node
    bought = buy(m, lst)
    _running_into_the_window(m, lst, bought)

    node_mark_failed(node=m.node, reason="PSU failure")
    reservation_outages_reconcile()

    assert ReservationOutage.objects.filter(reservation=bought, ended_at=None).count() == 1
    assert not ReservationOutage.objects.filter(reservation=m.term).exists()
    term = Reservation.objects.get(pk=m.term.pk)
    now = timezone.now()
    _measured, down = reservation_month_uptime(reservation=term, month=now.date(), now=now)
    assert down == 0


def test_a_seller_still_holding_gpus_on_the_failed_node_is_hit():
    m = market()
    lst = listing(m, gpus=4, start_h=24, hours=24)
    bought = buy(m, lst)
    _running_into_the_window(m, lst, bought)

    node_mark_failed(node=m.node, reason="PSU failure")

    assert ReservationOutage.objects.filter(reservation=m.term, ended_at=None).count() == 1
    assert ReservationOutage.objects.filter(reservation=bought, ended_at=None).count() == 1
