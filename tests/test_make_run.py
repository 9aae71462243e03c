"""scripts/run.py (make run), end to end: it serves the admin and the API docs with their static
files, runs a Celery worker and beat, and Ctrl-C leaves no process behind.

Runs against the PostgreSQL and Redis the suite uses, in a database of its own (dropped
afterwards) and Redis database 13, with a localstripe whose state is in a temporary folder.
"""

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import psutil
import psycopg
import pytest
import redis
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from devservices import free_port  # noqa: E402

SMOKE_REDIS_DB = 13


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _command_line(process: psutil.Process) -> str:
    """A descendant's command line; one that has just exited (a podman call, a pool child being
    replaced) and not yet been waited for reads as empty."""
    try:
        return " ".join(process.cmdline())
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return ""


@pytest.fixture
def smoke_env(tmp_path):
    base = urlparse(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/switchyard"))
    database = f"{base.path.lstrip('/')}_run_smoke"
    redis_base = urlparse(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15"))
    redis_url = urlunparse(redis_base._replace(path=f"/{SMOKE_REDIS_DB}"))
    maintenance = urlunparse(base._replace(path="/postgres"))

    def drop_database():
        with psycopg.connect(maintenance, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
            )

    drop_database()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    env.update(
        DATABASE_URL=urlunparse(base._replace(path=f"/{database}")),
        REDIS_URL=redis_url,
        RUN_PORT=str(free_port()),
        SWITCHYARD_RUN_DIR=str(tmp_path / "run"),
        DEBUG="1",
    )
    yield env
    drop_database()
    redis.Redis.from_url(redis_url).flushdb()


def test_make_run_serves_the_demo_and_ctrl_c_stops_everything(smoke_env):
    run = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "run.py")],
        cwd=ROOT,
        env=smoke_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, like a terminal's foreground job
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(run.stdout), daemon=True)
    reader.start()
    base = f"http://127.0.0.1:{smoke_env['RUN_PORT']}"
    descendants = []
    try:
        deadline = time.monotonic() + 240
        while not any("Switchyard is running" in line for line in list(output)):
            assert run.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            time.sleep(0.5)

        assert _get(f"{base}/admin/login/") == 200
        assert _get(f"{base}/login") == 200  # the customer portal
        assert _get(f"{base}/static/portal/portal.css") == 200
        assert _get(f"{base}/api/docs/") == 200
        assert _get(f"{base}/api/schema/") == 200
        assert _get(f"{base}/static/admin/css/base.css") == 200
        assert _get(f"{base}/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui.css") == 200
        banner = "".join(output)
        assert "admin / switchyard-admin" in banner
        assert "demo / switchyard-demo" in banner
        assert "localstripe at http://127.0.0.1:" in banner

        # The banner stays in sight: beat's due tasks (every 5 s) and the worker's lines for
        # them are not printed below it.
        after_banner = len(output)
        time.sleep(8)
        later = output[after_banner:]
        assert not [line for line in later if "due task" in line or "succeeded in" in line], later

        # Every site agent keeps its HTTP connection to the development server open: none may
        # hold a database connection between its requests (near PostgreSQL's 100 before). What
        # is held stays; requests in flight come and go: the fewest seen over a few seconds
        # (a loaded machine has more requests in flight at any one moment).
        with psycopg.connect(urlunparse(urlparse(smoke_env["DATABASE_URL"])._replace(
                path="/postgres")), autocommit=True) as conn:  # fmt: skip
            seen = []
            for _ in range(8):
                seen.append(conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s",
                    [urlparse(smoke_env["DATABASE_URL"]).path.lstrip("/")],
                ).fetchone()[0])  # fmt: skip
                time.sleep(0.5)
        assert min(seen) <= 20, seen

        descendants = psutil.Process(run.pid).children(recursive=True)
        commands = [_command_line(p) for p in descendants]
        for expected in ("runserver", "worker", "beat", "localstripe_server.py"):
            assert any(expected in command for command in commands), commands

        os.killpg(run.pid, signal.SIGINT)
        assert run.wait(timeout=90) == 0
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    reader.join(timeout=5)
    assert "Stopped." in "".join(output)
    still_running = [p.pid for p in descendants if p.is_running() and p.status() != "zombie"]
    assert still_running == []
