"""Rate limits per API key (per user for sessions, per IP address before authentication).

A fixed window counted in Redis with one atomic INCR per request: settings.API_THROTTLE_RATE
("600/min") requests per window. INCR, and EXPIRE of a new counter, run in one Lua script (one
atomic round trip), so a counter never lives without its expiry; the same call reads the API
keys' generation for a key's request (marketplace/auth.py). Every response carries X-RateLimit-Limit,
X-RateLimit-Remaining and X-RateLimit-Reset (Unix time, in seconds, when the window resets);
a 429 also carries Retry-After (seconds).

With Redis unreachable the limiter fails open for RATE_LIMIT_FAIL_OPEN_SECONDS (logged once,
the uncounted requests counted in `outage`), then answers 503 rate_limiter_unavailable with
Retry-After until Redis is back: reads and writes that need only PostgreSQL keep working.

Failed authentications (a wrong or revoked API key or node token) are limited per client
address as well (settings.AUTH_FAILURE_RATE, AuthFailureLimit): DRF authenticates before any
throttle runs, so the authentication classes consult that limit themselves.
"""

import hashlib
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass

import redis
from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import ImproperlyConfigured
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.throttling import BaseThrottle

from config.client_ip import client_bucket
from config.env import rate_window
from marketplace.auth import (
    API_KEYS_GENERATION,
    ApiKeyUser,
    api_key_user_confirm,
    auth_failure_limit_register,
)

__all__ = [
    "RateLimit",
    "ApiRateThrottle",
    "AgentRateThrottle",
    "agent_rate_count",
    "fixed_window_count",
    "parse_rate",
    "rate_limit_headers",
    "RateLimiterUnavailable",
    "outage",
    "AuthFailureLimit",
    "auth_failures",
]

logger = logging.getLogger(__name__)


def parse_rate(rate: str) -> tuple[int, int]:
    """'600/min' → (600, 60)."""
    try:
        return rate_window(rate)
    except (ValueError, KeyError):
        raise ImproperlyConfigured(
            f"API_THROTTLE_RATE must look like '600/min', got {rate!r}"
        ) from None


@dataclass(frozen=True)
class RateLimit:
    limit: int
    remaining: int
    reset_at: int  # Unix seconds

    def retry_after(self, now: float) -> int:
        return max(1, math.ceil(self.reset_at - now))


def rate_limit_headers(rate_limit: RateLimit) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": str(rate_limit.limit),
        "X-RateLimit-Remaining": str(rate_limit.remaining),
        "X-RateLimit-Reset": str(rate_limit.reset_at),
    }


def _identity(request: Request) -> str:
    user = request.user
    if isinstance(user, ApiKeyUser):
        return f"key:{user.api_key.pk}"
    if user and user.is_authenticated:
        return f"user:{user.pk}"
    return f"ip:{client_bucket(request)}"


_redis: redis.Redis | None = None
_redis_location = None
_redis_pid = None
# Seconds to wait for Redis before calling it unreachable: a request must not hang on it.
_REDIS_TIMEOUT = 0.5


# Count, set the expiry of a new counter, and read one more key (the API keys' generation,
# marketplace/auth.py), in one atomic round trip. A missing watched key is created with ARGV[2].
_COUNT_SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
if #KEYS < 2 then return {count} end
redis.call('SET', KEYS[2], ARGV[2], 'NX')
return {count, redis.call('GET', KEYS[2])}
"""
_script = None


def _count(key: str, *, timeout: int, watch: str | None = None) -> tuple[int, bytes | None]:
    """INCR the counter (a new one gets its expiry in the same atomic step) and read `watch`,
    in one round trip; returns the new count and the watched value."""
    global _redis, _script, _redis_location, _redis_pid
    location = settings.CACHES["default"]["LOCATION"]
    if _redis is None or location != _redis_location or _redis_pid != os.getpid():
        # The cache's Redis, under the cache's key prefix, but one scripted call instead of
        # the cache API's add + exists + incr (three round trips). Made again when the cache
        # moves (settings changed at run time, as tests do), like Django's own cache handler,
        # and in a forked process. One connection kept for the process (its threads take
        # turns), not a pool: a pool checks a connection out and back in, with a poll of its
        # socket, on every call.
        _redis_location, _redis_pid = location, os.getpid()
        _redis = None
        _redis = redis.Redis.from_url(
            location,
            socket_connect_timeout=_REDIS_TIMEOUT,
            socket_timeout=_REDIS_TIMEOUT,
            single_connection_client=True,
        )
        _script = _redis.register_script(_COUNT_SCRIPT)
    keys = [key] if watch is None else [key, watch]
    result = _script(keys=keys, args=[timeout, secrets.token_hex(8)])
    return result[0], (result[1] if len(result) > 1 else None)


class RateLimiterUnavailable(exceptions.APIException):
    """Redis has been unreachable for longer than the limiter may run uncounted: 503."""

    status_code = 503
    default_code = "rate_limiter_unavailable"
    default_detail = "Rate limiting is briefly unavailable; retry after the time in Retry-After."

    def __init__(self, wait: int):
        super().__init__()
        self.wait = wait  # DRF sends it as Retry-After


@dataclass
class LimiterOutage:
    """While Redis is unreachable: since when, and how many events went uncounted (this
    process). The limiter lets events through uncounted for RATE_LIMIT_FAIL_OPEN_SECONDS,
    then refuses them with 503 until Redis answers again."""

    since: float | None = None
    uncounted: int = 0
    uncounted_total: int = 0  # over the process's life, for monitoring


outage = LimiterOutage()


def _unreachable(exc: Exception, now: float) -> None:
    """Fail open (return) while the outage is young; past the bound, raise a 503."""
    if outage.since is None:
        outage.since = now
        logger.error(
            "rate limiter: Redis unreachable (%s); requests pass uncounted for up to %s s",
            exc,
            settings.RATE_LIMIT_FAIL_OPEN_SECONDS,
        )
    if now - outage.since >= settings.RATE_LIMIT_FAIL_OPEN_SECONDS:
        raise RateLimiterUnavailable(wait=_OUTAGE_RETRY_AFTER) from exc
    outage.uncounted += 1
    outage.uncounted_total += 1


_OUTAGE_RETRY_AFTER = 10


def _reachable(now: float) -> None:
    if outage.since is not None:
        logger.warning(
            "rate limiter: Redis is back after %.0f s; %s requests went uncounted",
            now - outage.since,
            outage.uncounted,
        )
        outage.since, outage.uncounted = None, 0


def fixed_window_count(
    name: str, *, period: int, now: float, watch: str | None = None
) -> tuple[int, int] | tuple[int, int, bytes | None] | None:
    """Count one event for `name` in the current window of `period` seconds.

    Returns the window's count including this event and when the window resets (Unix s),
    and with `watch` (a cache key) its value read in the same round trip; None when Redis is
    unreachable and the event passes uncounted (see LimiterOutage).
    """
    window = int(now // period)
    # make_key, not make_and_validate_key: the check is memcached's (it warns of spaces,
    # control characters and keys over 250 bytes), Redis takes any bytes as a key, and the
    # check walks every character of both keys on every request.
    key = cache.make_key(f"ratelimit:{name}:{period}:{window}")
    try:
        count, watched = _count(
            key,
            timeout=period + 1,
            watch=None if watch is None else cache.make_key(watch),
        )
    except redis.RedisError as exc:
        _unreachable(exc, now)
        return None
    _reachable(now)
    if watch is None:
        return count, (window + 1) * period
    return count, (window + 1) * period, watched


class ApiRateThrottle(BaseThrottle):
    """Counts the request and leaves the outcome on request.rate_limit for the headers."""

    def allow_request(self, request: Request, view) -> bool:
        limit, period = parse_rate(settings.API_THROTTLE_RATE)
        now = time.time()
        user = request.user
        key_user = user if isinstance(user, ApiKeyUser) else None
        # An API key's request also reads the keys' generation here: a key authenticated from
        # the process's cache is confirmed (or refused, if revoked since) in this round trip.
        counted = fixed_window_count(
            _identity(request),
            period=period,
            now=now,
            watch=API_KEYS_GENERATION if key_user else None,
        )
        if key_user is not None:
            api_key_user_confirm(key_user, generation=None if counted is None else counted[2])
        if counted is None:
            return True  # Redis unreachable: uncounted, and no rate-limit headers
        count, reset_at = counted[0], counted[1]
        self.rate_limit = RateLimit(limit=limit, remaining=max(0, limit - count), reset_at=reset_at)
        request.rate_limit = self.rate_limit
        self.now = now
        return count <= limit

    def wait(self) -> float:
        return self.rate_limit.retry_after(self.now)


def agent_rate_count(node_id: int, *, now: float) -> tuple[RateLimit, bool] | None:
    """Count one request of a node's agent against settings.AGENT_THROTTLE_RATE: the outcome
    and whether it is allowed, or None when Redis is unreachable. Then it passes uncounted for
    as long as Redis is gone (never a 503, unlike ApiRateThrottle): a heartbeat must get
    through while Redis is down (it is written at once), or the fleet would go offline."""
    limit, period = parse_rate(settings.AGENT_THROTTLE_RATE)
    try:
        counted = fixed_window_count(f"node:{node_id}", period=period, now=now)
    except RateLimiterUnavailable:
        return None
    if counted is None:
        return None
    count, reset_at = counted
    rate_limit = RateLimit(limit=limit, remaining=max(0, limit - count), reset_at=reset_at)
    return rate_limit, count <= limit


class AgentRateThrottle(BaseThrottle):
    """Per node, for the site agent's endpoints (a node token: inventory.auth): a node's agent,
    or whoever holds its token, cannot heartbeat, report or lease faster than
    settings.AGENT_THROTTLE_RATE. Runs after authentication and the permission check, so a
    request without a valid node token is refused (401) before it is counted."""

    def allow_request(self, request: Request, view) -> bool:
        node = getattr(request.user, "node", None)
        if node is None:
            return True  # not a node agent: the permission check has refused it already
        self.now = time.time()
        counted = agent_rate_count(node.pk, now=self.now)
        if counted is None:
            return True
        self.rate_limit, allowed = counted
        return allowed

    def wait(self) -> float:
        return self.rate_limit.retry_after(self.now)


# --- Failed authentications per client ------------------------------------------------------

AUTH_FAILURES_THROTTLED = (
    "Too many failed authentications from your address; retry after the time in Retry-After."
)
# Clients a process remembers as over the limit before it drops those whose window has ended.
_BLOCKED_PRUNE_AT = 4096
# How long a credential a process accepted passes from a client over the limit (AuthFailureLimit),
# how often its time is renewed, and how many a process keeps before dropping stale ones (a
# fleet's node tokens and the keys in use: tens of thousands at most).
VOUCHED_SECONDS = 900
_VOUCH_REFRESH_SECONDS = 60
_VOUCHED_PRUNE_AT = 65536


def _digest(credential: str) -> str:
    return hashlib.sha256(credential.encode("utf-8", "surrogateescape")).hexdigest()


class AuthFailureLimit:
    """At most settings.AUTH_FAILURE_RATE failed authentications per client and window: past
    them the client's requests with credentials are answered 429 too_many_failed_authentications
    (Retry-After: until the window ends) before the credential is looked up.

    The authentication classes call `check` before a lookup and `failed` when they refuse a
    credential (marketplace.auth, inventory.auth). Failures are counted in Redis
    (fixed_window_count), so every process adds to one count; the process whose count reaches
    the limit remembers the client until the window ends, and so answers it without Redis or
    the database. Another process learns it at the client's next failure there (one lookup
    more each). With Redis unreachable a failure passes uncounted, never a 429 or 503: an
    outage of the limiter must not lock everybody out.

    A credential this process accepted in the last VOUCHED_SECONDS still passes from a client
    over the limit (and is then looked up as usual): the agents of a site share its address,
    as a company's scripts share their NAT's, and one agent left running with a revoked token,
    or one script with a wrong key, must not take the others' heartbeats and calls down with
    it. Only credentials this process never saw work are refused unlooked-at."""

    def __init__(self):
        self._blocked: dict[str, int] = {}  # client → Unix time its window ends
        # sha256 of a credential this process accepted → monotonic time it last did
        self._vouched: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, request, credential: str | None) -> int | None:
        """Seconds until this client may present `credential`; None: it may now (the client is
        not over the limit, or the credential is one this process accepted lately)."""
        client = client_bucket(request)
        reset_at = self._blocked.get(client)
        if reset_at is None:
            return None
        now = time.time()
        if reset_at <= now:
            self._blocked.pop(client, None)
            return None
        if self.vouched(credential):
            return None
        return max(1, math.ceil(reset_at - now))

    def check(self, request, credential: str | None) -> None:
        """429 (Throttled) while the client is over the limit, unless `credential` is one this
        process accepted lately."""
        wait = self.wait(request, credential)
        if wait is not None:
            raise exceptions.Throttled(
                wait=wait, detail=AUTH_FAILURES_THROTTLED, code="too_many_failed_authentications"
            )

    def vouched(self, credential: str | None) -> bool:
        if not credential:
            return False
        seen = self._vouched.get(_digest(credential))
        return seen is not None and time.monotonic() - seen < VOUCHED_SECONDS

    def vouch(self, credential: str) -> None:
        """Note a credential this process has just accepted (its digest, not itself)."""
        digest, now = _digest(credential), time.monotonic()
        seen = self._vouched.get(digest)
        if seen is not None and now - seen < _VOUCH_REFRESH_SECONDS:
            return
        with self._lock:
            if len(self._vouched) >= _VOUCHED_PRUNE_AT:
                self._vouched = {
                    d: t for d, t in self._vouched.items() if now - t < VOUCHED_SECONDS
                }
            self._vouched[digest] = now

    def failed(self, request) -> None:
        """Count one refused credential of this client."""
        limit, period = parse_rate(settings.AUTH_FAILURE_RATE)
        client = client_bucket(request)
        now = time.time()
        try:
            counted = fixed_window_count(f"authfail:{client}", period=period, now=now)
        except RateLimiterUnavailable:
            return  # Redis gone for long: still uncounted, never a 503 for a failure
        if counted is None or counted[0] < limit:
            return
        with self._lock:
            if len(self._blocked) >= _BLOCKED_PRUNE_AT:
                self._blocked = {c: t for c, t in self._blocked.items() if t > now}
            self._blocked[client] = counted[1]

    def forget(self) -> None:
        """Forget the clients this process knows to be over the limit (tests)."""
        with self._lock:
            self._blocked = {}
            self._vouched = {}


auth_failures = AuthFailureLimit()
# API keys are checked in marketplace.auth, which this module imports: it is handed the limit.
auth_failure_limit_register(auth_failures)
