"""The job queue's defences for a teardown: a prepare or start job is never handed out for a
reservation that is no longer live (it is cancelled instead) nor to a node out of service,
while stop jobs always are; and a stop job whose agent hung with it leased no longer holds a
release in releasing forever."""

from datetime import timedelta

import pytest
from django.utils import timezone

from inventory.models import Node, NodeStatus
from marketplace.models import AgentJob, AgentJobStatus, ReservationStatus
from marketplace.provisioning.agent_jobs import (
    agent_job_complete,
    agent_job_enqueue,
    agent_job_lease,
)
from marketplace.provisioning.drivers import NodeTarget, SiteAgentDriver, Target
from marketplace.provisioning.services import (
    reservation_provision_step,
    reservation_release_step,
)
from marketplace.services.reservations import reservation_cancel
from marketplace.services.transitions import reservation_transition
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


@pytest.fixture
def market():
    return market_create(nodes=1, gpus=4)


def _target(reservation, node, indexes=(0, 1)) -> Target:
    return Target(
        reservation.pk,
        reservation.public_id,
        reservation.workload,
        (NodeTarget(node.pk, node.hostname, indexes),),
    )


def _queued_to_run(market, **book):
    """A booked reservation whose prepare and start jobs are queued on the market's node."""
    node = market.nodes[0]
    r = market.book(**book)
    target = _target(r, node, (0,))
    driver = SiteAgentDriver()
    driver.prepare(target)
    driver.start_workload(target)
    return r, target


def _stop_queued(reservation, node) -> AgentJob:
    return agent_job_enqueue(
        reservation_id=reservation.pk,
        node_id=node.pk,
        kind="stop",
        payload={"gpu_indexes": [0]},
    )


def _statuses(reservation) -> dict[str, str]:
    return dict(AgentJob.objects.filter(reservation=reservation).values_list("kind", "status"))


def _end_by_cancel(r):
    reservation_cancel(reservation=r, actor_label="user:test")


def _end_by_failure(r):
    reservation_transition(reservation=r, to_status=S.FAILED, cause="staff", actor_label="staff")


def _end_by_preemption(r):
    reservation_transition(
        reservation=r,
        to_status=S.PREEMPTED,
        cause="grid curtailment",
        actor_label="system: curtailment",
        force_preemption=True,
    )


@pytest.mark.parametrize(
    "end",
    [_end_by_cancel, _end_by_failure, _end_by_preemption],
    ids=["cancelled", "failed", "preempted"],
)
def test_a_prepare_or_start_of_a_reservation_no_longer_live_is_cancelled_not_handed_out(
    market, end
):
    node = market.nodes[0]
    dead, _target_dead = _queued_to_run(market)
    end(dead)
    live, _target_live = _queued_to_run(market)
    stop = _stop_queued(dead, node)

    first = agent_job_lease(node=node)
    second = agent_job_lease(node=node)

    # The dead reservation's jobs come first by id; they are cancelled, the live one's run.
    assert (first.reservation_id, first.kind) == (live.pk, "prepare")
    assert (second.pk, second.kind) == (stop.pk, "stop")  # a stop is always handed out
    assert _statuses(dead) == {
        "prepare": AgentJobStatus.CANCELLED,
        "start": AgentJobStatus.CANCELLED,
        "stop": AgentJobStatus.LEASED,
    }
    cancelled = AgentJob.objects.get(reservation=dead, kind="prepare")
    assert cancelled.error == "Not handed out: its reservation is no longer live."
    assert cancelled.attempts == 0 and cancelled.finished_at is not None
    assert AgentJob.objects.get(reservation=live, kind="start").status == AgentJobStatus.QUEUED


def test_a_job_whose_lease_ran_out_after_its_reservation_ended_is_cancelled(market):
    node = market.nodes[0]
    r, _target = _queued_to_run(market)
    prepare = agent_job_lease(node=node)
    assert prepare.kind == "prepare"
    reservation_cancel(reservation=r, actor_label="user:test")
    # Its agent died with it: the lease runs out and the job would be handed out again.
    AgentJob.objects.filter(pk=prepare.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    assert agent_job_lease(node=node) is None
    assert _statuses(r) == {"prepare": AgentJobStatus.CANCELLED, "start": AgentJobStatus.CANCELLED}


def test_a_job_leased_now_is_left_to_its_agent_and_the_start_after_it_is_cancelled(market):
    node = market.nodes[0]
    r, _target = _queued_to_run(market)
    prepare = agent_job_lease(node=node)
    reservation_cancel(reservation=r, actor_label="user:test")

    assert agent_job_lease(node=node) is None  # its start waits for the prepare
    # The agent on the prepare may still report it (a cancelled job would answer 409).
    agent_job_complete(node=node, job_id=prepare.pk, lease_id=prepare.lease_owner, result={})
    # Even with no teardown yet, the start is not handed out: it is cancelled.
    assert agent_job_lease(node=node) is None
    assert _statuses(r) == {"prepare": AgentJobStatus.DONE, "start": AgentJobStatus.CANCELLED}


def test_a_start_completed_after_its_stop_ran_gets_the_stop_again(market):
    """The agent held the start's lease when the reservation was cancelled, and the teardown's
    stop ran before the start made its container: that container must not outlive the end."""
    node = market.nodes[0]
    r, _target = _queued_to_run(market)
    prepare = agent_job_lease(node=node)
    agent_job_complete(node=node, job_id=prepare.pk, lease_id=prepare.lease_owner, result={})
    start = agent_job_lease(node=node)
    assert start.kind == "start"
    reservation_cancel(reservation=r, actor_label="user:test")
    stop = _stop_queued(r, node)
    leased = agent_job_lease(node=node)
    assert leased.pk == stop.pk  # a stop waits for nothing
    agent_job_complete(node=node, job_id=stop.pk, lease_id=leased.lease_owner, result={})

    agent_job_complete(node=node, job_id=start.pk, lease_id=start.lease_owner, result={})

    stop.refresh_from_db()
    assert stop.status == AgentJobStatus.QUEUED  # to run again, after the late start
    assert agent_job_lease(node=node).pk == stop.pk


@pytest.mark.parametrize("status", [NodeStatus.MAINTENANCE, NodeStatus.OFFLINE, NodeStatus.RETIRED])
def test_a_node_out_of_service_is_handed_only_stop_jobs(market, status):
    node = market.nodes[0]
    r, _target = _queued_to_run(market)
    other = market.book()
    stop = _stop_queued(other, node)
    Node.objects.filter(pk=node.pk).update(status=status)
    node.refresh_from_db()

    leased = agent_job_lease(node=node)

    assert leased.pk == stop.pk
    assert agent_job_lease(node=node) is None
    # Not cancelled: the provisioning step moves the reservation off the node.
    assert _statuses(r) == {"prepare": AgentJobStatus.QUEUED, "start": AgentJobStatus.QUEUED}


def test_a_draining_node_still_gets_the_work_of_its_reservations(market):
    node = market.nodes[0]
    r, _target = _queued_to_run(market)
    Node.objects.filter(pk=node.pk).update(status=NodeStatus.DRAINING)
    node.refresh_from_db()

    assert agent_job_lease(node=node).kind == "prepare"


def test_leasing_takes_its_two_statements_when_nothing_is_dead(market, django_assert_num_queries):
    # Every agent poll runs it: the checks ride on the one SELECT … FOR UPDATE; the UPDATE
    # that leases the job is the other statement (savepoint statements of the atomic block
    # around them are counted too).
    node = market.nodes[0]
    _queued_to_run(market)
    with django_assert_num_queries(4):
        assert agent_job_lease(node=node).kind == "prepare"


# --- a stop whose agent hung -----------------------------------------------------------------


def test_a_stop_leased_by_an_agent_that_hung_no_longer_holds_the_stop(market, settings):
    node = market.nodes[0]
    r = market.book()
    target = _target(r, node, (0,))
    driver = SiteAgentDriver()
    assert driver.stop(target).state == "pending"
    stop = agent_job_lease(node=node)
    assert stop.kind == "stop"

    # Its lease ran out a moment ago: the agent may be slow; still waiting.
    AgentJob.objects.filter(pk=stop.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert driver.stop(target).state == "pending"
    # Ran out longer ago than AGENT_JOB_STALL, never taken again: the agent hung with it.
    AgentJob.objects.filter(pk=stop.pk).update(
        lease_expires_at=timezone.now() - settings.AGENT_JOB_STALL - timedelta(seconds=1)
    )
    check = driver.stop(target)

    assert (check.state, check.detail) == (
        "ready",
        f"stop not confirmed by the agents of nodes [{node.pk}]",
    )
    # When the agent comes back, the stop is handed out again.
    again = agent_job_lease(node=node)
    assert (again.pk, again.attempts) == (stop.pk, 2)


def test_a_release_completes_when_the_agent_hung_with_its_stop_leased(market, settings):
    node = market.nodes[0]
    driver = SiteAgentDriver()
    r = market.book()
    assert reservation_provision_step(
        reservation_id=r.pk, driver=driver, check_window=0
    ).outcome == ("waiting")
    while (job := agent_job_lease(node=node)) is not None:
        agent_job_complete(
            node=node, job_id=job.pk, lease_id=job.lease_owner, result={"host": "10.0.0.5"}
        )
    assert reservation_provision_step(reservation_id=r.pk, driver=driver).outcome == "active"
    reservation_cancel(reservation=r, actor_label="user:test")  # stopped early: releasing
    release = {"reservation_id": r.pk, "driver": driver, "check_window": 0}
    assert reservation_release_step(**release).outcome == "waiting"
    stop = agent_job_lease(node=node)
    AgentJob.objects.filter(pk=stop.pk).update(
        lease_expires_at=timezone.now() - settings.AGENT_JOB_STALL - timedelta(seconds=1)
    )

    result = reservation_release_step(**release)

    r.refresh_from_db()
    assert (result.outcome, r.status) == ("completed", S.COMPLETED)
    assert AgentJob.objects.get(pk=stop.pk).status == AgentJobStatus.LEASED  # for its return


def test_a_prepare_whose_lease_ran_out_long_ago_is_not_a_stalled_node(market, settings):
    # Only stops: a prepare or start lying leased is handed out again, not a node failure.
    node = market.nodes[0]
    r, target = _queued_to_run(market)
    prepare = agent_job_lease(node=node)
    AgentJob.objects.filter(pk=prepare.pk).update(
        lease_expires_at=timezone.now() - settings.AGENT_JOB_STALL - timedelta(seconds=1)
    )
    check = SiteAgentDriver().check(target)
    assert (check.state, check.stalled_node_id) == ("pending", None)


def test_a_start_whose_lease_ran_out_while_its_reservation_moved_is_cancelled(market):
    """The agent lost its lease on a start mid-job (it crashed or hung), and meanwhile the
    reservation moved to other GPUs (a GPU failed): the old start must not run again, or it
    would put the workload back on the GPUs it left, and replace the new container."""
    node = market.nodes[0]
    r, target = _queued_to_run(market)
    driver = SiteAgentDriver()
    prepare = agent_job_lease(node=node)
    agent_job_complete(node=node, job_id=prepare.pk, lease_id=prepare.lease_owner, result={})
    old_start = agent_job_lease(node=node, lease_seconds=5)
    assert (old_start.kind, old_start.generation) == ("start", 0)
    r.placement_generation = 1
    r.save(update_fields=["placement_generation"])
    moved = Target(
        r.pk, r.public_id, r.workload, (NodeTarget(node.pk, node.hostname, (2,)),), generation=1
    )
    driver.prepare(moved)  # a stop of generation 0 on the node, then generation 1's prepare
    AgentJob.objects.filter(pk=old_start.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )

    handed = [agent_job_lease(node=node) for _ in range(3)]

    assert [(j.kind, j.generation) for j in handed if j] == [("stop", 0), ("prepare", 1)]
    old_start.refresh_from_db()
    assert (old_start.status, old_start.error) == (
        AgentJobStatus.CANCELLED,
        "Not handed out: its reservation was placed again since.",
    )


def test_a_start_completed_after_its_reservation_moved_has_its_stop_run_again(market):
    """The agent was still running the old start when the reservation moved (a GPU failed) and
    ran the old generation's stop meanwhile, before the container existed: the container the
    start then made holds GPUs the reservation left (which may be sold again), so the stop
    of that generation on that node runs again."""
    node = market.nodes[0]
    r, target = _queued_to_run(market)
    prepare = agent_job_lease(node=node)
    agent_job_complete(node=node, job_id=prepare.pk, lease_id=prepare.lease_owner, result={})
    old_start = agent_job_lease(node=node)
    r.placement_generation = 1
    r.save(update_fields=["placement_generation"])
    moved = Target(
        r.pk, r.public_id, r.workload, (NodeTarget(node.pk, node.hostname, (2,)),), generation=1
    )
    SiteAgentDriver().prepare(moved)
    stop = agent_job_lease(node=node)
    assert (stop.kind, stop.generation) == ("stop", 0)
    agent_job_complete(node=node, job_id=stop.pk, lease_id=stop.lease_owner, result={})

    agent_job_complete(
        node=node, job_id=old_start.pk, lease_id=old_start.lease_owner, result={"host": "h"}
    )

    stop.refresh_from_db()
    assert (stop.status, stop.lease_owner, stop.finished_at) == (AgentJobStatus.QUEUED, "", None)
    again = agent_job_lease(node=node)
    assert (again.pk, again.kind) == (stop.pk, "stop")


def test_a_start_of_the_current_placement_completing_queues_no_stop(market):
    node = market.nodes[0]
    r, target = _queued_to_run(market)
    for _ in range(2):
        job = agent_job_lease(node=node)
        agent_job_complete(node=node, job_id=job.pk, lease_id=job.lease_owner, result={})

    assert not AgentJob.objects.filter(reservation=r, kind="stop").exists()
