"""A failed GPU's work is moved to healthy GPUs of the same model at the same site, or ended
with the undelivered time refunded; the failed GPU's time is never billed."""

from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.services.credits import cancellation_settle
from billing.services.usage import outage_intervals, reservation_delivered_seconds
from inventory.models import Gpu, GpuHealth, NodeStatus, Outage, OutageCause
from inventory.telemetry import gpu_health_apply
from marketplace.models import (
    AgentJob,
    Allocation,
    ReservationOutage,
    ReservationStatus,
    Tier,
)
from marketplace.provisioning.drivers import SimulatedDriver, SiteAgentDriver
from marketplace.provisioning.services import reservation_provision_step
from marketplace.services.gpu_failures import gpu_failures_handle
from marketplace.services.reservations import reservation_create
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create, statuses

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


@pytest.fixture
def market():
    return market_create(nodes=2, gpus=4)


def fail_gpu(gpu: Gpu, *, at=None, reason="2 uncorrectable ECC error(s)") -> None:
    gpu_health_apply(
        gpu=gpu,
        health=GpuHealth.FAILED,
        reason=reason,
        actor_label="node agent",
        now=at or timezone.now(),
    )


def live_gpus(reservation) -> set[int]:
    return set(
        Allocation.objects.filter(reservation=reservation, is_live=True).values_list(
            "gpu_id", flat=True
        )
    )


def active(market, **kwargs):
    r = market.book(**kwargs)
    assert reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver()).outcome == (
        "active"
    )
    r.refresh_from_db()
    return r


def test_an_active_reservation_moves_to_a_healthy_gpu_and_the_gap_is_not_billed(market):
    r = active(market, gpu_count=2)
    before = live_gpus(r)
    bad = Gpu.objects.get(pk=min(before))
    failed_at = timezone.now()
    fail_gpu(bad, at=failed_at)

    done = gpu_failures_handle()

    r.refresh_from_db()
    assert done == {"moved": 1, "outages_closed": 0}
    assert r.status == S.PROVISIONING
    assert statuses(r)[-2:] == [S.ACTIVE, S.PROVISIONING]
    last = r.transitions.order_by("at", "id").last()
    assert last.cause.startswith(f"GPU {bad.node.hostname}/gpu{bad.index} failed (2 uncorrectable")
    assert "the time since the failure is not billed" in last.cause
    after = live_gpus(r)
    assert bad.pk not in after and len(after) == 2
    assert before - {bad.pk} <= after  # the healthy GPU stays
    assert Gpu.objects.get(pk=(after - before).pop()).health == GpuHealth.OK
    outage = ReservationOutage.objects.get(reservation=r)
    assert (outage.cause, outage.started_at, outage.ended_at) == (
        OutageCause.GPU_FAILURE,
        failed_at,
        None,
    )
    assert outage.source_outage == Outage.objects.get(gpu=bad)

    # The worker restarts it on the new placement: active again, the outage closes then.
    assert reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver()).outcome == (
        "active"
    )
    assert gpu_failures_handle() == {"outages_closed": 1}
    r.refresh_from_db()
    outage.refresh_from_db()
    back = r.transitions.filter(to_status=S.ACTIVE).order_by("at").last().at
    assert outage.ended_at == back
    assert r.connection["host"]
    until = back + timedelta(seconds=100)
    delivered = reservation_delivered_seconds(reservation=r, until=until)
    assert delivered == int((until - r.activated_at).total_seconds()) - int(
        (back - failed_at).total_seconds()
    )


def test_the_sweep_is_idempotent(market):
    r = active(market, gpu_count=1)
    fail_gpu(Gpu.objects.get(pk=live_gpus(r).pop()))
    gpu_failures_handle()
    moved_to = live_gpus(r)
    assert gpu_failures_handle() == {"outages_closed": 0}
    assert live_gpus(r) == moved_to
    assert r.transitions.filter(to_status=S.PROVISIONING).count() == 2  # first start, the move


def test_other_reservations_on_the_node_are_untouched_and_billed(market):
    r = active(market, gpu_count=1)
    neighbour = active(market, gpu_count=1)
    bad = Gpu.objects.get(pk=live_gpus(r).pop())
    assert Allocation.objects.get(reservation=neighbour).node_id == bad.node_id
    fail_gpu(bad)
    gpu_failures_handle()

    neighbour.refresh_from_db()
    assert neighbour.status == S.ACTIVE
    assert not ReservationOutage.objects.filter(reservation=neighbour).exists()
    assert outage_intervals(reservation=neighbour, until=timezone.now()) == []
    bad.node.refresh_from_db()
    assert bad.node.status == NodeStatus.AVAILABLE


def test_with_nowhere_to_go_an_active_reserved_term_ends_and_its_rest_is_refunded(market):
    other = active(market, gpu_count=4)  # fills one node; ours takes the other
    start = timezone.now()
    r = reservation_create(
        organization=OrganizationFactory(),
        gpu_model=market.gpu_model.slug,
        gpu_count=4,
        starts_at=start,
        ends_at=start + timedelta(days=7),
        tier=Tier.RESERVED,
        term="1w",
        site=market.site.slug,
    )
    reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())
    # As if it had started a day ago: six of its seven days are left when the GPU fails.
    day = timedelta(days=1)
    type(r).objects.filter(pk=r.pk).update(
        starts_at=start - day, ends_at=start + 6 * day, activated_at=start - day
    )
    bad = Gpu.objects.get(pk=min(live_gpus(r)))
    failed_at = start
    fail_gpu(bad, at=failed_at)

    assert gpu_failures_handle() == {"ended": 1, "outages_closed": 0}

    r.refresh_from_db(), other.refresh_from_db()
    assert r.status == S.FAILED
    assert "no healthy GPU of this model free" in r.status_reason
    assert live_gpus(r) == set()
    refund = (Decimal(r.total_amount) * 6 / 7).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    assert r.cancellation["refund_amount"] == str(refund)
    assert other.status == S.ACTIVE and len(live_gpus(other)) == 4
    outage = ReservationOutage.objects.get(reservation=r)
    assert (outage.started_at, outage.ended_at) == (failed_at, r.released_at)

    credit = cancellation_settle(reservation_id=r.pk)
    assert credit.kind == LedgerKind.TERM_REFUND
    assert credit.amount_minor == int(refund * 100)
    assert cancellation_settle(reservation_id=r.pk) is None  # once
    assert LedgerEntry.objects.filter(reservation=r, kind=LedgerKind.TERM_REFUND).count() == 1


def test_with_nowhere_to_go_an_on_demand_reservation_ends_and_is_charged_only_until_the_failure(
    market,
):
    active(market, gpu_count=4)
    r = active(market, gpu_count=4)
    failed_at = timezone.now()
    fail_gpu(Gpu.objects.get(pk=min(live_gpus(r))), at=failed_at)
    gpu_failures_handle()
    r.refresh_from_db()

    assert r.status == S.FAILED
    assert r.cancellation in ({}, None)  # metered: nothing was charged ahead
    later = timezone.now() + timedelta(hours=1)
    assert reservation_delivered_seconds(reservation=r, until=later) == int(
        (failed_at - r.activated_at).total_seconds()
    )


def test_a_pending_reservation_is_moved_with_a_history_entry(market):
    r = market.book(gpu_count=2, starts_at=timezone.now() + timedelta(days=1))
    assert r.status == S.PENDING
    bad = Gpu.objects.get(pk=min(live_gpus(r)))
    fail_gpu(bad)

    gpu_failures_handle()

    r.refresh_from_db()
    assert r.status == S.PENDING
    assert bad.pk not in live_gpus(r) and len(live_gpus(r)) == 2
    entry = r.transitions.order_by("at", "id").last()
    assert (entry.from_status, entry.to_status) == (S.PENDING, S.PENDING)
    assert "moved to 1 healthy GPU(s)" in entry.cause
    assert not ReservationOutage.objects.filter(reservation=r).exists()


def test_a_failed_gpu_is_no_longer_sold_but_a_degraded_one_is(market):
    node = market.nodes[0]
    gpus = list(Gpu.objects.filter(node=node).order_by("index"))
    gpu_health_apply(
        gpu=gpus[0],
        health=GpuHealth.DEGRADED,
        reason="row remap pending",
        actor_label="t",
        now=timezone.now(),
    )
    for gpu in market.nodes[1].gpus.all():
        fail_gpu(gpu)
    r = market.book(gpu_count=4)
    assert live_gpus(r) == {g.pk for g in gpus}  # the degraded GPU sold, flagged
    with pytest.raises(Exception) as refused:
        market.book(gpu_count=1)
    assert getattr(refused.value, "code", None) == "not_available"


def test_a_reservation_moved_while_its_agent_jobs_wait_queues_them_for_the_new_placement(
    market,
):
    """Provisioning through site agents, waiting for the jobs: a GPU fails, the reservation
    goes back to scheduled on a new placement, and the next run queues that placement's jobs
    (a new generation) instead of resuming the wait for the old ones."""
    r = market.book(gpu_count=2)
    driver = SiteAgentDriver()
    assert reservation_provision_step(
        reservation_id=r.pk, driver=driver, check_window=0
    ).outcome == ("waiting")
    old = sorted(Allocation.objects.filter(reservation=r).values_list("gpu__index", flat=True))
    fail_gpu(Gpu.objects.get(pk=min(live_gpus(r))))
    assert gpu_failures_handle()["moved"] == 1
    r.refresh_from_db()
    assert (r.status, r.placement_generation) == (S.SCHEDULED, 1)

    assert reservation_provision_step(
        reservation_id=r.pk, driver=driver, check_window=0
    ).outcome == ("waiting")

    jobs = AgentJob.objects.filter(reservation=r, generation=1, kind="start")
    new = sorted(i for j in jobs for i in j.payload["gpu_indexes"])
    assert len(new) == 2 and new != old
    # The old generation's work that no agent took is cancelled.
    assert set(
        AgentJob.objects.filter(reservation=r, generation=0).values_list("status", flat=True)
    ) == {"cancelled"}
