"""`make test`: the whole suite against real PostgreSQL and Redis.

    python scripts/test.py [PYTEST ARGS...]

Runs in two pytest-xdist workers (`-n 2 --dist load`; pass `-n 0` for one process), each
with its own test database and Redis database (tests/parallel.py). Not `--dist loadfile`:
under it the API fuzz (schemathesis's subtests, one per operation) stops after the first.

PostgreSQL: DATABASE_URL if set (pytest-django creates and drops test_<name> beside it), else
the system server on 127.0.0.1:5432 (started with the machine's own command if it is down),
else an embedded one. Redis: REDIS_URL if set, else database 15 of the system Redis on
127.0.0.1:6379 (started if down), else an embedded one. Stops with a clear message when
neither can be had. Installs what browser tests (Chromium) and container tests (podman, runc,
busybox-static) need when they are missing. Exits with pytest's exit code.

The suite runs with production settings (DEBUG off), given only what a deployment must set
(docs/operations.md): a fresh random SECRET_KEY each run, ALLOWED_HOSTS for the test hosts,
the database and Redis, and STATIC_ROOT, into which collectstatic has written the hashed and
compressed files the templates link to (.run/test-static, collected again only when a static
source or the requirements changed). Tests that need another setting say so themselves.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time

from devservices import ROOT, RUN_DIR, ServiceError, Supervisor, ensure_postgres, ensure_redis

TEST_REDIS_DB = 15
# The hosts the tests talk to: Django's test client, and the live server on loopback.
TEST_ALLOWED_HOSTS = "testserver,localhost,127.0.0.1"
STATIC_ROOT = RUN_DIR / "test-static"
# What STATIC_ROOT was collected from, beside it (whitenoise serves everything inside it).
STATIC_FINGERPRINT = RUN_DIR / "test-static.fingerprint"
# Two workers, one per core: about half the suite waits on subprocesses, containers, Celery
# workers and the browser, which overlap.
PARALLEL_ARGS = ["-n", "2", "--dist", "load"]
BROWSER_TEST_MARKERS = ("pytest.mark.browser", "playwright")
CONTAINER_TEST_MARKERS = ("pytest.mark.container",)


def tests_exist(markers: tuple[str, ...]) -> bool:
    for path in (ROOT / "tests").rglob("test_*.py"):
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(marker in text for marker in markers):
            return True
    return False


def static_sources_fingerprint() -> str:
    """The project's static files (names, sizes, times) and the requirements, which pin the
    packages whose static files (admin, API docs) collectstatic also copies."""
    digest = hashlib.sha256((ROOT / "requirements.txt").read_bytes())
    for directory in sorted(ROOT.glob("*/static")):
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            info = path.stat()
            digest.update(f"{path.relative_to(ROOT)} {info.st_size} {info.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def collect_static(env: dict[str, str]) -> None:
    """collectstatic into STATIC_ROOT, as a deployment does, unless its sources are unchanged
    since the last run (compressing every file takes a minute or more of CPU). One run at a
    time: two runs of the suite started together in one checkout would each --clear the
    folder the other is writing."""
    STATIC_ROOT.parent.mkdir(parents=True, exist_ok=True)
    with open(STATIC_ROOT.parent / "test-static.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _collect_static(env)


def _collect_static(env: dict[str, str]) -> None:
    fingerprint = static_sources_fingerprint()
    manifest = STATIC_ROOT / "staticfiles.json"
    if manifest.exists() and STATIC_FINGERPRINT.exists():
        if STATIC_FINGERPRINT.read_text() == fingerprint:
            return
    print(f"make test: collecting static files into {STATIC_ROOT}…", flush=True)
    started = time.monotonic()
    STATIC_FINGERPRINT.unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "--clear", "--verbosity=0"],
        cwd=ROOT,
        env=env,
        check=True,
    )
    STATIC_FINGERPRINT.write_text(fingerprint)
    print(f"make test: static files collected in {time.monotonic() - started:.0f} s", flush=True)


def suite_environment(*, database_url: str, redis_url: str) -> dict[str, str]:
    """A production environment: DEBUG unset, and what a deployment must provide."""
    env = {name: value for name, value in os.environ.items() if name != "DEBUG"}
    return {
        **env,
        "SECRET_KEY": secrets.token_urlsafe(50),  # 67 characters, new every run
        "ALLOWED_HOSTS": TEST_ALLOWED_HOSTS,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "STATIC_ROOT": str(STATIC_ROOT),
        "PYTHONUNBUFFERED": "1",
    }


# Arguments that want one process: a debugger, or the tests' output on the terminal.
ONE_PROCESS_ARGS = ("--pdb", "--trace", "-s", "--capture=no")


def pytest_command(pytest_args: list[str]) -> list[str]:
    """The arguments given, in two workers unless they choose (-n, --numprocesses, -p no:xdist)
    or need one process (ONE_PROCESS_ARGS)."""
    chosen = any(
        arg in ("-n", "--numprocesses", "no:xdist", *ONE_PROCESS_ARGS)
        or arg.startswith(("-n", "--numprocesses="))
        for arg in pytest_args
    )
    return pytest_args if chosen else [*PARALLEL_ARGS, *pytest_args]


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

        # The browser tests drive the system's Chromium; the site agent's tests run real
        # containers (their image is built once per run by tests/agent/conftest.py). Each
        # script installs what is missing as root, else says what to install and fails.
        for markers, script in (
            (BROWSER_TEST_MARKERS, "ensure_chromium.sh"),
            (CONTAINER_TEST_MARKERS, "ensure_podman.sh"),
        ):
            if (
                tests_exist(markers)
                and subprocess.run(["bash", str(ROOT / "scripts" / script)]).returncode
            ):
                print(f"make test: scripts/{script} failed (above); the suite did not run.",
                      file=sys.stderr)  # fmt: skip
                return 2

        env = suite_environment(database_url=postgres.url, redis_url=redis.url)
        collect_static(env)
        pytest = subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "tests.parallel", *pytest_command(pytest_args)],
            cwd=ROOT,
            env=env,
        )
        # Ctrl-C reaches pytest directly (same process group); we only clean up after it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda signum, _frame: pytest.send_signal(signum))
        return pytest.wait()
    finally:
        supervisor.stop_all()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
