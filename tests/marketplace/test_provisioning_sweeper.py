"""The sweeper and the outage reconciler."""

from datetime import timedelta

import pytest
from django.utils import timezone

from inventory.models import Outage, OutageCause
from inventory.services import node_heartbeat_record, node_mark_offline
from marketplace.models import Allocation, ProvisioningAttempt, ReservationOutage, ReservationStatus
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.scheduler import reservations_sweep_stuck
from marketplace.provisioning.services import (
    reservation_outages_reconcile,
    reservation_provision_step,
    reservation_worker_lock,
)
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (broker_fixture is a fixture)
    broker_fixture,
    broker_url_for_this_process,
    e2e_redis_url,
    market_create,
    redis_test_client,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


@pytest.fixture
def market():
    return market_create(nodes=2, gpus=4)


@pytest.fixture
def queue(broker):
    """Enqueues go to a queue of this test's own; returns how many messages wait there."""
    client = redis_test_client()
    return lambda: client.llen(broker)


def _provisioning(*reservations) -> None:
    """As the provision task leaves a reservation it took up before its worker died."""
    from marketplace.services.transitions import reservation_transition

    for r in reservations:
        reservation_transition(reservation=r, to_status=S.PROVISIONING, cause="t", actor_label="t")


def _stale(reservation, *, seconds: int = 600) -> None:
    """Pretend the reservation entered its state, and its last attempt ran, long ago."""
    then = timezone.now() - timedelta(seconds=seconds)
    type(reservation).objects.filter(pk=reservation.pk).update(updated_at=then)
    ProvisioningAttempt.objects.filter(reservation=reservation).update(
        started_at=then, finished_at=then, next_attempt_at=None
    )


def test_it_requeues_a_reservation_stuck_in_provisioning_that_nobody_works_on(market, queue):
    r = market.book()
    _provisioning(r)
    _stale(r)

    assert reservations_sweep_stuck() == {"requeued": 1, "failed": 0}
    assert queue() == 1


def test_it_leaves_alone_what_a_worker_is_working_on_or_what_moved_recently(market, queue):
    busy, recent = market.book(), market.book()
    _provisioning(busy, recent)
    _stale(busy)
    before = queue()

    with reservation_worker_lock(busy.pk):
        assert reservations_sweep_stuck() == {"requeued": 0, "failed": 0}
    assert queue() == before
    recent.refresh_from_db()
    assert recent.status == S.PROVISIONING


def test_it_waits_for_a_scheduled_retry_before_calling_a_reservation_stuck(market, queue):
    r = market.book()
    reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver(failure_rate=1))
    _stale(r)
    ProvisioningAttempt.objects.filter(reservation=r).update(
        next_attempt_at=timezone.now() + timedelta(seconds=30)
    )

    assert reservations_sweep_stuck(stuck_after=timedelta(seconds=10)) == {
        "requeued": 0,
        "failed": 0,
    }


def test_it_fails_a_reservation_whose_period_ended_while_provisioning(market, queue):
    r = market.book()
    _provisioning(r)
    now = timezone.now()
    type(r).objects.filter(pk=r.pk).update(
        starts_at=now - timedelta(hours=2), ends_at=now - timedelta(seconds=1)
    )

    assert reservations_sweep_stuck() == {"requeued": 0, "failed": 1}
    r.refresh_from_db()
    assert r.status == S.FAILED and r.activated_at is None
    assert Allocation.objects.filter(reservation=r, is_live=True).count() == 0


def test_a_reservation_that_had_run_says_its_period_ended_while_it_was_started_again(market, queue):
    """Moved or restarted in place and not running again by its end: it had run, so the
    reason does not say it was never provisioned."""
    r = market.book()
    _provisioning(r)
    now = timezone.now()
    type(r).objects.filter(pk=r.pk).update(
        starts_at=now - timedelta(hours=2),
        ends_at=now - timedelta(seconds=1),
        activated_at=now - timedelta(hours=2),
    )

    assert reservations_sweep_stuck() == {"requeued": 0, "failed": 1}
    r.refresh_from_db()
    assert r.status == S.FAILED
    assert r.transitions.order_by("-at", "-id").first().cause == (
        "The reservation's period ended while it was being started again (after a move or a "
        "restart in place); it had run until then."
    )


def test_the_reconciler_mirrors_a_node_outage_onto_the_active_reservations_it_hits(market):
    hit, spared = market.book(gpu_count=4), market.book(gpu_count=4)
    for r in (hit, spared):
        reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())
    node = Allocation.objects.filter(reservation=hit).first().node
    node.last_heartbeat_at = timezone.now() - timedelta(minutes=10)
    node.save(update_fields=["last_heartbeat_at"])

    node_mark_offline(node=node, reason="No heartbeat for 600 s.")
    assert reservation_outages_reconcile() == (1, 0)
    assert reservation_outages_reconcile() == (0, 0)  # idempotent
    outage = ReservationOutage.objects.get()
    assert outage.reservation_id == hit.pk
    assert outage.cause == OutageCause.HEARTBEAT_MISSED
    assert outage.ended_at is None

    node_heartbeat_record(node=node)  # the agent is back: the node outage closes
    assert reservation_outages_reconcile() == (0, 1)
    outage.refresh_from_db()
    assert outage.ended_at == Outage.objects.get(node=node).ended_at
    assert ReservationOutage.objects.filter(reservation=spared).count() == 0


def _offline(node):
    node.last_heartbeat_at = timezone.now() - timedelta(minutes=10)
    node.save(update_fields=["last_heartbeat_at"])
    node_mark_offline(node=node, reason="No heartbeat for 600 s.")


def test_a_reservation_moved_off_a_down_node_has_its_outage_closed_when_it_left(market):
    from marketplace.provisioning.services import allocations_end

    r = market.book(gpu_count=2)
    reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())
    down, other = (
        market.nodes
        if Allocation.objects.get(reservation=r, gpu__index=0).node_id == market.nodes[0].pk
        else market.nodes[::-1]
    )
    _offline(down)
    assert reservation_outages_reconcile() == (1, 0)

    # Moved to the other node while the first is still down: its outage there ends with its
    # time on the node; the node's own outage stays open.
    left = timezone.now()
    allocations_end(Allocation.objects.filter(reservation=r, node=down), now=left)
    for gpu in other.gpus.order_by("index")[:2]:
        Allocation.objects.create(reservation=r, gpu=gpu, node=other,
                                  period=(left, r.ends_at))  # fmt: skip

    assert reservation_outages_reconcile() == (0, 1)
    assert reservation_outages_reconcile() == (0, 0)
    outage = ReservationOutage.objects.get(reservation=r)
    assert outage.ended_at == left
    assert Outage.objects.get(node=down).ended_at is None


def test_a_node_outage_does_not_hit_a_reservation_before_its_time_on_the_node(market):
    r = market.book(gpu_count=2)
    reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())
    here = Allocation.objects.filter(reservation=r).first().node
    later = next(n for n in market.nodes if n.pk != here.pk)
    # Halfway on it also holds a GPU of the other node (a later placement there).
    soon = timezone.now() + (r.ends_at - timezone.now()) / 2
    gpu = later.gpus.order_by("index").first()
    Allocation.objects.create(reservation=r, gpu=gpu, node=later, period=(soon, r.ends_at))
    _offline(later)

    assert reservation_outages_reconcile() == (0, 0)
    assert not ReservationOutage.objects.filter(reservation=r).exists()


def test_a_reservation_whose_task_never_started_is_requeued_sooner(market, queue):
    # Cancelled early by its customer: releasing, but no task was ever sent for it.
    r = market.book()
    reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())
    from marketplace.services.transitions import reservation_transition

    reservation_transition(reservation=r, to_status=S.RELEASING, cause="cancel", actor_label="t")
    type(r).objects.filter(pk=r.pk).update(updated_at=timezone.now() - timedelta(seconds=30))

    assert reservations_sweep_stuck() == {"requeued": 1, "failed": 0}
    assert queue() == 1
