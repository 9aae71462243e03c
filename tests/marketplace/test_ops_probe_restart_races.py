"""Operator's and customer's probes of restart in place racing other moves: a GPU failure, a
node failure, a customer's cancel, the crash-loop window's edge, a restart that cannot start,
and an agent that restarts mid-restart."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.services.credits import cancellation_settle
from billing.services.usage import outage_intervals
from inventory.models import Gpu, GpuHealth, Node, NodeStatus, OutageCause
from inventory.telemetry import gpu_health_apply
from marketplace.models import (
    AgentJob,
    AgentJobStatus,
    Allocation,
    Event,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    ReservationTransition,
)
from marketplace.provisioning.drivers import DriverError, SiteAgentDriver
from marketplace.provisioning.services import (
    WORKLOAD_LOST_CAUSE,
    reservation_outages_reconcile,
    reservation_provision_step,
    reservation_release_step,
)
from marketplace.services.gpu_failures import gpu_failures_handle, reservation_gpu_failure_handle
from marketplace.services.reservations import reservation_cancel, reservation_create
from tests.factories import OrganizationFactory, UserFactory
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.marketplace.test_agent_report_delivery import (
    HEARTBEAT,
    LEASE,
    REPORT,
    _active_through_agent,
    _container,
    _heartbeat,
    _provision,
    _run_jobs,
)
from tests.provisioning_support import agent_client, market_create

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


def _fresh(r) -> Reservation:
    return Reservation.objects.get(pk=r.pk)


def _back_at(r):
    return _fresh(r).transitions.filter(to_status=S.ACTIVE).order_by("at").last().at


def _covered(r, lo, hi) -> bool:
    """Whether billing's outages of the reservation cover [lo, hi) without a gap."""
    for start, end in outage_intervals(reservation=_fresh(r), until=hi):
        if start <= lo < end:
            lo = end
    return lo >= hi


def _all_agents_run(market) -> list[str]:
    kinds = []
    for node in market.nodes:
        kinds += _run_jobs(agent_client(node))
    return kinds


def _fail_gpu(gpu: Gpu) -> None:
    gpu_health_apply(
        gpu=gpu,
        health=GpuHealth.FAILED,
        reason="2 uncorrectable ECC error(s)",
        actor_label="node agent",
        now=timezone.now(),
    )


def _restarts_counted(r) -> int:
    return ReservationTransition.objects.filter(
        reservation=r, from_status=S.ACTIVE, to_status=S.PROVISIONING, actor_label=ACTOR_AGENT
    ).count()


ACTOR_AGENT = "system: site agent"


def test_a_gpu_failure_during_a_restart_moves_it_and_one_outage_runs_until_it_answers():
    r, node, agent, market = _active_through_agent()
    reported_at = timezone.now()
    agent.post(REPORT, {"containers": []}, format="json")
    bad = Allocation.objects.filter(reservation=r, is_live=True).first().gpu

    _fail_gpu(bad)
    assert gpu_failures_handle()["moved"] == 1

    moved = _fresh(r)
    assert (moved.status, moved.placement_generation) == (S.SCHEDULED, 2)
    assert bad.pk not in set(
        Allocation.objects.filter(reservation=r, is_live=True).values_list("gpu_id", flat=True)
    )
    _provision(r)
    kinds = _all_agents_run(market)
    assert kinds.count("start") == 1 and kinds.count("stop") == 1  # gen 0 stopped, 2 started
    _provision(r)
    assert _fresh(r).status == S.ACTIVE
    assert not AgentJob.objects.filter(reservation=r, generation=1, status=AgentJobStatus.DONE)
    reservation_outages_reconcile()
    gpu_failures_handle()

    outages = list(ReservationOutage.objects.filter(reservation=r))
    assert [(o.cause, o.ended_at) for o in outages] == [(WORKLOAD_LOST_CAUSE, _back_at(r))]
    assert reported_at <= outages[0].started_at
    assert _covered(r, outages[0].started_at, _back_at(r))
    assert _restarts_counted(r) == 1  # the move is not a restart in place


def test_a_vanish_just_after_a_gpu_move_came_back_ends_that_outage_at_its_return():
    """A GPU failure moved the workload (to a GPU of the same node) and it answered again; its
    container vanishes before the GPU sweep closed the failure's outage: that outage ends
    where the workload came back, and the restart's own runs from the report."""
    market = market_create(nodes=1, gpus=4)
    r = market.book(gpu_count=2)
    node = market.nodes[0]
    agent = agent_client(node)
    _provision(r)
    _run_jobs(agent)
    _provision(r)
    _fail_gpu(Allocation.objects.filter(reservation=r, is_live=True).first().gpu)
    assert reservation_gpu_failure_handle(reservation_id=r.pk) == "moved"
    _provision(r)
    assert _run_jobs(agent) == ["stop", "prepare", "start"]
    _provision(r)
    came_back = _back_at(r)
    _heartbeat(agent)
    gpu_outage = ReservationOutage.objects.get(reservation=r, cause=OutageCause.GPU_FAILURE)
    assert gpu_outage.ended_at is None  # its sweep has not run yet

    reported_at = timezone.now()
    assert agent.post(REPORT, {"containers": []}, format="json").status_code == 200

    assert _fresh(r).status == S.PROVISIONING
    gpu_outage.refresh_from_db()
    assert gpu_outage.ended_at == came_back
    lost = ReservationOutage.objects.get(reservation=r, cause=WORKLOAD_LOST_CAUSE)
    assert (lost.started_at >= reported_at, lost.ended_at) == (True, None)


def test_an_agent_reported_node_failure_during_a_restart_moves_it_to_another_node():
    r, node, agent, market = _active_through_agent()
    reported_at = timezone.now()
    agent.post(REPORT, {"containers": []}, format="json")
    _provision(r)
    kinds = []
    while (job := agent.post(LEASE, {}, format="json")).status_code == 200:
        kinds.append(job.data["kind"])
        if job.data["kind"] == "prepare":
            agent.post(
                f"/api/v1/agent/jobs/{job.data['id']}/fail",
                {"lease_id": job.data["lease_id"], "error": "podman hangs", "node_failure": True},
                format="json",
            )
        else:
            agent.post(
                f"/api/v1/agent/jobs/{job.data['id']}/complete",
                {"lease_id": job.data["lease_id"], "result": {}},
                format="json",
            )
    assert kinds == ["stop", "prepare"]
    step = reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)
    assert step.outcome == "retry"
    assert Node.objects.get(pk=node.pk).status == NodeStatus.MAINTENANCE

    _provision(r)
    other = next(n for n in market.nodes if n.pk != node.pk)
    assert _run_jobs(agent_client(other)) == ["prepare", "start"]
    _provision(r)
    assert _fresh(r).status == S.ACTIVE
    reservation_outages_reconcile()

    lost = ReservationOutage.objects.get(reservation=r, cause=WORKLOAD_LOST_CAUSE)
    assert reported_at <= lost.started_at
    assert _covered(r, lost.started_at, _back_at(r))
    assert not ReservationOutage.objects.filter(reservation=r, ended_at=None).exists()
    assert _restarts_counted(r) == 1


def test_a_cancel_while_the_agent_runs_the_restarts_start_stops_the_new_container():
    """The customer cancels while the agent holds the restart's start job: the teardown stops
    the new generation once the agent is done with it, and the outage ends at the cancel."""
    r, node, agent, _ = _active_through_agent(tier="reserved")
    agent.post(REPORT, {"containers": []}, format="json")
    _provision(r)
    for kind in ("stop", "prepare"):
        job = agent.post(LEASE, {}, format="json").data
        assert job["kind"] == kind
        agent.post(
            f"/api/v1/agent/jobs/{job['id']}/complete",
            {"lease_id": job["lease_id"], "result": {}},
            format="json",
        )
    start = agent.post(LEASE, {}, format="json").data
    assert (start["kind"], start["payload"]["generation"]) == ("start", 1)

    reservation_cancel(reservation=_fresh(r), actor_label="customer", reason="")
    cancelled = _fresh(r)
    assert cancelled.status == S.CANCELLED
    assert reservation_release_step(
        reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0
    ).outcome in ("waiting", "torn_down")
    agent.post(
        f"/api/v1/agent/jobs/{start['id']}/complete",
        {"lease_id": start["lease_id"], "result": {"host": "gpu.site.example", "ports": {}}},
        format="json",
    )
    stop = agent.post(LEASE, {}, format="json").data
    assert (stop["kind"], stop["payload"]["generation"]) == ("stop", 1)

    reservation_outages_reconcile()
    outage = ReservationOutage.objects.get(reservation=r)
    assert (outage.cause, outage.ended_at) == (WORKLOAD_LOST_CAUSE, cancelled.released_at)
    assert reservation_outages_reconcile() == (0, 0)  # closed once


def test_restarts_spread_across_the_windows_edge_count_only_those_inside_it(settings):
    """Limit 2 within 1 h: a restart 61 min ago is out of the window, one 30 min ago in it;
    a GPU failure's move in between is not a restart in place. The next vanish restarts (2 of
    2), the one after ends it."""
    settings.PROVISIONING_WORKLOAD_RESTARTS = 2
    r, _node, agent, market = _active_through_agent()

    def restart_and_back(ago: timedelta) -> None:
        agent.post(REPORT, {"containers": []}, format="json")
        _provision(r)
        _all_agents_run(market)
        _provision(r)
        assert _fresh(r).status == S.ACTIVE
        ReservationTransition.objects.filter(
            reservation=r, actor_label=ACTOR_AGENT, at__gt=timezone.now() - timedelta(minutes=1)
        ).update(at=timezone.now() - ago)
        _heartbeat(agent)

    restart_and_back(timedelta(minutes=61))
    _fail_gpu(Allocation.objects.filter(reservation=r, is_live=True).first().gpu)
    gpu_failures_handle()
    _provision(r)
    _all_agents_run(market)
    _provision(r)
    assert _fresh(r).status == S.ACTIVE
    for n in market.nodes:
        agent_client(n).post(HEARTBEAT, {}, format="json")
    restart_and_back(timedelta(minutes=30))

    on = Allocation.objects.filter(reservation=r, is_live=True).first().node
    reporter = agent_client(on)
    reporter.post(REPORT, {"containers": []}, format="json")
    assert _fresh(r).status == S.PROVISIONING
    assert "(restart 2 of at most 2 within 1 h)" in _fresh(r).status_reason
    _provision(r)
    _all_agents_run(market)
    _provision(r)
    reporter.post(HEARTBEAT, {}, format="json")

    reporter.post(REPORT, {"containers": []}, format="json")
    ended = _fresh(r)
    assert ended.status == S.FAILED
    assert "it was restarted in place 2 time(s) within 1 h, the most allowed" in (
        ended.status_reason
    )


class _FlakySiteAgent(SiteAgentDriver):
    """The site agent's driver whose queueing fails `errors` times (a database or network
    blip between the worker and the jobs' table): a transient DriverError."""

    def __init__(self, errors: int):
        self.errors = errors

    def prepare(self, target) -> None:
        if self.errors:
            self.errors -= 1
            raise DriverError("the job queue did not answer")
        super().prepare(target)


def test_a_restarts_transient_errors_count_from_its_last_activation_not_the_terms_life():
    """A term that needed four tries to start the first time, months of running later, gets a
    blip while being restarted in place: the restart is retried, not given up on."""
    market = market_create(nodes=1, gpus=4)
    r = market.book(gpu_count=2, seconds=7 * 24 * 3600)
    agent = agent_client(market.nodes[0])
    flaky = _FlakySiteAgent(errors=4)
    for _ in range(4):
        step = reservation_provision_step(reservation_id=r.pk, driver=flaky, check_window=0)
        assert step.outcome == "retry"
    _provision(r)
    _run_jobs(agent)
    _provision(r)
    assert _fresh(r).status == S.ACTIVE
    _heartbeat(agent)
    agent.post(REPORT, {"containers": []}, format="json")
    assert _fresh(r).status == S.PROVISIONING

    step = reservation_provision_step(
        reservation_id=r.pk, driver=_FlakySiteAgent(errors=1), check_window=0
    )

    assert step.outcome == "retry"
    assert _fresh(r).status == S.PROVISIONING
    _provision(r)
    assert _run_jobs(agent) == ["stop", "prepare", "start"]
    _provision(r)
    assert _fresh(r).status == S.ACTIVE


def test_a_restart_whose_image_is_gone_fails_with_a_readable_reason_and_no_secret():
    workload = {"image": "registry.example/team/trainer:v7", "env": {"HF_TOKEN": "hf_s3cretvalue"}}
    market = market_create(nodes=1, gpus=4)
    start = timezone.now()
    r = reservation_create(
        organization=OrganizationFactory(),
        gpu_model=market.gpu_model.slug,
        gpu_count=2,
        starts_at=start,
        ends_at=start + timedelta(days=7),
        tier="reserved",
        term="1w",
        site=market.site.slug,
        workload=workload,
    )
    agent = agent_client(market.nodes[0])
    _provision(r)
    _run_jobs(agent)
    _provision(r)
    _heartbeat(agent)
    agent.post(
        REPORT,
        {"containers": [_container(r, "paused", log_tail="token=hf_s3cretvalue\nstalled")]},
        format="json",
    )
    restarting = _fresh(r)
    assert restarting.status == S.PROVISIONING
    assert "hf_s3cretvalue" not in restarting.status_reason
    assert restarting.status_reason.endswith("Last log lines:\ntoken=[redacted]\nstalled")
    _provision(r)
    while (job := agent.post(LEASE, {}, format="json")).status_code == 200:
        if job.data["kind"] == "prepare":  # the registry lost the tag meanwhile
            agent.post(
                f"/api/v1/agent/jobs/{job.data['id']}/fail",
                {
                    "lease_id": job.data["lease_id"],
                    "error": "The image registry.example/team/trainer:v7 could not be pulled: "
                    "manifest unknown (auth hf_s3cretvalue)",
                },
                format="json",
            )
        else:
            agent.post(
                f"/api/v1/agent/jobs/{job.data['id']}/complete",
                {"lease_id": job.data["lease_id"], "result": {}},
                format="json",
            )

    step = reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)

    assert step.outcome == "failed"
    failed = _fresh(r)
    assert failed.status == S.FAILED
    assert failed.status_reason == (
        "The workload could not start: The image registry.example/team/trainer:v7 could not "
        "be pulled: manifest unknown (auth [redacted])"
    )
    for event in Event.objects.filter(object_id=r.public_id):
        assert "hf_s3cretvalue" not in str(event.data)
    reservation_outages_reconcile()
    outage = ReservationOutage.objects.get(reservation=r)
    assert outage.ended_at == failed.released_at
    credit = cancellation_settle(reservation_id=r.pk)
    assert credit is not None and credit.amount_minor > 0
    assert cancellation_settle(reservation_id=r.pk) is None  # once


def test_an_agent_restarted_mid_restart_finishes_it_and_its_reports_meanwhile_change_nothing():
    """The agent dies holding the restart's start job (its container may be up): the agent
    that comes back reports meanwhile (the container running, or nothing), which changes
    nothing while the reservation is provisioning; the start is handed out again once its
    lease ran out, and the workload is active again."""
    r, node, agent, _ = _active_through_agent()
    agent.post(REPORT, {"containers": []}, format="json")
    _provision(r)
    for kind in ("stop", "prepare", "start"):
        job = agent.post(LEASE, {}, format="json").data
        assert job["kind"] == kind
        if kind != "start":
            agent.post(
                f"/api/v1/agent/jobs/{job['id']}/complete",
                {"lease_id": job["lease_id"], "result": {}},
                format="json",
            )
    generation = _fresh(r).placement_generation
    back = agent_client(node)  # the agent restarted (a new process)
    _heartbeat(back)
    for containers in ([_container(r, "running")], [], [_container(r, "created")]):
        assert back.post(REPORT, {"containers": containers}, format="json").status_code == 200
        assert (_fresh(r).status, _fresh(r).placement_generation) == (S.PROVISIONING, generation)
    assert back.post(LEASE, {}, format="json").status_code == 204  # the lease still holds

    AgentJob.objects.filter(pk=job["id"]).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    again = back.post(LEASE, {}, format="json").data
    assert (again["id"], again["kind"]) == (job["id"], "start")
    back.post(
        f"/api/v1/agent/jobs/{again['id']}/complete",
        {"lease_id": again["lease_id"], "result": {"host": "gpu.site.example", "ports": {}}},
        format="json",
    )
    _provision(r)
    assert _fresh(r).status == S.ACTIVE
    assert _restarts_counted(r) == 1


def test_staff_see_how_many_restarts_and_why_on_the_reservation_page(client, settings):
    settings.PROVISIONING_WORKLOAD_RESTARTS = 3
    r, node, agent, market = _active_through_agent()
    agent.post(REPORT, {"containers": [_container(r, "paused")]}, format="json")
    _provision(r)
    _all_agents_run(market)
    _provision(r)
    ReservationTransition.objects.filter(reservation=r, actor_label=ACTOR_AGENT).update(
        at=timezone.now() - timedelta(hours=2)
    )
    _heartbeat(agent)
    agent.post(REPORT, {"containers": []}, format="json")
    client.force_login(UserFactory(username="ops", is_staff=True, is_superuser=True))

    page = client.get(reverse("admin:marketplace_reservation_change", args=[r.pk]))

    assert page.status_code == 200
    html = page.content.decode()
    assert "Restarts in place" in html
    assert "2 in all; 1 within the last 1 h (at most 3)" in html
    assert "its container is paused; it restarts in place on the same GPUs" in html
    assert f"The workload&#x27;s container is gone: node {node.hostname}" in html
    assert WORKLOAD_LOST_CAUSE in html
