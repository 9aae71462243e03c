"""A failed GPU whose time was partly resold: the seller is replaced only for the hours it
holds on it (before and after the sold window), its buyer for the window, through their own
failures; the sold window's capacity is never handed out twice."""

from datetime import timedelta

import pytest
from django.utils import timezone

from inventory.models import Gpu, GpuHealth
from marketplace.models import (
    Allocation,
    Reservation,
    ReservationOutage,
    ReservationStatus,
)
from marketplace.selectors.resale import term_unused_amount
from marketplace.services.gpu_failures import reservation_gpu_failure_handle, undelivered_refund
from marketplace.services.reservations import reservation_create
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import make_nodes
from tests.marketplace.resale_helpers import (
    H,
    buy,
    fund,
    listing,
    live_rows,
    market,
    overlapping_live_pairs,
    time_passes_until,
)

pytestmark = pytest.mark.django_db


def _gpus_held_at(at) -> dict[int, int]:
    """Distinct GPUs each reservation holds live at the instant `at`."""
    held: dict[int, set[int]] = {}
    for rid, gpu_id in Allocation.objects.filter(is_live=True, period__contains=at).values_list(
        "reservation_id", "gpu_id"
    ):
        held.setdefault(rid, set()).add(gpu_id)
    return {rid: len(gpus) for rid, gpus in held.items()}


def test_a_seller_is_replaced_for_its_hours_before_and_after_the_sold_window_only():
    m = market()
    spare = make_nodes(m.site, m.model, 1, gpus=8)[0]
    lst = listing(m, gpus=4, start_h=24, hours=24)
    bought = buy(m, lst)
    failed = lst.gpu_ids[0]
    Gpu.objects.filter(pk=failed).update(health=GpuHealth.FAILED)

    assert reservation_gpu_failure_handle(reservation_id=m.term.pk) == "moved"

    replaced = Allocation.objects.filter(reservation=m.term, is_live=True, node=spare)
    periods = sorted((a.period.lower, a.period.upper) for a in replaced)
    window_start, window_end = m.start + 24 * H, m.start + 48 * H
    assert periods == [(m.start, window_start), (window_end, m.term.ends_at)]
    # In the sold window the seller holds its 4 unsold GPUs, the buyer 4: 8, not 9.
    during = m.start + 36 * H
    assert _gpus_held_at(during) == {m.term.pk: 4, bought.pk: 4}

    assert reservation_gpu_failure_handle(reservation_id=bought.pk) == "moved"
    (moved,) = Allocation.objects.filter(reservation=bought, is_live=True, node=spare)
    assert (moved.period.lower, moved.period.upper) == (window_start, window_end)
    assert _gpus_held_at(during) == {m.term.pk: 4, bought.pk: 4}
    for at in (m.start + H, window_end + H):
        assert _gpus_held_at(at) == {m.term.pk: 8}
    assert not Allocation.objects.filter(gpu_id=failed, is_live=True).exists()
    assert overlapping_live_pairs() == 0


def test_a_failed_gpu_running_the_buyer_moves_the_buyer_now_and_the_seller_later():
    m = market()
    spare = make_nodes(m.site, m.model, 1, gpus=8)[0]
    lst = listing(m, gpus=4, start_h=24, hours=24)
    bought = buy(m, lst)
    time_passes_until(lst.starts_at + 2 * H)  # the buyer has had its GPUs for 2 hours
    lst.refresh_from_db()
    now = timezone.now()
    Reservation.objects.filter(pk__in=[m.term.pk, bought.pk]).update(
        status=ReservationStatus.ACTIVE, activated_at=now - 3 * H
    )
    term, bought = (Reservation.objects.get(pk=r) for r in (m.term.pk, bought.pk))
    generation = term.placement_generation
    failed = lst.gpu_ids[0]
    Gpu.objects.filter(pk=failed).update(health=GpuHealth.FAILED)

    assert reservation_gpu_failure_handle(reservation_id=term.pk, now=now) == "moved"
    assert reservation_gpu_failure_handle(reservation_id=bought.pk, now=now) == "moved"

    # The seller was not on the failed GPU: nothing of it is down, it keeps running as it
    # is (no outage, no restart); only its hours after the window moved.
    term.refresh_from_db()
    assert (term.status, term.placement_generation) == (ReservationStatus.ACTIVE, generation)
    assert not ReservationOutage.objects.filter(reservation=term).exists()
    (later,) = Allocation.objects.filter(reservation=term, is_live=True, node=spare)
    assert (later.period.lower, later.period.upper) == (lst.ends_at, term.ends_at)
    # The buyer was: it restarts on a spare GPU from now to its window's end.
    bought.refresh_from_db()
    assert bought.status == ReservationStatus.PROVISIONING
    assert ReservationOutage.objects.filter(reservation=bought, ended_at=None).count() == 1
    (moved,) = Allocation.objects.filter(reservation=bought, is_live=True, node=spare)
    assert (moved.period.lower, moved.period.upper) == (now, bought.ends_at)
    assert _gpus_held_at(now + H) == {term.pk: 4, bought.pk: 4}
    assert overlapping_live_pairs() == 0


def test_a_seller_is_moved_when_the_site_is_full_only_in_the_window_it_sold():
    m = market()
    spare = make_nodes(m.site, m.model, 1, gpus=1)[0]
    lst = listing(m, gpus=1, start_h=24, hours=24)
    buy(m, lst)
    other = OrganizationFactory()
    fund(other)
    in_window = reservation_create(
        organization=other, gpu_model=m.model.slug, gpu_count=1, site=m.site.slug,
        starts_at=m.start + 24 * H, ends_at=m.start + 48 * H, tier="on_demand",
    )  # fmt: skip
    assert Allocation.objects.get(reservation=in_window).node == spare
    Gpu.objects.filter(pk=lst.gpu_ids[0]).update(health=GpuHealth.FAILED)
    now = timezone.now()
    refund_before = undelivered_refund(m.term, since=now)

    # The spare GPU is free before and after the window, which is all the term needs of it.
    assert reservation_gpu_failure_handle(reservation_id=m.term.pk, now=now) == "moved"

    term = Reservation.objects.get(pk=m.term.pk)
    assert term.status == m.term.status and not term.cancellation
    assert sorted((i, a - m.start, b - m.start) for i, a, b in live_rows(term) if i == 0) == [
        (0, timedelta(0), 24 * H),
        (0, 48 * H, 8 * 24 * H),
    ]  # index 0 of the seller's node (the failed one) is gone; index 0 of the spare held
    assert Allocation.objects.filter(reservation=term, node=spare, is_live=True).count() == 2
    # What a refund would give back still leaves the sold window out, as before the move.
    assert undelivered_refund(term, since=now) == term_unused_amount(term, since=now)
    assert refund_before == term_unused_amount(term, since=now)
    assert overlapping_live_pairs() == 0
