"""Typed readers for environment variables.

Every setting comes from the environment through these helpers, so a malformed value stops
start-up with an ImproperlyConfigured that names the variable.
"""

import os
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from ipaddress import ip_network
from urllib.parse import unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_MISSING = object()


def _raw(name: str, default):
    value = os.environ.get(name)
    if value is None:
        if default is _MISSING:
            raise ImproperlyConfigured(f"{name} must be set")
        return None
    return value.strip()


def env_str(name: str, default=_MISSING) -> str:
    value = _raw(name, default)
    return default if value is None else value


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name, default)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false, yes/no), got {value!r}")


def env_int(
    name: str, default: int, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    value = _raw(name, default)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    if maximum is not None and number > maximum:
        raise ImproperlyConfigured(f"{name} must be at most {maximum}, got {number}")
    return number


# The longest duration a setting may give: ten years. A longer one is no setting anyone means,
# and `now +` it would pass the calendar's end (a 500 where it is used, not a start-up error).
DURATION_MOST = timedelta(days=3650)


def env_duration(
    name: str,
    default: int,
    *,
    unit: str = "seconds",
    minimum: int | None = None,
    maximum: int | None = None,
) -> timedelta:
    """A duration set as a whole number of `unit` (seconds, hours or days), at most
    DURATION_MOST unless `maximum` says less."""
    most = int(DURATION_MOST / timedelta(**{unit: 1}))
    return timedelta(
        **{unit: env_int(name, default, minimum=minimum, maximum=min(maximum or most, most))}
    )


def env_decimal(name: str, default: Decimal) -> Decimal:
    value = _raw(name, default)
    if value is None:
        return default
    try:
        number = Decimal(value)
    except InvalidOperation:
        number = None
    # NaN and Infinity parse, but are no amount, price or duration: NaN failed later in a
    # comparison with a bare decimal.InvalidOperation, Infinity passed every bound.
    if number is None or not number.is_finite():
        raise ImproperlyConfigured(f"{name} must be a decimal number, got {value!r}")
    return number


# A rate's period names, and their seconds.
RATE_PERIOD_SECONDS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}


def env_rate(name: str, default: str) -> str:
    """A rate such as "600/min": a positive count per s, min, hour or day."""
    rate = env_str(name, default)
    count, _, period = rate.partition("/")
    if not count.isdigit() or int(count) < 1 or period not in RATE_PERIOD_SECONDS:
        raise ImproperlyConfigured(
            f"{name} must look like 600/min (per s, min, hour or day), got {rate!r}"
        )
    return rate


def rate_window(rate: str) -> tuple[int, int]:
    """'600/min' → (600, 60): the count and the window in seconds."""
    count, _, period = rate.partition("/")
    return int(count), RATE_PERIOD_SECONDS[period.strip().lower()]


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name, default)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_database(
    name: str,
    default: str,
    *,
    prepared_statements: bool = True,
    connect_timeout: int = 5,
    conn_max_age: int = 60,
) -> dict:
    """Parse a postgres://user:pass@host:port/name URL into a Django DATABASES entry.

    prepared_statements: bind parameters on the server and let psycopg prepare a statement
    from its second run on a connection. The hot reads (availability, placement) are then
    planned once per connection instead of per request; their planning cost more than their
    execution. Turn it off behind a pooler in transaction mode that does not track prepared
    statements (PgBouncer before 1.21, or without max_prepared_statements).

    conn_max_age: seconds a connection is kept for the next request of its thread (0: closed
    after each request, for a server that starts a thread per client connection).

    connect_timeout: seconds to wait for a connection, so a server that accepts TCP and then
    hangs makes requests (and /readyz) fail fast with 503 instead of hanging a worker.
    """
    url = env_str(name, default)
    parsed = urlparse(url)
    if parsed.scheme not in {"postgres", "postgresql"}:
        raise ImproperlyConfigured(
            f"{name} must be a postgres:// URL (PostgreSQL is the only database), got {url!r}"
        )
    db_name = parsed.path.lstrip("/")
    if not db_name:
        raise ImproperlyConfigured(f"{name} must name a database, got {url!r}")
    try:
        port = parsed.port or 5432
    except ValueError:
        raise ImproperlyConfigured(f"{name} has an invalid port, got {url!r}") from None
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(db_name),
        "USER": unquote(parsed.username or "postgres"),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": parsed.hostname or "",
        "PORT": str(port),
        "CONN_MAX_AGE": conn_max_age,
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {
            "connect_timeout": connect_timeout,
            **(
                {"server_side_binding": True, "prepare_threshold": 2} if prepared_statements else {}
            ),
        },
    }


def env_redis_url(name: str, default: str) -> str:
    url = env_str(name, default)
    parsed = urlparse(url)
    if parsed.scheme not in {"redis", "rediss"} or not parsed.hostname:
        raise ImproperlyConfigured(f"{name} must be a redis:// URL, got {url!r}")
    return url


def env_trusted_proxies(name: str) -> int | tuple:
    """The proxies in front of the app: a count of hops ("1") or addresses/CIDRs
    ("10.0.0.0/8, 127.0.0.1"). Empty (the default): none, clients connect directly."""
    value = env_str(name, "")
    if not value:
        return 0
    if value.isdigit():
        return int(value)
    networks = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ip_network(item, strict=False))
        except ValueError:
            raise ImproperlyConfigured(
                f"{name} must be a number of proxies or addresses/CIDRs separated by commas, "
                f"got {item!r}"
            ) from None
    return tuple(networks)


def env_networks(name: str, default: list[str]) -> list[str]:
    """Comma-separated IP addresses or networks (10.0.0.0/8, ::1)."""
    networks = env_list(name, default)
    for network in networks:
        try:
            ip_network(network, strict=False)
        except ValueError:
            raise ImproperlyConfigured(
                f"{name} must list IP addresses or networks, got {network!r}"
            ) from None
    return networks


def env_address(name: str, default: str) -> str:
    """host:port to listen on ([::1]:9808 for IPv6), or empty for none."""
    address = env_str(name, default)
    if not address:
        return address
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ImproperlyConfigured(f"{name} must look like 127.0.0.1:9808, got {address!r}")
    return address
