"""Reads that tolerate a little staleness can go to a PostgreSQL streaming replica.

Opt-in, never a blanket read router: with DATABASE_REPLICA_URL set, the database alias
"replica" exists, and reads go to it only inside `stale_reads()` (or a view method decorated
with `replica_reads`), which the search, list, dashboard and export views use. Everything else
reads the primary: placement, holds, quotes that are booked, authentication, and every write.

Inside `stale_reads()` a read still goes to the primary when
- a transaction is open on the primary (it must read its own snapshot: a service that searches
  or checks availability before booking runs in one);
- its model is one security decisions read (sessions, users, API keys, memberships): a revoked
  key or a removed member must be refused at once, not after the replica catches up;
- the client wrote something in the last DATABASE_REPLICA_PIN_SECONDS (read-your-writes: a
  reservation just created is on the next page of the list, whatever the replica's lag).

Raw-SQL readers take their cursor from `read_connection()`, which follows the same rule.

A replica that cannot be reached (stopped, restarting, refusing connections) is passed over
for REPLICA_RETRY_SECONDS, in each process: its reads go to the primary meanwhile, so a replica
outage costs the primary some read load, never a 503 on every search and list.
"""

import functools
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from django.conf import settings
from django.core.cache import cache
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections
from redis.exceptions import RedisError

__all__ = [
    "REPLICA",
    "ReplicaPinMiddleware",
    "ReplicaRouter",
    "primary_reads",
    "read_alias",
    "read_connection",
    "replica_configured",
    "replica_reachable",
    "replica_reads",
    "stale_iter",
    "stale_reads",
]

REPLICA = "replica"
# Models whose rows decide who may do what: always read from the primary.
PRIMARY_ONLY = frozenset(
    {
        "sessions.Session",
        "marketplace.UserSession",
        "auth.User",
        "auth.Group",
        "auth.Permission",
        "marketplace.ApiKey",
        "marketplace.Membership",
    }
)
_PIN_PREFIX = "replica-pin:"
# How long a replica found unreachable is passed over before it is tried again.
REPLICA_RETRY_SECONDS = 30
# What a lost or refused connection raises (as config/outages.py counts an outage).
_UNREACHABLE = (OperationalError, InterfaceError)
_replica_down_until = 0.0

logger = logging.getLogger(__name__)

_stale_ok: ContextVar[bool] = ContextVar("stale_reads_ok", default=False)


def replica_configured() -> bool:
    return REPLICA in settings.DATABASES


@contextmanager
def stale_reads() -> Iterator[None]:
    """Reads inside may come from the replica (when one is configured): a little stale."""
    token = _stale_ok.set(True)
    try:
        yield
    finally:
        _stale_ok.reset(token)


@contextmanager
def primary_reads() -> Iterator[None]:
    """Reads inside go to the primary even within stale_reads() (what is cached for placement)."""
    token = _stale_ok.set(False)
    try:
        yield
    finally:
        _stale_ok.reset(token)


def read_alias(model=None) -> str:
    """The database alias a read of model (or raw SQL, model=None) goes to right now."""
    if not _stale_ok.get() or not replica_configured():
        return DEFAULT_DB_ALIAS
    if connections[DEFAULT_DB_ALIAS].in_atomic_block:
        return DEFAULT_DB_ALIAS
    if model is not None and model._meta.label in PRIMARY_ONLY:
        return DEFAULT_DB_ALIAS
    return REPLICA


def read_connection():
    """The connection a raw-SQL read uses: the replica inside stale_reads(), else the primary."""
    return connections[read_alias()]


def stale_iter(items: Iterable) -> Iterator:
    """items (a streamed export's lines, read after the view returned) iterated with stale
    reads allowed when they are allowed where this is called."""
    if not _stale_ok.get():
        return iter(items)
    return _iterate_stale(items)


def _iterate_stale(items: Iterable) -> Iterator:
    with stale_reads():
        yield from items


class ReplicaRouter:
    """Routes the ORM's reads by read_alias(); every write, and every migration, to the primary."""

    def db_for_read(self, model, **hints) -> str:
        return read_alias(model)

    def db_for_write(self, model, **hints) -> str:
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1, obj2, **hints) -> bool:
        # The replica is a copy of the primary: its rows are the same rows.
        return True

    def allow_migrate(self, db, app_label, model_name=None, **hints) -> bool:
        return db == DEFAULT_DB_ALIAS


# --- read-your-writes ----------------------------------------------------------------------


def _principal(user) -> str | None:
    api_key = getattr(user, "api_key", None)
    if api_key is not None:
        return f"key:{api_key.pk}"
    if getattr(user, "is_authenticated", False) and getattr(user, "pk", None) is not None:
        return f"user:{user.pk}"
    return None


def _replica_down(exc: BaseException) -> None:
    global _replica_down_until
    _replica_down_until = time.monotonic() + REPLICA_RETRY_SECONDS
    logger.warning(
        "read replica unreachable, its reads go to the primary for %d s: %s",
        REPLICA_RETRY_SECONDS,
        " ".join(str(exc).split())[:300],
    )
    connections[REPLICA].close()


def replica_reachable() -> bool:
    """Whether the replica takes reads: a connection to it is open, or opens now. False for
    REPLICA_RETRY_SECONDS after it did not, or after a read on it failed (replica_reads). A
    connection kept from an earlier request is health-checked by its first read, as usual."""
    if time.monotonic() < _replica_down_until:
        return False
    replica = connections[REPLICA]
    try:
        replica.ensure_connection()
    except _UNREACHABLE as exc:
        _replica_down(exc)
        return False
    return True


def _pinned(request) -> bool:
    principal = _principal(getattr(request, "user", None))
    if principal is None:
        return False
    try:
        return bool(cache.get(_PIN_PREFIX + principal))
    except (RedisError, OSError):
        return True  # unsure: the primary is never wrong


def replica_reads(view_method):
    """Decorate a view's GET handler: its reads may come from the replica, unless the client
    wrote in the last DATABASE_REPLICA_PIN_SECONDS. Authentication, permissions and the
    organisation were settled before the handler runs, on the primary."""

    @functools.wraps(view_method)
    def handler(view, request, *args, **kwargs):
        if not replica_configured() or _pinned(request) or not replica_reachable():
            return view_method(view, request, *args, **kwargs)
        replica = connections[REPLICA]
        replica.errors_occurred = False
        try:
            with stale_reads():
                return view_method(view, request, *args, **kwargs)
        except _UNREACHABLE as exc:
            if not replica.errors_occurred:
                raise  # the primary's: an outage (503), not the replica's
            _replica_down(exc)
        # The replica went away during the reads: a GET handler only reads, so run it again.
        return view_method(view, request, *args, **kwargs)

    return handler


class ReplicaPinMiddleware:
    """After a successful write by a signed-in member or an API key, its reads stay on the
    primary for DATABASE_REPLICA_PIN_SECONDS. Nothing at all without a replica."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if (
            request.method not in {"GET", "HEAD", "OPTIONS", "TRACE"}
            and response.status_code < 400
            and replica_configured()
        ):
            principal = _principal(getattr(request, "user", None))
            if principal is not None:
                try:
                    cache.set(
                        _PIN_PREFIX + principal, 1, timeout=settings.DATABASE_REPLICA_PIN_SECONDS
                    )
                except (RedisError, OSError):
                    pass  # reads after it fall back to the primary while Redis is away
        return response
