"""A container the agent still reports for a reservation that no longer holds its node (its
stop failed, or ran somewhere else) holds GPUs that are sold again: the workload report queues
its stop again, so the agent removes it and a start on those GPUs waits for it."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import AgentJob, AgentJobStatus, Allocation, Reservation, ReservationStatus
from marketplace.provisioning.agent_jobs import agent_job_lease
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import reservation_release_step
from marketplace.services.reservations import reservation_cancel
from marketplace.services.transitions import reservation_transition
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.marketplace.test_agent_report_delivery import (
    LEASE,
    REPORT,
    _active_through_agent,
    _container,
    _heartbeat,
    _provision,
    _run_jobs,
)
from tests.provisioning_support import agent_client

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


def _stopped_early_with_a_failed_stop(r, agent):
    """The customer stops r; its agent's `stop` fails (the runtime erred): the release still
    completes and frees the GPUs, the container still runs."""
    reservation_cancel(reservation=r, actor_label="user:test")
    assert reservation_release_step(
        reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0
    ).outcome in ("waiting", "completed")
    job = agent.post(LEASE, {}, format="json")
    assert job.data["kind"] == "stop"
    failed = agent.post(
        f"/api/v1/agent/jobs/{job.data['id']}/fail",
        {"lease_id": job.data["lease_id"], "error": "podman stop failed: state improper"},
        format="json",
    )
    assert failed.status_code == 200
    reservation_release_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)
    assert Reservation.objects.get(pk=r.pk).status == S.COMPLETED
    return AgentJob.objects.get(pk=job.data["id"])


def _a_lease_ago(job: AgentJob) -> None:
    AgentJob.objects.filter(pk=job.pk).update(finished_at=timezone.now() - timedelta(minutes=2))


def test_a_container_whose_stop_failed_gets_its_stop_queued_again_and_holds_its_gpus():
    r, node, agent, market = _active_through_agent()
    gpus = sorted(Allocation.objects.filter(reservation=r).values_list("gpu__index", flat=True))
    stop = _stopped_early_with_a_failed_stop(r, agent)
    running = {"containers": [_container(r, "running")]}

    # Straight after the failure the report may predate it: nothing is queued yet.
    _heartbeat(agent)
    assert agent.post(REPORT, running, format="json").status_code == 200
    stop.refresh_from_db()
    assert stop.status == AgentJobStatus.FAILED

    # A lease later, with a heartbeat since, the container is still there: its stop again.
    _a_lease_ago(stop)
    _heartbeat(agent)
    assert agent.post(REPORT, running, format="json").status_code == 200
    stop.refresh_from_db()
    assert (stop.status, stop.error, stop.finished_at) == (AgentJobStatus.QUEUED, "", None)
    assert stop.payload["gpu_indexes"] == gpus
    assert AgentJob.objects.filter(reservation=r, kind="stop").count() == 1
    assert Reservation.objects.get(pk=r.pk).status == S.COMPLETED  # nothing else changes

    # A new booking on those GPUs: its start waits for that stop, which the agent is handed.
    other = market.book(gpu_count=4)
    _provision(other)
    assert Allocation.objects.filter(reservation=other, node=node).count() == 4
    assert _run_jobs(agent) == ["stop", "prepare", "start"]
    stop.refresh_from_db()
    assert stop.status == AgentJobStatus.DONE

    # Reported again while its stop is queued or leased: left alone.
    assert agent.post(REPORT, running, format="json").status_code == 200
    assert AgentJob.objects.get(pk=stop.pk).status == AgentJobStatus.DONE


def test_a_container_of_an_ended_reservation_without_a_stop_gets_one():
    r, node, agent, _ = _active_through_agent()
    reservation_transition(reservation=r, to_status=S.FAILED, cause="staff", actor_label="staff")
    assert not AgentJob.objects.filter(reservation=r, kind="stop").exists()

    assert (
        agent.post(REPORT, {"containers": [_container(r, "running")]}, format="json").status_code
        == 200
    )

    stop = AgentJob.objects.get(reservation=r, kind="stop")
    start = AgentJob.objects.get(reservation=r, kind="start")
    assert (stop.node_id, stop.generation, stop.status) == (node.pk, 0, AgentJobStatus.QUEUED)
    assert stop.payload == {
        "reservation": r.public_id,
        "generation": 0,
        "gpu_indexes": start.payload["gpu_indexes"],
        "container_name": f"sy-{r.public_id}",
        "grace_seconds": 10,
    }
    assert agent_job_lease(node=node).pk == stop.pk


def test_a_container_no_agent_started_on_the_node_is_left_alone():
    r, _node, agent, market = _active_through_agent()
    other_node = next(n for n in market.nodes if n.pk != _node.pk)
    reservation_transition(reservation=r, to_status=S.FAILED, cause="staff", actor_label="staff")
    # Another node's agent names it: nothing was started there, nothing is queued there.
    other = agent_client(other_node)
    assert (
        other.post(REPORT, {"containers": [_container(r, "running")]}, format="json").status_code
        == 200
    )
    assert not AgentJob.objects.filter(reservation=r, kind="stop").exists()


def test_a_live_reservations_container_is_not_a_leftover():
    r, _node, agent, _ = _active_through_agent()
    reservation_cancel(reservation=r, actor_label="user:test")  # releasing: its stop is to come
    assert (
        agent.post(REPORT, {"containers": [_container(r, "running")]}, format="json").status_code
        == 200
    )
    assert not AgentJob.objects.filter(reservation=r, kind="stop").exists()
