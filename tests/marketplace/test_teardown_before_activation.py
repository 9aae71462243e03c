"""A reservation that ends before (or without) a release after the driver may have been asked
to run it is torn down: its queued prepare and start jobs are cancelled and its nodes get stop
jobs, whether it was cancelled while provisioning, failed (period over, too many attempts, the
sweeper, staff) or preempted before it became active, or cancelled right after a GPU-failure
move. One never claimed by a provision step has nothing to stop.

Through the site-agent driver, with the agent played by the job queue's own services.
"""

import json
from datetime import timedelta

import pytest
from django.utils import timezone
from psycopg.types.range import Range

from inventory.models import Gpu, GpuHealth
from inventory.telemetry import gpu_health_apply
from marketplace.models import (
    AgentJob,
    AgentJobStatus,
    Allocation,
    AttemptOutcome,
    ProvisioningAttempt,
    ProvisioningDispatch,
    Reservation,
    ReservationStatus,
)
from marketplace.provisioning.agent_jobs import agent_job_complete, agent_job_lease
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.kicks import RELEASE_TASK
from marketplace.provisioning.scheduler import reservations_dispatch_due, reservations_sweep_stuck
from marketplace.provisioning.services import (
    reservation_provision_step,
    reservation_release_step,
)
from marketplace.services.gpu_failures import gpu_failures_handle
from marketplace.services.reservations import reservation_cancel
from marketplace.services.transitions import reservation_transition
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (broker_fixture is a fixture)
    broker_fixture,
    market_create,
    redis_test_client,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


@pytest.fixture
def market():
    return market_create(nodes=1, gpus=4)


def _provision(reservation: Reservation):
    return reservation_provision_step(
        reservation_id=reservation.pk, driver=SiteAgentDriver(), check_window=0
    )


def _release(reservation: Reservation):
    return reservation_release_step(
        reservation_id=reservation.pk, driver=SiteAgentDriver(), check_window=0
    )


def _complete(job: AgentJob) -> None:
    """The agent reports the leased job done."""
    agent_job_complete(
        node=job.node,
        job_id=job.pk,
        lease_id=job.lease_owner,
        result={"host": "10.0.0.5", "ssh_port": 2222, "ports": {}},
    )


def _agent_runs_everything(node) -> list[tuple[str, int]]:
    """The node's agent leases and completes its jobs until none is left; (kind, generation)."""
    ran = []
    while (job := agent_job_lease(node=node)) is not None:
        ran.append((job.kind, job.generation))
        _complete(job)
    return ran


def _jobs(reservation: Reservation) -> list[tuple[str, int, str]]:
    return list(
        AgentJob.objects.filter(reservation=reservation)
        .order_by("id")
        .values_list("kind", "generation", "status")
    )


def _dispatched_ends() -> int:
    """What one dispatcher tick sends to the release task (markers cleared for the next)."""
    ended = reservations_dispatch_due()["ended"]
    ProvisioningDispatch.objects.all().delete()
    return ended


def test_a_reservation_cancelled_while_its_prepare_runs_never_gets_its_start_handed_out(market):
    node = market.nodes[0]
    r = market.book(gpu_count=2)
    assert _provision(r).outcome == "waiting"
    prepare = agent_job_lease(node=node)
    assert prepare.kind == "prepare"

    cancelled = reservation_cancel(reservation=r, actor_label="user:test")

    assert cancelled.status == S.CANCELLED and cancelled.released_at is not None
    assert _dispatched_ends() == 1
    assert _release(r).outcome == "waiting"
    assert _jobs(r) == [
        ("prepare", 0, AgentJobStatus.LEASED),  # the agent is on it: it finishes it
        ("start", 0, AgentJobStatus.CANCELLED),
        ("stop", 0, AgentJobStatus.QUEUED),
    ]
    stop = AgentJob.objects.get(reservation=r, kind="stop")
    assert (stop.node_id, stop.payload["gpu_indexes"]) == (node.pk, [0, 1])
    # The agent finishes the prepare and is handed the stop, never the start.
    _complete(prepare)
    assert _agent_runs_everything(node) == [("stop", 0)]
    assert _release(r).outcome == "torn_down"
    assert _release(r).outcome == "noop"
    assert _dispatched_ends() == 0
    r.refresh_from_db()
    assert (r.status, r.activated_at) == (S.CANCELLED, None)  # only the stop, no status change


def test_cancelling_a_provisioning_reservation_enqueues_its_release_after_commit(
    market, broker, django_capture_on_commit_callbacks
):
    r = market.book()
    assert _provision(r).outcome == "waiting"

    with django_capture_on_commit_callbacks() as callbacks:
        reservation_cancel(reservation=r, actor_label="user:test")
    assert redis_test_client().llen(broker) == 0  # nothing is sent before the cancel commits
    for callback in callbacks:
        callback()

    sent = [json.loads(m)["headers"] for m in redis_test_client().lrange(broker, 0, -1)]
    assert [(h["task"], h["argsrepr"]) for h in sent] == [(RELEASE_TASK, f"[{r.pk}]")]


def _period_over(reservation: Reservation) -> None:
    """Its period (and its GPUs' time) ended a moment ago, while it was being provisioned."""
    now = timezone.now()
    start, end = now - timedelta(hours=1), now - timedelta(milliseconds=1)
    Reservation.objects.filter(pk=reservation.pk).update(starts_at=start, ends_at=end)
    Allocation.objects.filter(reservation=reservation).update(period=Range(start, end, "[)"))


def _fail_by_provision_period_over(r):
    _period_over(r)
    assert _provision(r).detail == "period over"


def _fail_by_provision_too_many_attempts(r):
    for number in range(2, 7):
        ProvisioningAttempt.objects.create(
            reservation=r,
            kind="provision",
            number=number,
            outcome=AttemptOutcome.ERROR,
            started_at=timezone.now(),
        )
    assert _provision(r).detail == "too many attempts"


def _fail_by_sweeper(r):
    _period_over(r)
    assert reservations_sweep_stuck()["failed"] == 1


def _fail_by_staff(r):
    reservation_transition(reservation=r, to_status=S.FAILED, cause="staff", actor_label="staff")


def _preempt_by_curtailment(r):
    reservation_transition(
        reservation=r,
        to_status=S.PREEMPTED,
        cause="grid curtailment",
        actor_label="system: curtailment",
        force_preemption=True,
    )


@pytest.mark.parametrize(
    ("end", "status"),
    [
        (_fail_by_provision_period_over, S.FAILED),
        (_fail_by_provision_too_many_attempts, S.FAILED),
        (_fail_by_sweeper, S.FAILED),
        (_fail_by_staff, S.FAILED),
        (_preempt_by_curtailment, S.PREEMPTED),
    ],
    ids=["period-over", "too-many-attempts", "sweeper", "staff", "preempted"],
)
def test_a_reservation_ended_while_provisioning_is_torn_down(market, settings, end, status):
    settings.PROVISIONING_MAX_ATTEMPTS = 5
    node = market.nodes[0]
    r = market.book(gpu_count=2)
    assert _provision(r).outcome == "waiting"

    end(r)

    r.refresh_from_db()
    assert (r.status, r.activated_at) == (status, None)
    assert _dispatched_ends() == 1
    assert _release(r).outcome == "waiting"
    assert _jobs(r) == [
        ("prepare", 0, AgentJobStatus.CANCELLED),
        ("start", 0, AgentJobStatus.CANCELLED),
        ("stop", 0, AgentJobStatus.QUEUED),
    ]
    assert AgentJob.objects.get(reservation=r, kind="stop").payload["gpu_indexes"] == [0, 1]
    assert _agent_runs_everything(node) == [("stop", 0)]
    assert _release(r).outcome == "torn_down"
    assert _dispatched_ends() == 0


def test_a_reservation_cancelled_before_any_provision_step_needs_no_teardown(market):
    r = market.book()  # due now, never claimed by a provision step

    reservation_cancel(reservation=r, actor_label="user:test")

    assert _dispatched_ends() == 0
    assert _release(r).detail == "reservation is cancelled"
    assert _jobs(r) == []
    assert not ProvisioningAttempt.objects.filter(reservation=r).exists()


def test_a_cancelled_reservation_released_before_the_teardown_window_is_left_alone(market):
    r = market.book()
    assert _provision(r).outcome == "waiting"
    reservation_cancel(reservation=r, actor_label="user:test")
    assert _dispatched_ends() == 1

    Reservation.objects.filter(pk=r.pk).update(released_at=timezone.now() - timedelta(days=2))

    assert _dispatched_ends() == 0


def test_cancelling_right_after_a_gpu_failure_move_stops_the_old_generations_container(market):
    node = market.nodes[0]
    r = market.book(gpu_count=2)
    assert _provision(r).outcome == "waiting"
    assert _agent_runs_everything(node) == [("prepare", 0), ("start", 0)]
    assert _provision(r).outcome == "active"
    failed = Gpu.objects.get(node=node, index=0)
    gpu_health_apply(
        gpu=failed,
        health=GpuHealth.FAILED,
        reason="2 uncorrectable ECC error(s)",
        actor_label="node agent",
        now=timezone.now(),
    )
    assert gpu_failures_handle()["moved"] == 1
    r.refresh_from_db()
    assert (r.status, r.placement_generation) == (S.PROVISIONING, 1)
    new_indexes = sorted(
        Allocation.objects.filter(reservation=r, is_live=True).values_list("gpu__index", flat=True)
    )

    # The customer cancels before the worker restarts it on the new GPUs.
    reservation_cancel(reservation=r, actor_label="user:test")

    assert _dispatched_ends() == 1
    assert _release(r).outcome == "waiting"
    stops = AgentJob.objects.filter(reservation=r, kind="stop").order_by("generation")
    assert [(j.generation, j.payload["gpu_indexes"], j.status) for j in stops] == [
        (0, [0, 1], AgentJobStatus.QUEUED),  # the container still running on the old GPUs
        (1, new_indexes, AgentJobStatus.QUEUED),
    ]
    assert _agent_runs_everything(node) == [("stop", 0), ("stop", 1)]
    assert _release(r).outcome == "torn_down"
    r.refresh_from_db()
    assert r.status == S.CANCELLED
