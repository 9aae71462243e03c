"""Liveness and readiness for load balancers and orchestrators.

GET /healthz: 200 while the process serves requests; it checks nothing else, so a database
outage does not make an orchestrator restart every web process.
GET /readyz: 200 when PostgreSQL and Redis answer and no migration on disk is unapplied;
otherwise 503 naming the part that failed, so a load balancer sends traffic elsewhere.

Both are served by config.ops.OpsEndpointsMiddleware, before anything that could refuse or
redirect a probe. They read no request data.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.backends.utils import CursorWrapper
from django.db.migrations.loader import MigrationLoader
from django.http import JsonResponse

__all__ = ["bounded_cursor", "healthz", "readiness", "readyz"]

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT_SECONDS = 2
_redis_clients: dict[str, redis.Redis] = {}
_migrations_on_disk: set[tuple[str, str]] | None = None


@contextmanager
def bounded_cursor(seconds: float) -> Iterator[CursorWrapper]:
    """A cursor in a transaction of its own whose statements give up after `seconds`
    (PostgreSQL's statement_timeout, waits for a lock included): a table locked by a
    migration or a wedged query makes a probe or a scrape fail in time (a DatabaseError)
    instead of holding it until the load balancer or Prometheus gives up on the process.
    Inside a caller's transaction the caller's own timeout is put back afterwards (a failure
    rolls the savepoint back, and the setting with it)."""
    nested = connection.in_atomic_block
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('statement_timeout'), "
            "set_config('statement_timeout', %s, true)",
            [f"{seconds * 1000:.0f}"],
        )
        before = cursor.fetchone()[0]
        yield cursor
        if nested:
            cursor.execute("SELECT set_config('statement_timeout', %s, true)", [before])


def _database() -> tuple[str | None, str | None]:
    """The database's state and the migrations' (what is unapplied), from one short
    transaction. The migration graph is read from disk once per process (it does not change
    while the code runs); the applied set is one small query."""
    global _migrations_on_disk
    if _migrations_on_disk is None:
        _migrations_on_disk = set(MigrationLoader(None, ignore_no_migrations=True).graph.nodes)
    answered = False
    try:
        with bounded_cursor(_PROBE_TIMEOUT_SECONDS) as cursor:
            answered = True
            cursor.execute("SELECT app, name FROM django_migrations")
            applied = set(cursor.fetchall())
    except DatabaseError as exc:
        if not answered:
            logger.warning("readiness: database unavailable: %s", exc)
            return f"unavailable ({type(exc).__name__})", "unknown"
        # It answers, but the migrations table cannot be read in time (a migration's lock).
        return None, f"unknown ({type(exc).__name__})"
    missing = sorted(_migrations_on_disk - applied)
    if missing:
        names = ", ".join(f"{app}.{name}" for app, name in missing[:5])
        return None, f"{len(missing)} unapplied: {names}" + (", ..." if len(missing) > 5 else "")
    return None, None


def _redis_urls() -> set[str]:
    return {settings.REDIS_URL, settings.CACHES["default"]["LOCATION"], settings.CELERY_BROKER_URL}


def _redis() -> str | None:
    for url in sorted(_redis_urls()):
        client = _redis_clients.get(url)
        if client is None:
            client = _redis_clients[url] = redis.Redis.from_url(
                url,
                socket_connect_timeout=_PROBE_TIMEOUT_SECONDS,
                socket_timeout=_PROBE_TIMEOUT_SECONDS,
            )
        try:
            client.ping()
        except (redis.RedisError, OSError) as exc:
            # The URL may carry a password: log the host only.
            logger.warning("readiness: redis at %s unavailable: %s", client.connection_pool, exc)
            return f"unavailable ({type(exc).__name__})"
    return None


def readiness() -> tuple[bool, dict[str, str]]:
    """Each part's state ("ok" or what is wrong) and whether all are ok."""
    database, migrations = _database()
    # Without a database the migrations cannot be read; say so once, under database.
    checks = {"database": database, "redis": _redis(), "migrations": migrations}
    ready = all(problem is None for problem in checks.values())
    return ready, {part: problem or "ok" for part, problem in checks.items()}


def healthz(_request) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(_request) -> JsonResponse:
    started = time.monotonic()
    ready, checks = readiness()
    return JsonResponse(
        {
            "status": "ready" if ready else "unavailable",
            "checks": checks,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
        },
        status=200 if ready else 503,
    )
