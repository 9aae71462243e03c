"""The site-agent path end to end: a real Celery worker with the site-agent driver, the job API
served by a live server, and the `site_agent` command running as a separate process.

An agent that leases a job and dies is simulated by leasing over HTTP and never reporting:
its lease expires, the real agent gets the job, and the dead agent's late report is refused.
"""

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from django.utils import timezone

from inventory.services import node_token_issue
from marketplace.models import AgentJob, AgentJobStatus, Reservation, ReservationStatus
from marketplace.provisioning.scheduler import reservations_dispatch_due
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (the *_fixture names are fixtures)
    broker_fixture,
    driver_log_fixture,
    market_create,
    statuses,
    wait_for,
    worker_fixture,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.usefixtures("allow_all_funding"),
]
S = ReservationStatus
ROOT = Path(__file__).resolve().parents[2]


def _status(r: Reservation) -> str:
    return Reservation.objects.values_list("status", flat=True).get(pk=r.pk)


def test_a_dead_agents_job_is_handed_to_the_next_agent_and_the_reservation_runs(
    worker, live_server, tmp_path, settings
):
    # The live server tells the agent to heartbeat every 2 s: an idle agent leases when a
    # heartbeat's answer says work waits (the dead agent's lease ran out, the stop is queued),
    # so each idle wait is one heartbeat, not the default 10 s of a loaded machine's budget.
    settings.AGENT_HEARTBEAT_SECONDS = 2
    worker.start(PROVISIONING_DRIVER="site_agent")
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    _token, secret = node_token_issue(node=node, label="site agent")
    r = market.book(gpu_count=2, workload={"image": "ubuntu:24.04", "ports": [8888]})
    reservations_dispatch_due()
    wait_for(
        lambda: AgentJob.objects.filter(reservation=r, kind="prepare").exists(),
        timeout=20,
        what="the worker to queue the prepare job",
    )

    headers = {"Authorization": f"Bearer {secret}"}
    api = f"{live_server.url}/api/v1/agent/jobs"
    dead = requests.post(f"{api}/lease", json={"lease_seconds": 5}, headers=headers, timeout=10)
    assert dead.status_code == 200 and dead.json()["kind"] == "prepare"

    logs = (tmp_path / "agent.log", worker.log_path)
    log = open(logs[0], "w")  # noqa: SIM115
    agent = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "site_agent",
            "--api",
            live_server.url,
            "--token",
            secret,
            "--executor",
            "dry-run",
            "--host",
            "gpu.site.example",
            "--poll-seconds",
            "0.5",
        ],
        cwd=ROOT,
        env=os.environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: _status(r) == S.ACTIVE,
            timeout=60,
            what="the reservation to be active",
            logs=logs,
        )
        r.refresh_from_db()
        prepare = AgentJob.objects.get(reservation=r, kind="prepare")
        assert (prepare.status, prepare.attempts) == (AgentJobStatus.DONE, 2)
        assert r.connection["host"] == "gpu.site.example"
        assert r.connection["ports"] == {"8888": 8888}

        late = requests.post(
            f"{api}/{dead.json()['id']}/complete",
            json={"lease_id": dead.json()["lease_id"]},
            headers=headers,
            timeout=10,
        )
        assert late.status_code == 409
        assert late.json()["error"]["code"] == "job_finished"

        # The end comes: the release goes through the agent too.
        now = timezone.now()
        Reservation.objects.filter(pk=r.pk).update(starts_at=now - timedelta(hours=1), ends_at=now)
        reservations_dispatch_due()
        wait_for(lambda: _status(r) == S.COMPLETED, timeout=60, what="the release", logs=logs)
    finally:
        agent.terminate()
        agent.wait(timeout=10)
        log.close()

    r.refresh_from_db()
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE, S.RELEASING, S.COMPLETED]
    assert list(
        AgentJob.objects.filter(reservation=r).order_by("id").values_list("kind", "status")
    ) == [("prepare", "done"), ("start", "done"), ("stop", "done")]
    node.refresh_from_db()
    assert node.last_heartbeat_at is not None
