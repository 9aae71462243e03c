"""The site agent's job API and the site-agent driver, through real HTTP requests."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from config.request_id import request_id_bind, request_id_unbind
from inventory.models import NodeStatus
from inventory.services import node_token_issue
from marketplace.models import AgentJob, AgentJobStatus, Allocation, ReservationStatus
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import (
    reservation_provision_step,
    reservation_release_step,
)
from tests.clients import HttpsAPIClient
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (broker_fixture is a fixture)
    agent_client,
    broker_fixture,
    market_create,
    ssh_key,
    statuses,
)

pytestmark = [pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus
LEASE = "/api/v1/agent/jobs/lease"


def _job_url(job_id: int, action: str) -> str:
    return f"/api/v1/agent/jobs/{job_id}/{action}"


@pytest.fixture
def booked(db):
    """A due reservation whose provisioning queued its prepare and start jobs."""
    market = market_create(nodes=2, gpus=4)
    r = market.book(
        gpu_count=2,
        workload={
            "image": "ghcr.io/acme/train:1.0",
            "env": {"HF_TOKEN": "hf_secret"},
            "ssh_public_keys": [ssh_key()],
            "ports": [8888],
        },
    )
    result = reservation_provision_step(
        reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0
    )
    assert result.outcome == "waiting"
    node = Allocation.objects.filter(reservation=r).first().node
    return r, node, market


def test_an_agent_leases_its_jobs_in_order_and_the_reservation_becomes_active(booked):
    r, node, _ = booked
    agent = agent_client(node)

    prepare = agent.post(LEASE, {}, format="json")
    assert prepare.status_code == 200
    assert prepare.data["kind"] == "prepare"
    assert prepare.data["payload"]["image"] == "ghcr.io/acme/train:1.0"
    # The start job waits for its prepare job.
    assert agent.post(LEASE, {}, format="json").status_code == 204

    done = agent.post(
        _job_url(prepare.data["id"], "complete"), {"lease_id": prepare.data["lease_id"]}
    )
    assert done.status_code == 200 and done.data["status"] == "done"
    start = agent.post(LEASE, {}, format="json")
    assert start.data["kind"] == "start"
    assert start.data["payload"]["env"] == {"HF_TOKEN": "hf_secret"}
    assert start.data["payload"]["ports"] == [8888]
    agent.post(
        _job_url(start.data["id"], "complete"),
        {
            "lease_id": start.data["lease_id"],
            "result": {"host": "gpu7.site.example", "ssh_port": 40022, "ports": {"8888": 40888}},
        },
        format="json",
    )

    assert reservation_provision_step(
        reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0
    ).outcome == ("active")
    r.refresh_from_db()
    assert r.connection["host"] == "gpu7.site.example"
    assert (r.connection["ssh_port"], r.connection["ports"]) == (40022, {"8888": 40888})
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]


def test_an_expired_lease_is_handed_out_again_and_only_the_new_holder_may_report(booked):
    _, node, _ = booked
    first, second = agent_client(node), agent_client(node)

    lease = first.post(LEASE, {"lease_seconds": 5}, format="json").data
    AgentJob.objects.filter(pk=lease["id"]).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    again = second.post(LEASE, {}, format="json").data

    assert again["id"] == lease["id"]
    assert again["lease_id"] != lease["lease_id"]
    assert again["attempts"] == 2
    stale = first.post(_job_url(lease["id"], "complete"), {"lease_id": lease["lease_id"]})
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "lease_lost"
    assert AgentJob.objects.get(pk=lease["id"]).status == AgentJobStatus.LEASED

    ok = second.post(_job_url(lease["id"], "complete"), {"lease_id": again["lease_id"]})
    finished_at = AgentJob.objects.get(pk=lease["id"]).finished_at
    repeat = second.post(_job_url(lease["id"], "complete"), {"lease_id": again["lease_id"]})
    late = first.post(_job_url(lease["id"], "complete"), {"lease_id": lease["lease_id"]})

    assert (ok.status_code, repeat.status_code) == (200, 200)
    assert AgentJob.objects.get(pk=lease["id"]).finished_at == finished_at
    assert late.status_code == 409 and late.json()["error"]["code"] == "job_finished"


def test_a_live_lease_is_not_handed_out_and_progress_extends_it(booked):
    _, node, _ = booked
    agent = agent_client(node)
    lease = agent.post(LEASE, {"lease_seconds": 30}, format="json").data
    before = AgentJob.objects.get(pk=lease["id"]).lease_expires_at

    assert agent.post(LEASE, {}, format="json").status_code == 204
    progress = agent.post(
        _job_url(lease["id"], "progress"),
        {"lease_id": lease["lease_id"], "progress": {"step": "pull"}, "lease_seconds": 600},
        format="json",
    )
    wrong = agent.post(_job_url(lease["id"], "progress"), {"lease_id": "not-mine"})

    assert progress.status_code == 200
    job = AgentJob.objects.get(pk=lease["id"])
    assert job.lease_expires_at > before + timedelta(seconds=500)
    assert job.progress == {"step": "pull"}
    assert wrong.status_code == 409


def test_an_agent_cannot_see_or_report_on_another_nodes_jobs(booked):
    r, node, market = booked
    other = next(n for n in market.nodes if n.pk != node.pk)
    outsider = agent_client(other)
    job = AgentJob.objects.filter(reservation=r).first()

    assert outsider.post(LEASE, {}, format="json").status_code == 204
    refused = outsider.post(_job_url(job.pk, "complete"), {"lease_id": "x"})
    assert refused.status_code == 404
    assert AgentJob.objects.get(pk=job.pk).status == AgentJobStatus.QUEUED


def test_the_job_api_refuses_requests_without_a_valid_node_token(booked):
    anonymous = HttpsAPIClient()
    forged = HttpsAPIClient()
    forged.credentials(HTTP_AUTHORIZATION="Bearer nt_00000000_forged")

    assert anonymous.post(LEASE, {}, format="json").status_code == 401
    assert forged.post(LEASE, {}, format="json").status_code == 401
    assert AgentJob.objects.filter(status=AgentJobStatus.LEASED).count() == 0


def test_a_node_failure_reported_by_the_agent_moves_the_reservation_to_another_node(booked):
    r, node, market = booked
    agent = agent_client(node)
    lease = agent.post(LEASE, {}, format="json").data

    failed = agent.post(
        _job_url(lease["id"], "fail"),
        {"lease_id": lease["lease_id"], "error": "GPU fell off the bus", "node_failure": True},
    )
    step = reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)

    node.refresh_from_db()
    assert failed.status_code == 200
    assert step.outcome == "retry"
    assert node.status == NodeStatus.MAINTENANCE
    other = next(n for n in market.nodes if n.pk != node.pk)
    assert set(
        Allocation.objects.filter(reservation=r, is_live=True).values_list("node_id", flat=True)
    ) == {other.pk}
    # The job the dead node's agent had not picked up is cancelled.
    assert AgentJob.objects.get(reservation=r, node=node, kind="start").status == (
        AgentJobStatus.CANCELLED
    )
    # The next step queues the jobs on the new node.
    assert reservation_provision_step(
        reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0
    ).outcome == ("waiting")
    assert AgentJob.objects.filter(reservation=r, node=other, kind="prepare").count() == 1


def test_a_workload_failure_reported_by_the_agent_fails_the_reservation_uncharged(booked):
    r, node, _ = booked
    agent = agent_client(node)
    lease = agent.post(LEASE, {}, format="json").data
    agent.post(
        _job_url(lease["id"], "fail"),
        {"lease_id": lease["lease_id"], "error": "manifest unknown"},
    )

    assert reservation_provision_step(
        reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0
    ).outcome == ("failed")
    r.refresh_from_db()
    node.refresh_from_db()
    assert r.status == S.FAILED and "manifest unknown" in r.status_reason
    assert r.activated_at is None
    assert node.status == NodeStatus.AVAILABLE  # the node is fine
    # What the agent had not picked up yet is cancelled; a stop job is queued.
    assert AgentJob.objects.get(reservation=r, kind="start").status == AgentJobStatus.CANCELLED
    assert AgentJob.objects.filter(reservation=r, kind="stop").count() == 1


STOPPED = (
    "The workload was stopped from outside it before it was ready (its container runtime "
    "stopped or killed it: a site operator, or the runtime shutting down; code 137, 4.1 s "
    "after start). Last log lines:\nloading HF_TOKEN=hf_secret"
)


def _start_fails(agent, body: dict) -> dict:
    """The agent runs the prepare job, then fails the start job with `body`."""
    prepare = agent.post(LEASE, {}, format="json").data
    if prepare["kind"] == "prepare":
        agent.post(_job_url(prepare["id"], "complete"), {"lease_id": prepare["lease_id"]})
        start = agent.post(LEASE, {}, format="json").data
    else:
        start = prepare
    assert start["kind"] == "start"
    failed = agent.post(
        _job_url(start["id"], "fail"), {"lease_id": start["lease_id"], **body}, format="json"
    )
    assert failed.status_code == 200
    return start


def test_a_start_the_site_stopped_from_outside_is_retried_and_becomes_active(booked):
    """An operator's `podman stop` (or a reboot) while the workload starts is the site's doing:
    the attempt is retried with backoff on the same node, which stays in sale, and the
    reservation becomes active when the next start succeeds, nothing failed or charged."""
    r, node, _ = booked
    agent = agent_client(node)
    # Queued long ago (a slow pull): queued again, the start is not read as a silent agent.
    AgentJob.objects.filter(reservation=r).update(created_at=timezone.now() - timedelta(minutes=10))
    start = _start_fails(agent, {"error": STOPPED, "stopped_by": "runtime"})
    driver = SiteAgentDriver()

    retry = reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0)

    r.refresh_from_db()
    node.refresh_from_db()
    assert (retry.outcome, retry.retry_in) == ("retry", 2)
    assert retry.detail == STOPPED.replace("hf_secret", "[redacted]")
    assert r.status == S.PROVISIONING and r.activated_at is None
    assert node.status == NodeStatus.AVAILABLE  # an operator's stop is not the node's failure
    job = AgentJob.objects.get(pk=start["id"])
    assert (job.status, job.result) == (AgentJobStatus.FAILED, {"node_failure": False,
                                                                "stopped_by": "runtime"})  # fmt: skip
    # Nothing is handed out before the retry, nor is the workload stopped.
    assert agent.post(LEASE, {}, format="json").status_code == 204
    assert not AgentJob.objects.filter(reservation=r, kind="stop").exists()

    # The retry (after its backoff) queues the same start again, on the same node.
    assert reservation_provision_step(
        reservation_id=r.pk, driver=driver, check_window=0
    ).outcome == ("waiting")
    again = agent.post(LEASE, {}, format="json").data
    assert (again["id"], again["kind"], again["attempts"]) == (start["id"], "start", 2)
    agent.post(
        _job_url(again["id"], "complete"),
        {"lease_id": again["lease_id"], "result": {"host": "gpu7.site.example", "ports": {}}},
        format="json",
    )

    assert reservation_provision_step(
        reservation_id=r.pk, driver=driver, check_window=0
    ).outcome == ("active")
    r.refresh_from_db()
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
    assert r.connection["host"] == "gpu7.site.example"
    assert list(r.provisioning_attempts.order_by("number").values_list("outcome", flat=True)) == [
        "waiting", "error", "waiting", "succeeded"
    ]  # fmt: skip


def test_a_start_stopped_from_outside_every_time_fails_once_the_attempts_run_out(booked, settings):
    settings.PROVISIONING_MAX_ATTEMPTS = 2
    r, node, _ = booked
    agent = agent_client(node)
    driver = SiteAgentDriver()
    for outcome in ("retry", "failed"):
        _start_fails(agent, {"error": STOPPED, "stopped_by": "reboot"})
        step = reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0)
        assert step.outcome == outcome
        if outcome == "retry":
            assert reservation_provision_step(
                reservation_id=r.pk, driver=driver, check_window=0
            ).outcome == ("waiting")

    r.refresh_from_db()
    node.refresh_from_db()
    assert r.status == S.FAILED and r.activated_at is None
    assert r.status_reason == (
        "Provisioning failed 2 times; last error: " + STOPPED.replace("hf_secret", "[redacted]")
    )
    assert node.status == NodeStatus.AVAILABLE  # a reboot it came back from: in sale


def test_a_start_failure_without_stopped_by_is_still_the_workloads(booked):
    """An older agent sends no stopped_by (nor does a newer one for the workload's own exit):
    the reservation fails at once, as before."""
    r, node, _ = booked
    agent = agent_client(node)
    start = _start_fails(
        agent, {"error": "The workload exited with code 3 before it was ready", "stopped_by": None}
    )

    step = reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)

    r.refresh_from_db()
    assert step.outcome == "failed"
    assert r.status == S.FAILED and r.activated_at is None
    assert AgentJob.objects.get(pk=start["id"]).result == {"node_failure": False}


def test_a_stop_from_outside_the_server_does_not_know_is_still_the_sites_and_bad_input_is_400(
    booked,
):
    r, node, _ = booked
    agent = agent_client(node)
    prepare = agent.post(LEASE, {}, format="json").data
    agent.post(_job_url(prepare["id"], "complete"), {"lease_id": prepare["lease_id"]})
    start = agent.post(LEASE, {}, format="json").data

    refused = agent.post(
        _job_url(start["id"], "fail"),
        {"lease_id": start["lease_id"], "error": "x", "stopped_by": "y" * 33},
        format="json",
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["field"] == "stopped_by"
    assert AgentJob.objects.get(pk=start["id"]).status == AgentJobStatus.LEASED

    agent.post(
        _job_url(start["id"], "fail"),
        {"lease_id": start["lease_id"], "error": "x", "stopped_by": "hypervisor"},
        format="json",
    )
    assert AgentJob.objects.get(pk=start["id"]).result == {
        "node_failure": False, "stopped_by": "site"
    }  # fmt: skip
    assert reservation_provision_step(
        reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0
    ).outcome == ("retry")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("broker")  # the booking's provision kick lands in a private queue
def test_the_site_agent_command_runs_the_jobs_over_http(live_server):
    market = market_create(nodes=1, gpus=4)
    r = market.book(gpu_count=1, workload={"ports": [8888]})
    node = market.nodes[0]
    _token, secret = node_token_issue(node=node, label="agent")
    driver = SiteAgentDriver()
    reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0)

    out = StringIO()
    call_command(
        "site_agent",
        api=live_server.url,
        token=secret,
        executor="dry-run",
        host="gpu.site.example",
        once=True,
        stdout=out,
    )

    assert (
        reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0).outcome
        == "active"
    )
    r.refresh_from_db()
    node.refresh_from_db()
    assert r.connection["host"] == "gpu.site.example"
    assert r.connection["ports"] == {"8888": 8888}
    assert node.last_heartbeat_at is not None

    type(r).objects.filter(pk=r.pk).update(
        starts_at=timezone.now() - timedelta(hours=1), ends_at=timezone.now()
    )
    assert (
        reservation_release_step(reservation_id=r.pk, driver=driver, check_window=0).outcome
        == "waiting"
    )
    call_command(
        "site_agent", api=live_server.url, token=secret, executor="dry-run", once=True, stdout=out
    )
    assert (
        reservation_release_step(reservation_id=r.pk, driver=driver, check_window=0).outcome
        == "completed"
    )
    assert list(
        AgentJob.objects.filter(reservation=r).order_by("id").values_list("kind", "status")
    ) == [("prepare", "done"), ("start", "done"), ("stop", "done")]


def test_the_container_executor_refuses_clearly_without_docker_or_podman(monkeypatch, tmp_path):
    from switchyard_agent import ContainerExecutor, SettingsError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SettingsError, match="needs podman or docker on PATH"):
        ContainerExecutor(host="h", state_dir=str(tmp_path))


def test_a_node_whose_agent_never_picks_up_the_job_is_marked_and_the_reservation_moves(booked):
    r, node, market = booked
    AgentJob.objects.filter(reservation=r).update(created_at=timezone.now() - timedelta(minutes=10))

    step = reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)

    node.refresh_from_db()
    assert step.outcome == "retry"
    assert node.status == NodeStatus.MAINTENANCE
    other = next(n for n in market.nodes if n.pk != node.pk)
    assert set(
        Allocation.objects.filter(reservation=r, is_live=True).values_list("node_id", flat=True)
    ) == {other.pk}


def test_a_release_does_not_wait_forever_for_a_silent_agent(booked):
    r, node, _ = booked
    agent = agent_client(node)
    for _ in range(2):
        job = agent.post(LEASE, {}, format="json").data
        agent.post(_job_url(job["id"], "complete"), {"lease_id": job["lease_id"]})
    driver = SiteAgentDriver()
    assert reservation_provision_step(
        reservation_id=r.pk, driver=driver, check_window=0
    ).outcome == ("active")
    now = timezone.now()
    type(r).objects.filter(pk=r.pk).update(starts_at=now - timedelta(hours=1), ends_at=now)

    first = reservation_release_step(reservation_id=r.pk, driver=driver, check_window=0)
    AgentJob.objects.filter(reservation=r, kind="stop").update(
        created_at=timezone.now() - timedelta(minutes=10)
    )
    second = reservation_release_step(reservation_id=r.pk, driver=driver, check_window=0)

    r.refresh_from_db()
    assert (first.outcome, second.outcome) == ("waiting", "completed")
    assert r.status == S.COMPLETED
    # The stop stays queued for when the agent comes back.
    assert AgentJob.objects.get(reservation=r, kind="stop").status == AgentJobStatus.QUEUED


def test_a_job_carries_the_id_of_the_request_behind_it_and_the_agent_sends_it_back(db):
    # The provisioning task runs under the id of the request that enqueued it (its Celery
    # headers); the jobs it queues keep that id, the lease hands it to the agent, and the
    # agent's reports about the job carry it as X-Request-Id, so the server logs them under it.
    market = market_create(nodes=1, gpus=2)
    r = market.book(gpu_count=1, workload={"image": "ghcr.io/acme/train:1.0"})
    tokens = request_id_bind("req_0123456789abcdef")
    try:
        reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)
    finally:
        request_id_unbind(tokens)
    assert set(AgentJob.objects.filter(reservation=r).values_list("request_id", flat=True)) == {
        "req_0123456789abcdef"
    }

    agent = agent_client(Allocation.objects.filter(reservation=r).first().node)
    prepare = agent.post(LEASE, {}, format="json")
    assert prepare.data["request_id"] == "req_0123456789abcdef"
    done = agent.post(
        _job_url(prepare.data["id"], "complete"),
        {"lease_id": prepare.data["lease_id"]},
        HTTP_X_REQUEST_ID=prepare.data["request_id"],
    )
    assert done.status_code == 200
    assert done["Request-Id"] == "req_0123456789abcdef"


def test_a_job_queued_outside_any_request_has_no_request_id(booked):
    r, node, _ = booked
    assert set(AgentJob.objects.filter(reservation=r).values_list("request_id", flat=True)) == {""}
    assert agent_client(node).post(LEASE, {}, format="json").data["request_id"] == ""
