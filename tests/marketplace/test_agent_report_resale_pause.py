"""A reserved term paused because every GPU of it is resold for now stays active (paid for)
while its container is stopped: the node's workload report, between the stop job's `stop`
and its `rm`, or after it, must not fail the term."""

from datetime import timedelta

import pytest

from marketplace.models import AgentJob, AgentJobStatus, ResaleListing, Reservation
from marketplace.models import ReservationStatus as S
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.scheduler import reservations_dispatch_due
from marketplace.provisioning.services import RESOLD_PAUSE_CAUSE, reservation_provision_step
from tests.clients import HttpsAPIClient
from tests.marketplace.resale_helpers import buy, listing, market, time_passes, time_passes_until
from tests.provisioning_support import agent_client

pytestmark = pytest.mark.django_db
REPORT = "/api/v1/agent/workloads"
LEASE = "/api/v1/agent/jobs/lease"


def _lease(agent: HttpsAPIClient) -> dict | None:
    job = agent.post(LEASE, {}, format="json")
    return job.data if job.status_code == 200 else None


def _complete(agent: HttpsAPIClient, job: dict) -> None:
    done = agent.post(
        f"/api/v1/agent/jobs/{job['id']}/complete",
        {"lease_id": job["lease_id"], "result": {"host": "gpu.site.example", "ports": {}}},
        format="json",
    )
    assert done.status_code == 200


def _container(term, state: str, **extra) -> dict:
    name = f"sy-{term.public_id}"
    return {"name": name, "reservation": term.public_id, "state": state, **extra}


@pytest.fixture
def paused(settings, django_capture_on_commit_callbacks):
    """A term running through its node's agent, then paused: its whole node is resold for a
    window that has begun. Returns the term, the node's agent and the leased stop job."""
    m = market(gpus=4, term_gpus=4)
    lst = listing(m, gpus=4, start_h=26, hours=2)
    buy(m, lst, start_h=26, hours=2)
    agent = agent_client(m.node)
    time_passes(timedelta(days=1, minutes=1))  # the term began a minute ago
    driver = SiteAgentDriver()
    reservation_provision_step(reservation_id=m.term.pk, driver=driver, check_window=0)
    while (job := _lease(agent)) is not None:
        _complete(agent, job)
    reservation_provision_step(reservation_id=m.term.pk, driver=driver, check_window=0)
    assert Reservation.objects.get(pk=m.term.pk).status == S.ACTIVE
    assert agent.post("/api/v1/agent/heartbeat", {}, format="json").status_code == 200

    time_passes_until(ResaleListing.objects.get(pk=lst.pk).starts_at)
    settings.PROVISIONING_DRIVER = "site_agent"  # the pause stops the container once it commits
    with django_capture_on_commit_callbacks(execute=True):
        assert reservations_dispatch_due()["resold"] == 1
    term = Reservation.objects.get(pk=m.term.pk)
    assert term.status == S.ACTIVE
    assert term.transitions.last().cause.startswith(RESOLD_PAUSE_CAUSE)
    stop = _lease(agent)  # the agent takes the stop job of the generation that ran
    assert stop is not None and stop["kind"] == "stop"
    assert stop["payload"]["generation"] == term.placement_generation - 1
    return term, agent, stop


def test_the_stopping_container_of_a_paused_term_does_not_fail_it(paused):
    term, agent, stop = paused

    # `stop -t grace` done, `rm -f` not yet: the report shows it exited.
    exited = _container(term, "exited", exit_code=143, finished_at="2026-12-06T10:31:02Z")
    response = agent.post(REPORT, {"containers": [exited]}, format="json")
    assert response.status_code == 200
    assert Reservation.objects.get(pk=term.pk).status == S.ACTIVE

    # Removed: the report no longer lists it.
    _complete(agent, stop)
    agent.post(REPORT, {"containers": []}, format="json")
    term = Reservation.objects.get(pk=term.pk)
    assert term.status == S.ACTIVE
    assert term.released_at is None
    assert AgentJob.objects.get(pk=stop["id"]).status == AgentJobStatus.DONE


def test_a_paused_terms_heartbeat_after_the_stop_still_ends_nothing(paused):
    term, agent, stop = paused
    _complete(agent, stop)
    assert agent.post("/api/v1/agent/heartbeat", {}, format="json").status_code == 200
    agent.post(REPORT, {"containers": []}, format="json")
    agent.post(REPORT, {"containers": [_container(term, "created")]}, format="json")
    assert Reservation.objects.get(pk=term.pk).status == S.ACTIVE
