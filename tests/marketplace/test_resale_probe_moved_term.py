"""A seller's term moved off the GPUs it holds (its node failed while it was being
provisioned, or a GPU failed): the windows it sold stay its buyer's, and its open listings of
the GPUs it left are withdrawn rather than offered when they can never be sold."""

import pytest
from django.db import transaction
from django.utils import timezone

from config.errors import NotAvailable
from inventory.models import Gpu, GpuHealth, Node, NodeStatus
from marketplace.models import (
    Allocation,
    Event,
    ListingStatus,
    Reservation,
    ReservationStatus,
)
from marketplace.provisioning.services import reservation_reallocate
from marketplace.selectors.resale import resale_offer_rows
from marketplace.services.gpu_failures import reservation_gpu_failure_handle
from tests.marketplace.market_helpers import make_nodes
from tests.marketplace.resale_helpers import H, buy, listing, market, overlapping_live_pairs

pytestmark = pytest.mark.django_db


def _gpus_held(term, at) -> int:
    return (
        Allocation.objects.filter(reservation=term, is_live=True, period__contains=at)
        .values("gpu_id")
        .distinct()
        .count()
    )


def _offered(lst) -> bool:
    offers = resale_offer_rows(
        gpu_count=1, starts_at=lst.starts_at, ends_at=lst.ends_at, tier=lst.tier
    )
    return lst.pk in [o.pk for o in offers]


def test_a_term_moved_off_a_failed_node_is_not_given_back_the_window_it_sold():
    m = market()
    make_nodes(m.site, m.model, 2, gpus=8)  # room to move to
    sold = listing(m, gpus=4, start_h=24, hours=24)
    bought = buy(m, sold)
    unsold = listing(m, gpus=4, start_h=60, hours=10)
    Reservation.objects.filter(pk=m.term.pk).update(status=ReservationStatus.PROVISIONING)
    Node.objects.filter(pk=m.node.pk).update(status=NodeStatus.MAINTENANCE)

    with transaction.atomic():
        locked = Reservation.objects.select_for_update().get(pk=m.term.pk)
        assert reservation_reallocate(reservation=locked, node=m.node, now=timezone.now()) == 8

    # Before and after the sold window the term holds its 8 GPUs elsewhere; in it only the 4
    # it did not sell: the other 4 are the buyer's (still on the old node until its own move).
    assert _gpus_held(m.term, sold.starts_at - H) == 8
    assert _gpus_held(m.term, sold.starts_at + 2 * H) == 4
    assert _gpus_held(m.term, sold.ends_at + H) == 8
    assert _gpus_held(bought, sold.starts_at + 2 * H) == 4
    assert not Allocation.objects.filter(reservation=m.term, node=m.node, is_live=True).exists()
    assert overlapping_live_pairs() == 0
    # Its open listing named GPUs of the old node: withdrawn (one event), not offered when the
    # node is back in service; the sale stands.
    unsold.refresh_from_db()
    assert unsold.status == ListingStatus.WITHDRAWN and unsold.withdrawn_at is not None
    assert Event.objects.filter(type="listing.withdrawn", object_id=unsold.public_id).count() == 1
    Node.objects.filter(pk=m.node.pk).update(status=NodeStatus.AVAILABLE)
    assert not _offered(unsold)
    sold.refresh_from_db()
    assert sold.status == ListingStatus.SOLD
    # The time is listable again on the GPUs the term holds now.
    again = listing(m, gpus=4, start_h=60, hours=10)
    assert again.node_id != m.node.pk


def test_a_term_with_no_room_for_its_own_hours_is_not_moved():
    m = market()
    make_nodes(m.site, m.model, 1, gpus=4)  # room for the 4 unsold GPUs only, not 8
    sold = listing(m, gpus=4, start_h=24, hours=24)
    buy(m, sold)
    Reservation.objects.filter(pk=m.term.pk).update(status=ReservationStatus.PROVISIONING)
    Node.objects.filter(pk=m.node.pk).update(status=NodeStatus.MAINTENANCE)
    before = sorted(
        Allocation.objects.filter(reservation=m.term).values_list("gpu_id", "period", "is_live")
    )

    with pytest.raises(NotAvailable), transaction.atomic():
        locked = Reservation.objects.select_for_update().get(pk=m.term.pk)
        reservation_reallocate(reservation=locked, node=m.node, now=timezone.now())

    after = sorted(
        Allocation.objects.filter(reservation=m.term).values_list("gpu_id", "period", "is_live")
    )
    assert after == before


def test_an_open_listing_of_a_failed_gpu_is_withdrawn_when_the_term_moves_off_it():
    m = market()
    make_nodes(m.site, m.model, 1, gpus=8)
    lst = listing(m, gpus=2, start_h=24, hours=24)
    Gpu.objects.filter(pk=lst.gpu_ids[0]).update(health=GpuHealth.FAILED)

    assert reservation_gpu_failure_handle(reservation_id=m.term.pk) == "moved"

    lst.refresh_from_db()
    assert lst.status == ListingStatus.WITHDRAWN
    assert Event.objects.filter(type="listing.withdrawn", object_id=lst.public_id).count() == 1
    Gpu.objects.filter(pk=lst.gpu_ids[0]).update(health=GpuHealth.OK)  # repaired
    assert not _offered(lst)
