"""A workload report restarts in place an active reservation whose container is gone or
stalled, and ends one whose workload exited by itself (only delivered time is billed); never
one whose container the platform stopped on purpose, nor on a report that may predate the
container. The restart itself, its outage and the crash-loop limit: test_agent_report_restart."""

from datetime import timedelta

import pytest
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from inventory.heartbeats import LAST_SEEN_KEY
from inventory.telemetry import buffer_client
from marketplace.models import AgentJob, AgentJobStatus, Allocation, Reservation, ReservationStatus
from marketplace.provisioning import agent_reports
from marketplace.provisioning.agent_jobs import agent_job_enqueue
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import placement_generation_raise, reservation_provision_step
from marketplace.services.reservations import reservation_create
from tests.clients import HttpsAPIClient
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import agent_client, market_create, statuses

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus
REPORT = "/api/v1/agent/workloads"
HEARTBEAT = "/api/v1/agent/heartbeat"
LEASE = "/api/v1/agent/jobs/lease"


def _run_jobs(agent: HttpsAPIClient) -> list[str]:
    """The node's agent does every job it is handed; returns their kinds."""
    kinds = []
    while (job := agent.post(LEASE, {}, format="json")).status_code == 200:
        result = {"host": "gpu.site.example", "ports": {}}
        done = agent.post(
            f"/api/v1/agent/jobs/{job.data['id']}/complete",
            {"lease_id": job.data["lease_id"], "result": result},
            format="json",
        )
        assert done.status_code == 200
        kinds.append(job.data["kind"])
    return kinds


def _provision(r) -> None:
    outcome = reservation_provision_step(
        reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0
    ).outcome
    assert outcome in ("waiting", "active")


def _container(r, state: str, **extra) -> dict:
    return {"name": f"sy-{r.public_id}", "reservation": r.public_id, "state": state, **extra}


def _heartbeat(agent: HttpsAPIClient) -> None:
    assert agent.post(HEARTBEAT, {}, format="json").status_code == 200


def _active_through_agent(tier: str = "on_demand"):
    """A reservation made active through its node's agent, which has heartbeated since."""
    market = market_create(nodes=2, gpus=4)
    if tier == "reserved":
        start = timezone.now()
        r = reservation_create(
            organization=OrganizationFactory(),
            gpu_model=market.gpu_model.slug,
            gpu_count=2,
            starts_at=start,
            ends_at=start + timedelta(days=7),
            tier=tier,
            term="1w",
            site=market.site.slug,
        )
    else:
        r = market.book(gpu_count=2, tier=tier)
    _provision(r)
    node = Allocation.objects.filter(reservation=r, is_live=True).first().node
    agent = agent_client(node)
    assert _run_jobs(agent) == ["prepare", "start"]
    _provision(r)
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE
    _heartbeat(agent)
    return Reservation.objects.get(pk=r.pk), node, agent, market


@pytest.fixture
def active():
    return _active_through_agent()


def test_a_running_container_changes_nothing(active):
    r, _node, agent, _ = active
    response = agent.post(REPORT, {"containers": [_container(r, "running")]}, format="json")
    assert response.status_code == 200
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_a_container_missing_from_a_complete_report_restarts_the_workload_in_place(active):
    r, node, agent, _ = active
    gpus = set(Allocation.objects.filter(reservation=r, is_live=True).values_list("gpu_id"))

    response = agent.post(REPORT, {"containers": []}, format="json")

    assert response.status_code == 200
    r = Reservation.objects.get(pk=r.pk)
    assert r.status == S.PROVISIONING
    assert r.released_at is None
    assert r.placement_generation == 1
    assert r.status_reason.startswith(
        f"The workload's container is gone: node {node.hostname}'s agent no longer runs it "
        "(its report at "
    )
    assert r.status_reason.endswith(
        "); it restarts in place on the same GPUs (restart 1 of at most 3 within 1 h), and "
        "the time until it runs again is not charged."
    )
    assert statuses(r)[-2:] == [S.ACTIVE, S.PROVISIONING]
    assert r.transitions.last().actor_label == "system: site agent"
    live = set(Allocation.objects.filter(reservation=r, is_live=True).values_list("gpu_id"))
    assert live == gpus


def test_a_report_of_other_containers_only_restarts_the_one_missing(active):
    r, _node, agent, market = active
    agent.post(
        REPORT,
        {"containers": [{"name": "sy-r_other", "reservation": "r_other", "state": "running"}]},
        format="json",
    )
    assert Reservation.objects.get(pk=r.pk).status == S.PROVISIONING


@pytest.mark.parametrize("state", ["created", "paused", "restarting", "removing", "unknown"])
def test_a_container_that_stalled_restarts_the_workload_in_place(active, state):
    r, _node, agent, _ = active
    response = agent.post(REPORT, {"containers": [_container(r, state)]}, format="json")

    assert response.status_code == 200
    r = Reservation.objects.get(pk=r.pk)
    assert r.status == S.PROVISIONING
    assert r.placement_generation == 1
    assert r.status_reason == (
        f"The workload is not running: its container is {state}; it restarts in place on the "
        "same GPUs (restart 1 of at most 3 within 1 h), and the time until it runs again is "
        "not charged. It wrote no log."
    )


def test_a_report_that_may_predate_the_start_ends_nothing_until_a_later_heartbeat():
    market = market_create(nodes=1, gpus=4)
    r = market.book(gpu_count=2)
    _provision(r)
    node = market.nodes[0]
    agent = agent_client(node)
    _heartbeat(agent)  # the agent's heartbeat, then its listing: no container yet
    assert _run_jobs(agent) == ["prepare", "start"]  # meanwhile the start completes
    _provision(r)
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE

    # The report built after that heartbeat arrives now: it cannot show the new container.
    agent.post(REPORT, {"containers": []}, format="json")
    agent.post(REPORT, {"containers": [_container(r, "exited", exit_code=0)]}, format="json")
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE

    # The next heartbeat (a routine one: buffered in Redis) comes after the start.
    _heartbeat(agent)
    assert buffer_client().hget(LAST_SEEN_KEY, str(node.pk)) is not None
    agent.post(REPORT, {"containers": []}, format="json")
    assert Reservation.objects.get(pk=r.pk).status == S.PROVISIONING  # restarted


def test_a_start_job_not_done_ends_nothing(active):
    r, node, agent, _ = active
    AgentJob.objects.filter(reservation=r, node=node, kind="start").update(
        status=AgentJobStatus.LEASED
    )
    agent.post(REPORT, {"containers": []}, format="json")
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_a_container_being_stopped_by_its_stop_job_does_not_fail_the_reservation(active):
    r, node, agent, _ = active
    agent_job_enqueue(
        reservation_id=r.pk,
        node_id=node.pk,
        kind="stop",
        generation=r.placement_generation,
        payload={"container_name": f"sy-{r.public_id}"},
    )
    # Between the stop's `stop -t` and its `rm -f`, then after it.
    agent.post(REPORT, {"containers": [_container(r, "exited", exit_code=143)]}, format="json")
    agent.post(REPORT, {"containers": []}, format="json")
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_another_nodes_agent_cannot_end_the_reservation(active):
    r, node, _agent_here, market = active
    other = agent_client(next(n for n in market.nodes if n.pk != node.pk))
    _heartbeat(other)
    other.post(REPORT, {"containers": []}, format="json")
    other.post(REPORT, {"containers": [_container(r, "exited", exit_code=1)]}, format="json")
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_a_pause_that_commits_while_the_report_is_judged_wins(active, monkeypatch):
    """The report read the reservation's generation; a pause for resale (a new generation,
    its container stopped) commits before the report ends it: the term is left alone."""
    r, _node, agent, _ = active
    judged = agent_reports._judged

    def pause_meanwhile(*args, **kwargs):
        items = judged(*args, **kwargs)
        placement_generation_raise(Reservation.objects.get(pk=r.pk))
        return items

    monkeypatch.setattr(agent_reports, "_judged", pause_meanwhile)
    agent.post(REPORT, {"containers": []}, format="json")
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_a_reserved_terms_exit_says_the_term_was_charged_in_full_and_is_not_refunded():
    r, _node, agent, _ = _active_through_agent(tier="reserved")
    credits_before = LedgerEntry.objects.filter(
        organization=r.organization, kind=LedgerKind.TERM_REFUND
    ).count()
    exited = _container(r, "exited", exit_code=1, finished_at="2026-12-06T10:31:02Z")

    agent.post(REPORT, {"containers": [exited]}, format="json")

    r = Reservation.objects.get(pk=r.pk)
    assert r.status == S.FAILED
    assert r.status_reason == (
        "The workload exited with code 1 at 2026-12-06T10:31:02Z; the reservation ended. "
        "A reserved term is charged in full when it is booked: the rest of the term is not "
        "refunded when its workload ends itself. It wrote no log."
    )
    assert not r.cancellation.get("refund_amount")
    assert "not charged" not in r.status_reason
    assert (
        LedgerEntry.objects.filter(organization=r.organization, kind=LedgerKind.TERM_REFUND).count()
        == credits_before
    )


def test_an_old_heartbeat_time_is_not_trusted_for_a_newer_start(active):
    """The start finished after every heartbeat the node sent: the report may predate it."""
    r, node, agent, _ = active
    AgentJob.objects.filter(reservation=r, node=node, kind="start").update(
        finished_at=timezone.now() + timedelta(minutes=5)
    )
    agent.post(REPORT, {"containers": []}, format="json")
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


@pytest.mark.parametrize(
    ("state", "finished_at", "said"),
    [
        ("exited", "2026-12-06T10:31:02Z; pay now at evil.example", "at an unknown time"),
        ("exited", "2026-12-06 10:31:02.123 +0000 UTC", "at 2026-12-06 10:31:02.123 +0000 UTC"),
        ("Call +1 555 0100 now", None, "its container is unknown"),
    ],
)
def test_only_what_a_container_runtime_reports_reaches_the_customers_reason(
    state, finished_at, said
):
    """A node agent's report is quoted into the reason the customer reads: a state or exit
    time that is not the runtime's (a stolen token, a buggy agent) reads as unknown."""
    r, _node, agent, _ = _active_through_agent()
    report = _container(r, state, exit_code=1, finished_at=finished_at)

    assert agent.post(REPORT, {"containers": [report]}, format="json").status_code == 200

    reason = Reservation.objects.get(pk=r.pk).status_reason
    assert said in reason
    assert "evil" not in reason and "555" not in reason
