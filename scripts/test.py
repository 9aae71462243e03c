"""`make test`: the whole suite against real PostgreSQL and Redis.

    python scripts/test.py [PYTEST ARGS...]

PostgreSQL: DATABASE_URL if set (pytest-django creates and drops test_<name> beside it), else
the system server on 127.0.0.1:5432 (started with the machine's own command if it is down),
else an embedded one. Redis: REDIS_URL if set, else database 15 of the system Redis on
127.0.0.1:6379 (started if down), else an embedded one. Stops with a clear message when
neither can be had. Installs what browser tests (Chromium) and container tests (podman, runc,
busybox-static) need when they are missing. Exits with pytest's exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from devservices import ROOT, RUN_DIR, ServiceError, Supervisor, ensure_postgres, ensure_redis

TEST_REDIS_DB = 15
BROWSER_TEST_MARKERS = ("pytest.mark.browser", "playwright")
CONTAINER_TEST_MARKERS = ("pytest.mark.container",)


def tests_exist(markers: tuple[str, ...]) -> bool:
    for path in (ROOT / "tests").rglob("test_*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(marker in text for marker in markers):
            return True
    return False


def main(pytest_args: list[str]) -> int:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor()
    try:
        try:
            postgres = ensure_postgres(supervisor, start_system=True)
            redis = ensure_redis(supervisor, db=TEST_REDIS_DB, start_system=True, persistent=False)
        except ServiceError as exc:
            print(f"make test: cannot run the suite without PostgreSQL and Redis: {exc}",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(f"make test: {postgres.description}; {redis.description}", flush=True)

        if tests_exist(BROWSER_TEST_MARKERS):
            subprocess.run(["bash", str(ROOT / "scripts" / "ensure_chromium.sh")], check=True)
        # The site agent's tests run real containers (their image is built once per run by
        # tests/agent/conftest.py).
        if tests_exist(CONTAINER_TEST_MARKERS):
            subprocess.run(["bash", str(ROOT / "scripts" / "ensure_podman.sh")], check=True)

        env = {
            **os.environ,
            # DEBUG gives the development secret key and turns SECURE_SSL_REDIRECT off.
            "DEBUG": "1",
            "DATABASE_URL": postgres.url,
            "REDIS_URL": redis.url,
            "PYTHONUNBUFFERED": "1",
        }
        pytest = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args], cwd=ROOT, env=env)
        # Ctrl-C reaches pytest directly (same process group); we only clean up after it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda signum, _frame: pytest.send_signal(signum))
        return pytest.wait()
    finally:
        supervisor.stop_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
