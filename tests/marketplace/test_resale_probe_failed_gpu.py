"""A sale one of whose GPUs failed (seller and buyer each moved off it) and whose buyer then
leaves early: the healthy GPUs' time still goes back to the seller's term."""

import pytest
from django.utils import timezone

from inventory.models import Gpu, GpuHealth
from marketplace.models import Event, ListingStatus, Reservation
from marketplace.selectors.resale import sold_gpu_seconds
from marketplace.services.gpu_failures import reservation_gpu_failure_handle
from marketplace.services.reservations import reservation_cancel
from tests.marketplace.market_helpers import make_nodes
from tests.marketplace.resale_helpers import buy, listing, live_rows, market, overlapping_live_pairs

pytestmark = pytest.mark.django_db


def test_a_buyer_leaving_after_a_sold_gpu_failed_gives_back_the_healthy_ones():
    m = market()
    make_nodes(m.site, m.model, 1, gpus=8)  # somewhere to move to
    lst = listing(m, gpus=4, start_h=24, hours=24)
    bought = buy(m, lst)
    failed, *healthy = lst.gpu_ids
    Gpu.objects.filter(pk=failed).update(health=GpuHealth.FAILED)
    assert reservation_gpu_failure_handle(reservation_id=m.term.pk) == "moved"
    assert reservation_gpu_failure_handle(reservation_id=bought.pk) == "moved"

    reservation_cancel(reservation=bought, actor_label="buyer")  # before the window

    lst.refresh_from_db()
    assert lst.status == ListingStatus.RETURNED
    assert Event.objects.filter(type="listing.returned", object_id=lst.public_id).count() == 1
    term = Reservation.objects.get(pk=m.term.pk)
    # Each healthy GPU is the term's over its whole period again; the failed one stays gone
    # (the term holds its replacement), so the term holds its 8 GPUs throughout, not more.
    indexes = dict(Gpu.objects.filter(pk__in=lst.gpu_ids).values_list("pk", "index"))
    for gpu in healthy:
        assert (indexes[gpu], term.starts_at, term.ends_at) in live_rows(term)
    assert not term.allocations.filter(gpu_id=failed, is_live=True).exists()
    during = lst.starts_at + (lst.ends_at - lst.starts_at) / 2
    held = term.allocations.filter(is_live=True, period__contains=during)
    assert held.values("gpu_id").distinct().count() == term.gpu_count
    assert sold_gpu_seconds(reservation=term, since=timezone.now()) == 0
    assert overlapping_live_pairs() == 0
