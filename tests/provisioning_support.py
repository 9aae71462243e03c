"""Set-up shared by the provisioning tests (in-process and with a real Celery worker).

Reservations are booked through the real reservation_create (pricing, placement, the
exclusion constraint); only the funding decision is opened up (market_helpers.allow_all_funding),
since these tests are about the lifecycle, not money.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from config.celery import QUEUES
from inventory.models import GpuModel, Node, Site
from inventory.services import node_token_issue
from marketplace.models import Reservation
from marketplace.services.reservations import reservation_create
from tests.clients import HttpsAPIClient
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate


def ssh_key(key_type: str = "ssh-ed25519", body: bytes = bytes(range(32))) -> str:
    """A well-formed OpenSSH public key line (the key material need not be a real point)."""
    blob = b"".join(len(part).to_bytes(4, "big") + part for part in (key_type.encode(), body))
    return f"{key_type} {base64.b64encode(blob).decode()} dev@laptop"


@dataclass
class Market:
    site: Site
    gpu_model: GpuModel
    nodes: list[Node]

    def book(
        self,
        *,
        gpu_count: int = 1,
        starts_at: datetime | None = None,
        seconds: int = 3600,
        workload: dict | None = None,
        organization=None,
        tier: str = "on_demand",
    ) -> Reservation:
        start = starts_at or timezone.now()
        return reservation_create(
            organization=organization or OrganizationFactory(),
            gpu_model=self.gpu_model.slug,
            gpu_count=gpu_count,
            starts_at=start,
            ends_at=start + timedelta(seconds=seconds),
            tier=tier,
            site=self.site.slug,
            workload=workload,
        )


def agent_client(node):
    """An API client acting as the node's site agent (a fresh agent token)."""
    _token, secret = node_token_issue(node=node, label="test agent")
    client = HttpsAPIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def market_create(*, nodes: int = 2, gpus: int = 8) -> Market:
    gpu_model = GpuModelFactory()
    make_rate(gpu_model, "2.5000")
    make_policy()
    site = SiteFactory()
    return Market(
        site=site, gpu_model=gpu_model, nodes=make_nodes(site, gpu_model, nodes, gpus=gpus)
    )


def statuses(reservation: Reservation) -> list[str]:
    return list(reservation.transitions.order_by("at", "id").values_list("to_status", flat=True))


# --- A real Celery worker for the e2e tests ------------------------------------------------


def e2e_redis_url() -> str:
    """The configured broker. Runs sharing it stay apart by queue name (see e2e_queue)."""
    from django.conf import settings

    return settings.CELERY_BROKER_URL


def database_url(db: dict) -> str:
    """A DATABASE_URL for the given Django DATABASES entry (the test database)."""
    from urllib.parse import quote

    auth = quote(db["USER"]) + (":" + quote(db["PASSWORD"]) if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


class CeleryWorker:
    """`celery -A config worker` as a subprocess on the test database and a dedicated Redis db.

    It runs in its own process group, so kill() takes down the main process and its pool
    children at once, like a machine losing power.
    """

    def __init__(self, *, database: dict, redis_url: str, log_dir, env: dict | None = None):
        self.database_url = database_url(database)
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.extra_env = env or {}
        self.process: subprocess.Popen | None = None
        self.log_path = None
        self._starts = 0

    def start(self, *, beat: bool = False, concurrency: int = 2, **env: str) -> "CeleryWorker":
        self._starts += 1
        self.log_path = self.log_dir / f"worker-{self._starts}.log"
        full_env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": self.redis_url,
            "LOG_LEVEL": "INFO",
            **self.extra_env,
            **env,
        }
        command = [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "config",
            "worker",
            "-l",
            "info",
            "-c",
            str(concurrency),
            "-n",
            f"prov-test-{os.getpid()}-{self._starts}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        # A queue of the test's own, or every queue as `make worker` consumes them.
        if full_env.get("CELERY_TASK_DEFAULT_QUEUE"):
            command += ["-Q", full_env["CELERY_TASK_DEFAULT_QUEUE"]]
        else:
            command += ["-Q", ",".join(QUEUES)]
        if beat:
            command += ["-B", "-s", str(self.log_dir / f"beat-{self._starts}.db")]
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            command,
            cwd=Path(__file__).resolve().parent.parent,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if " ready." in self.log_path.read_text():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"worker did not start:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown handler, no ack, no cleanup."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None
            self.log.close()

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            self.process = None
            self.log.close()


def redis_test_client() -> redis.Redis:
    return redis.Redis.from_url(e2e_redis_url())


def unacked_count(queue: str) -> int:
    """Messages of `queue` delivered to a worker and not yet acknowledged (kombu's Redis
    transport keeps them in the "unacked" hash as [message, exchange, routing key])."""
    entries = redis_test_client().hvals("unacked")
    return sum(1 for raw in entries if json.loads(raw)[2] == queue)


def queue_purge(queue: str) -> None:
    """Forget everything of `queue`, including unacknowledged messages, and nothing else."""
    client = redis_test_client()
    client.delete(queue)
    for tag, raw in client.hgetall("unacked").items():
        if json.loads(raw)[2] == queue:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)


def wait_for(
    predicate,
    *,
    timeout: float,
    interval: float = 0.1,
    what: str = "condition",
    logs: tuple[Path, ...] = (),
):
    """Poll `predicate` until it is true; on a timeout, the error quotes the end of each of
    `logs` (the worker's, an agent's), so that a failure far away says what happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tails = "".join(
        f"\n--- {path.name} (last lines) ---\n" + "\n".join(path.read_text().splitlines()[-40:])
        for path in logs
        if path.exists()
    )
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{tails}")


def broker_idle(queue: str) -> bool:
    """Nothing waiting in `queue` and nothing of it delivered but unacknowledged."""
    return redis_test_client().llen(queue) == 0 and unacked_count(queue) == 0


@contextmanager
def broker_url_for_this_process(url: str):
    """Point this process's Celery producer at `url` (e.g. a closed port), then back."""
    from config.celery import app

    old = app.conf.broker_write_url
    app.conf.broker_write_url = url
    app._pool = None
    app.amqp._producer_pool = None
    try:
        yield
    finally:
        app.conf.broker_write_url = old
        app._pool = None
        app.amqp._producer_pool = None


# --- Fixtures for the e2e tests (imported by the test modules) ------------------------------


@pytest.fixture(name="broker")
def broker_fixture():
    """A queue of this test's own on the configured broker; this process publishes to it.

    Test runs (and tests) sharing one Redis never see each other's messages, and a message
    a killed worker left unacknowledged cannot leak into the next test. Yields the name.
    """
    from config.celery import app

    queue = f"e2e-{uuid.uuid4().hex[:12]}"
    previous = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    try:
        yield queue
    finally:
        app.conf.task_default_queue = previous
        queue_purge(queue)


@pytest.fixture(name="driver_log")
def driver_log_fixture(tmp_path):
    path = tmp_path / "driver.log"

    def ops(reservation: Reservation | None = None) -> list[str]:
        if not path.exists():
            return []
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        return [
            line["op"]
            for line in lines
            if reservation is None or line["reservation"] == reservation.public_id
        ]

    ops.path = str(path)
    return ops


@pytest.fixture(name="worker")
def worker_fixture(broker, tmp_path, driver_log):
    w = CeleryWorker(
        database=settings.DATABASES["default"],
        redis_url=e2e_redis_url(),
        log_dir=tmp_path,
        env={
            "SIMULATED_DRIVER_LOG": driver_log.path,
            "SIMULATED_DRIVER_LATENCY_SECONDS": "0",
            # The worker consumes, and its beat publishes to, this test's queue only.
            "CELERY_TASK_DEFAULT_QUEUE": broker,
        },
    )
    yield w
    w.stop()
