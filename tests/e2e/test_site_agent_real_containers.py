"""The whole path with real containers: a Celery worker with the site-agent driver, the API
on a live server, and the site agent as its own process running podman.

A reservation becomes active only once its container runs and every port asked for (SSH
included) accepts TCP on the address customers are given; a workload that crashes while
starting fails at no charge with its last log lines, so does one whose image cannot be
pulled; one that exits while active ends its reservation at the next heartbeat. A preemption notice reaches the inside of the container.
One whose container is removed while active (an operator's `rm`) is restarted in place, and so
is one an operator stops (`podman stop`), while one that exits 143 by itself ends.
"""

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from config.dates import iso_utc
from inventory.models import Gpu
from inventory.services import node_token_issue
from inventory.telemetry import gpu_mark_failed
from marketplace.models import AgentJob, Reservation, ReservationOutage, ReservationStatus
from marketplace.provisioning.scheduler import reservations_dispatch_due
from marketplace.provisioning.services import reservation_outages_reconcile
from marketplace.services.curtailment import curtailment_announce
from tests.agent.conftest import RUNTIME_ENV, podman, test_image_fixture  # noqa: F401 (fixture)
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (the *_fixture names are fixtures)
    broker_fixture,
    driver_log_fixture,
    market_create,
    ssh_key,
    statuses,
    wait_for,
    worker_fixture,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.container,
    pytest.mark.usefixtures("allow_all_funding"),
]
S = ReservationStatus
ROOT = Path(__file__).resolve().parents[2]


def _fresh(r: Reservation) -> Reservation:
    return Reservation.objects.get(pk=r.pk)


def _agent_start(live_server, secret: str, tmp_path):
    """The site agent as its own process, with the container executor on podman, its output
    in tmp_path/agent.log; returns the process and the open log (_agent_stop closes both)."""
    log = open(tmp_path / "agent.log", "w")  # noqa: SIM115 (closed by _agent_stop)
    agent = subprocess.Popen(
        [
            sys.executable, "manage.py", "site_agent", "--api", live_server.url,
            "--token", secret, "--executor", "container", "--runtime", "podman",
            "--host", "127.0.0.1", "--state-dir", str(tmp_path / "state"),
            "--allow-private-registries", "--poll-seconds", "0.3", "--heartbeat-seconds", "1",
        ],
        cwd=ROOT,
        env={**os.environ, **RUNTIME_ENV},
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    return agent, log


def _agent_stop(agent: subprocess.Popen, log) -> None:
    agent.terminate()
    agent.wait(timeout=10)
    log.close()


def test_real_workloads_are_billed_only_once_ready_and_end_when_they_exit(
    worker, live_server, tmp_path, test_image
):
    worker.start(PROVISIONING_DRIVER="site_agent", PROVISIONING_READINESS_TIMEOUT_SECONDS="20")
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    _token, secret = node_token_issue(node=node, label="site agent")
    slow = market.book(
        gpu_count=1,
        tier="interruptible",
        workload={
            "image": test_image,
            "ssh_public_keys": [ssh_key()],
            "ports": [8888],
            "env": {"LISTEN": "22 8888", "READY_AFTER": "2", "EXIT_AFTER": "10", "EXIT_CODE": "9"},
        },
    )
    crash = market.book(
        gpu_count=1,
        workload={"image": test_image, "env": {"MODE": "crash", "API_TOKEN": "hf_top_secret"}},
    )
    missing = market.book(gpu_count=1, workload={"image": "localhost/switchyard-missing:404"})
    names = [f"sy-{r.public_id}" for r in (slow, crash, missing)]
    reservations_dispatch_due()

    agent, log = _agent_start(live_server, secret, tmp_path)
    try:
        wait_for(lambda: _fresh(slow).status == S.ACTIVE, timeout=60, what="activation")
        active = _fresh(slow)
        start = AgentJob.objects.get(reservation=slow, kind="start")
        # Billing starts after the agent found it ready: the workload listens 2 s after start.
        assert (active.activated_at - start.created_at).total_seconds() >= 2
        for port in (active.connection["ssh_port"], active.connection["ports"]["8888"]):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"hello\n")
                assert conn.recv(16) == b"hello\n"
        assert active.connection["host"] == "127.0.0.1"
        assert "simulated" not in active.connection

        # A grid curtailment gives it notice: the agent writes it inside the container.
        curtailment_announce(
            site=market.site, shed_at=timezone.now() + timedelta(minutes=10), reason="Grid peak"
        )
        noticed = _fresh(slow)
        assert noticed.preempt_at is not None

        def notice_inside() -> str:
            done = podman("exec", names[0], "cat", "/run/switchyard/preemption", check=False)
            return done.stdout

        assert json.loads(wait_for(notice_inside, timeout=20, what="the notice file")) == {
            "preempt_at": iso_utc(noticed.preempt_at),
            "reason": noticed.preempt_reason,
        }

        wait_for(lambda: _fresh(crash).status == S.FAILED, timeout=60, what="the crash")
        failed = _fresh(crash)
        assert failed.activated_at is None  # never billed
        assert failed.status_reason.startswith(
            "The workload could not start: The workload exited with code 3 before it was ready"
        )
        assert failed.status_reason.endswith(
            "Last log lines:\nworkload starting (mode crash)\n"
            "loading weights with token [redacted]\nfatal: CUDA out of memory"
        )

        wait_for(lambda: _fresh(missing).status == S.FAILED, timeout=60, what="the pull")
        unpulled = _fresh(missing)
        assert unpulled.activated_at is None
        assert unpulled.status_reason.startswith(
            "The workload could not start: The image localhost/switchyard-missing:404 could not "
            "be pulled: "
        )

        # It exits 10 s after it started listening; the next heartbeat ends the reservation.
        wait_for(lambda: _fresh(slow).status == S.FAILED, timeout=60, what="the exit")
        ended = _fresh(slow)
        assert ended.status_reason.startswith("The workload exited with code 9 at ")
        assert ended.status_reason.endswith("giving up after 10 s")
        assert statuses(ended) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE, S.FAILED]

        # Then both containers are removed (the crash's stop job, the exit's teardown, which
        # the dispatcher sends: this worker runs no beat, so the test dispatches).
        def removed() -> bool:
            reservations_dispatch_due()
            return all(podman("container", "exists", n, check=False).returncode == 1 for n in names)

        wait_for(removed, timeout=60, interval=1, what="the containers to be removed")
    finally:
        _agent_stop(agent, log)
        for name in names:
            podman("rm", "-f", "-t", "0", name, check=False)
            podman("network", "rm", "-f", f"{name}-net", check=False)
    assert "hf_top_secret" not in (tmp_path / "agent.log").read_text()


def _labels(name: str) -> dict:
    return json.loads(
        podman("container", "inspect", "--format", "{{json .Config.Labels}}", name).stdout
    )


def _container_id(name: str) -> str:
    return podman("container", "inspect", "--format", "{{.Id}}", name).stdout.strip()


def test_a_move_to_another_gpu_of_the_same_node_restarts_the_container_on_the_new_gpus(
    worker, live_server, tmp_path, test_image
):
    """A GPU fails under an active reservation; the healthy GPU it moves to is on the node that
    already runs it. The agent stops the old container and starts a new one with the new GPU
    set, and the reservation is active again only once the new one answers."""
    worker.start(PROVISIONING_DRIVER="site_agent", PROVISIONING_READINESS_TIMEOUT_SECONDS="20")
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    _token, secret = node_token_issue(node=node, label="site agent")
    r = market.book(
        gpu_count=2,
        workload={"image": test_image, "ssh_public_keys": [ssh_key()], "env": {"READY_AFTER": "2"}},
    )
    name = f"sy-{r.public_id}"
    reservations_dispatch_due()
    agent, log = _agent_start(live_server, secret, tmp_path)
    try:
        wait_for(lambda: _fresh(r).status == S.ACTIVE, timeout=60, what="activation")
        first = _fresh(r)
        old_id = _container_id(name)
        old_gpus = sorted(first.connection["nodes"][0]["gpu_indexes"])
        assert _labels(name)["switchyard.gpus"] == ",".join(map(str, old_gpus))
        bad = Gpu.objects.get(node=node, index=old_gpus[0])

        gpu_mark_failed(gpu=bad, actor=None, reason="Xid 79 seen", actor_label="staff: test")

        wait_for(
            lambda: statuses(r)[3:] == [S.PROVISIONING, S.ACTIVE],
            timeout=90,
            what="the move and the restart",
        )
        moved = _fresh(r)
        new_gpus = sorted(moved.connection["nodes"][0]["gpu_indexes"])
        assert bad.index not in new_gpus and len(new_gpus) == 2
        assert old_gpus[1] in new_gpus  # the healthy GPU it had stays, on the same node
        assert moved.placement_generation == 1
        # A new container, given the new GPUs, not the old one read as started.
        assert _container_id(name) != old_id
        assert _labels(name)["switchyard.generation"] == "1"
        assert _labels(name)["switchyard.gpus"] == ",".join(map(str, new_gpus))
        jobs = {
            (j.kind, j.generation): j for j in AgentJob.objects.filter(reservation=r, node=node)
        }
        assert sorted(jobs) == [
            ("prepare", 0), ("prepare", 1), ("start", 0), ("start", 1), ("stop", 0)
        ]  # fmt: skip
        assert {j.status for j in jobs.values()} == {"done"}
        assert jobs[("stop", 0)].payload["gpu_indexes"] == old_gpus
        # Active again only once the new container answered: it listens 2 s after it starts,
        # which is after the old one's stop finished.
        back = moved.transitions.filter(to_status=S.ACTIVE).order_by("at").last().at
        assert (back - jobs[("stop", 0)].finished_at).total_seconds() >= 2
        assert jobs[("start", 1)].finished_at <= back
        with socket.create_connection(("127.0.0.1", moved.connection["ssh_port"]), timeout=5) as c:
            c.sendall(b"hello\n")
            assert c.recv(16) == b"hello\n"
        assert "failed" in moved.transitions.filter(to_status=S.PROVISIONING).last().cause
    finally:
        _agent_stop(agent, log)
        podman("rm", "-f", "-t", "0", name, check=False)
        podman("network", "rm", "-f", f"{name}-net", check=False)


def test_a_container_removed_while_active_is_restarted_in_place_and_the_gap_is_an_outage(
    worker, live_server, tmp_path, test_image
):
    """An operator removes the running container by mistake. The agent's next report lacks
    it: the reservation restarts in place (same GPUs, a new container of the next
    generation), and the time it was down is an outage until it answers again."""
    worker.start(PROVISIONING_DRIVER="site_agent", PROVISIONING_READINESS_TIMEOUT_SECONDS="20")
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    _token, secret = node_token_issue(node=node, label="site agent")
    r = market.book(
        gpu_count=2,
        workload={"image": test_image, "ssh_public_keys": [ssh_key()], "env": {"READY_AFTER": "1"}},
    )
    name = f"sy-{r.public_id}"
    reservations_dispatch_due()
    agent, log = _agent_start(live_server, secret, tmp_path)
    try:
        wait_for(lambda: _fresh(r).status == S.ACTIVE, timeout=60, what="activation")
        first = _fresh(r)
        old_id = _container_id(name)
        gpus = sorted(first.connection["nodes"][0]["gpu_indexes"])

        podman("rm", "-f", "-t", "0", name)

        wait_for(
            lambda: statuses(r)[3:] == [S.PROVISIONING, S.ACTIVE],
            timeout=90,
            what="the restart in place",
        )
        back = _fresh(r)
        assert back.placement_generation == 1
        assert back.activated_at == first.activated_at
        assert sorted(back.connection["nodes"][0]["gpu_indexes"]) == gpus  # the same GPUs
        assert _container_id(name) != old_id
        assert _labels(name)["switchyard.generation"] == "1"
        assert _labels(name)["switchyard.gpus"] == ",".join(map(str, gpus))
        restart = back.transitions.filter(to_status=S.PROVISIONING).order_by("at").last()
        assert restart.cause.startswith(
            f"The workload's container is gone: node {node.hostname}'s agent no longer runs it"
        )
        assert restart.actor_label == "system: site agent"
        with socket.create_connection(("127.0.0.1", back.connection["ssh_port"]), timeout=5) as c:
            c.sendall(b"hello\n")
            assert c.recv(16) == b"hello\n"
        # The gap, from the report to the return, is the reservation's outage (beat would
        # close it; this worker runs none).
        reservation_outages_reconcile()
        outage = ReservationOutage.objects.get(reservation=r)
        assert outage.started_at <= restart.at
        assert outage.ended_at == back.transitions.filter(to_status=S.ACTIVE).latest("at").at
    finally:
        _agent_stop(agent, log)
        podman("rm", "-f", "-t", "0", name, check=False)
        podman("network", "rm", "-f", f"{name}-net", check=False)


def test_a_workload_stopped_from_outside_restarts_in_place_while_its_own_exit_143_ends_it(
    worker, live_server, tmp_path, test_image
):
    """A site operator runs `podman stop` on one workload (which catches SIGTERM and exits 0):
    not the customer's exit, so it restarts in place and the gap is an outage. Another
    workload exits with code 143 by itself: its own ending, whatever the code suggests."""
    worker.start(PROVISIONING_DRIVER="site_agent", PROVISIONING_READINESS_TIMEOUT_SECONDS="20")
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    _token, secret = node_token_issue(node=node, label="site agent")
    stopped = market.book(
        gpu_count=1, workload={"image": test_image, "ports": [8080], "env": {"LISTEN": "8080"}}
    )
    exits = market.book(
        gpu_count=1,
        workload={
            "image": test_image,
            "ports": [8081],
            "env": {"LISTEN": "8081", "EXIT_AFTER": "15", "EXIT_CODE": "143"},
        },
    )
    names = [f"sy-{r.public_id}" for r in (stopped, exits)]
    reservations_dispatch_due()
    agent, log = _agent_start(live_server, secret, tmp_path)
    try:
        wait_for(
            lambda: {_fresh(r).status for r in (stopped, exits)} == {S.ACTIVE},
            timeout=60,
            what="activation",
        )
        first = _fresh(stopped)
        old_id = _container_id(names[0])

        podman("stop", "-t", "5", names[0], timeout=30)

        wait_for(
            lambda: statuses(stopped)[3:] == [S.PROVISIONING, S.ACTIVE],
            timeout=90,
            what="the restart in place",
        )
        back = _fresh(stopped)
        assert back.placement_generation == 1
        assert back.activated_at == first.activated_at
        assert _container_id(names[0]) != old_id
        restart = back.transitions.filter(to_status=S.PROVISIONING).order_by("at").last()
        assert restart.cause.startswith(
            f"The workload was stopped from outside it: node {node.hostname}'s container "
            "runtime stopped or killed its container (a site operator, or the runtime shutting "
            "down), with code 0 at "
        )
        assert restart.actor_label == "system: site agent"
        port = back.connection["ports"]["8080"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(b"hello\n")
            assert conn.recv(16) == b"hello\n"
        reservation_outages_reconcile()
        outage = ReservationOutage.objects.get(reservation=stopped)
        assert outage.cause == "workload_lost"
        assert outage.started_at <= restart.at
        assert outage.ended_at == back.transitions.filter(to_status=S.ACTIVE).latest("at").at

        wait_for(lambda: _fresh(exits).status == S.FAILED, timeout=60, what="the own exit")
        ended = _fresh(exits)
        assert ended.status_reason.startswith("The workload exited with code 143 at ")
        assert statuses(ended) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE, S.FAILED]
        assert not ReservationOutage.objects.filter(reservation=exits).exists()
    finally:
        _agent_stop(agent, log)
        for name in names:
            podman("rm", "-f", "-t", "0", name, check=False)
            podman("network", "rm", "-f", f"{name}-net", check=False)


def test_a_start_stopped_from_outside_while_it_gets_ready_is_retried_not_failed(
    worker, live_server, tmp_path, test_image
):
    """A site operator runs `podman stop` on a workload still starting (it listens only after
    6 s): the site's doing, so the start is retried with backoff on the same node, and the
    reservation becomes active once the next start answers, never failed nor billed before."""
    worker.start(PROVISIONING_DRIVER="site_agent", PROVISIONING_READINESS_TIMEOUT_SECONDS="30")
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    _token, secret = node_token_issue(node=node, label="site agent")
    r = market.book(
        gpu_count=1,
        workload={
            "image": test_image,
            "ports": [8080],
            "env": {"LISTEN": "8080", "READY_AFTER": "6"},
        },
    )
    name = f"sy-{r.public_id}"
    reservations_dispatch_due()
    agent, log = _agent_start(live_server, secret, tmp_path)
    try:

        def starting() -> bool:
            state = podman("container", "inspect", "--format", "{{.State.Status}}", name,
                           check=False).stdout.strip()  # fmt: skip
            return state == "running"

        wait_for(starting, timeout=60, interval=0.2, what="the container to start")
        stopped_id = _container_id(name)
        podman("stop", "-t", "1", name, timeout=30)

        wait_for(lambda: _fresh(r).status == S.ACTIVE, timeout=90, what="activation")
        active = _fresh(r)
        assert statuses(active) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
        assert _container_id(name) != stopped_id
        errors = [a.error for a in active.provisioning_attempts.order_by("number") if a.error]
        assert any(
            e.startswith("The workload was stopped from outside it before it was ready (its "
                         "container runtime stopped or killed it") for e in errors
        ), errors  # fmt: skip
        start = AgentJob.objects.get(reservation=r, kind="start")
        assert (start.status, start.attempts) == ("done", 2)
        node.refresh_from_db()
        assert node.status == "available"
        with socket.create_connection(("127.0.0.1", active.connection["ports"]["8080"]), 5) as c:
            c.sendall(b"hello\n")
            assert c.recv(16) == b"hello\n"
    finally:
        _agent_stop(agent, log)
        podman("rm", "-f", "-t", "0", name, check=False)
        podman("network", "rm", "-f", f"{name}-net", check=False)
