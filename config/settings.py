"""Switchyard settings. Every value is read here, from the environment (see .env.example)."""

import re
from decimal import Decimal
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from billing.money import default_recharge_settings, top_up_limits
from config.csp import POLICY as CSP_POLICY
from config.currency import currency_refusal, money_round
from config.env import (
    env_address,
    env_bool,
    env_database,
    env_decimal,
    env_duration,
    env_int,
    env_list,
    env_networks,
    env_rate,
    env_redis_url,
    env_str,
    env_trusted_proxies,
    rate_window,
)

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env_bool("DEBUG", False)

# There is no default secret key outside DEBUG: a production deployment must set one.
SECRET_KEY = env_str("SECRET_KEY", "dev-insecure-key-only-for-debug" if DEBUG else None)
if not SECRET_KEY:
    raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
if not DEBUG and (len(SECRET_KEY) < 50 or SECRET_KEY.startswith("dev-insecure")):
    raise ImproperlyConfigured("SECRET_KEY must be at least 50 random characters when DEBUG is off")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1"] if DEBUG else [])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
SITE_URL = env_str("SITE_URL", "http://127.0.0.1:8000")
if not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", SITE_URL or ""):
    # Every link in an e-mail starts with it.
    raise ImproperlyConfigured(f"SITE_URL must be an http(s):// URL with a host, got {SITE_URL!r}")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "csp",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_prometheus",
    "inventory",
    "marketplace",
    "billing",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "config.request_id.RequestIdMiddleware",
    # X-Frame-Options: DENY on every answer, those of the middleware below included (the
    # input guard's 400 page, the probes).
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Before anything reads the request: a NUL, a lone surrogate or deeply nested JSON is a 400.
    "config.input_guard.InputGuardMiddleware",
    # /healthz, /readyz and /metrics, answered before host validation and the HTTPS redirect.
    "config.ops.OpsEndpointsMiddleware",
    "config.csp.CSPMiddleware",
    "config.outages.DatabaseOutageMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # Who acts and from where, for the audit log (marketplace.audit).
    "marketplace.audit.AuditContextMiddleware",
    # Django's, building the message storage only for a request that uses it (config/messages.py).
    "config.messages.LazyMessageMiddleware",
    # Idle timeout and lifetime of signed-in sessions (saying so in a message); signed-in
    # pages are no-store.
    "marketplace.sessions.SessionLimitsMiddleware",
    # After a write, the client's reads stay on the primary for a while (config/replica.py).
    "config.replica.ReplicaPinMiddleware",
    # django-prometheus's, recording only the series operators read (config/metrics/http.py).
    "config.metrics.http.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "marketplace.portal.nav.portal_context",
            ],
        },
    },
]

DATABASES = {
    "default": env_database(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/switchyard",
        prepared_statements=env_bool("DATABASE_PREPARED_STATEMENTS", True),
        connect_timeout=env_int("DATABASE_CONNECT_TIMEOUT", 5, minimum=1),
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60, minimum=0),
    )
}
# A PostgreSQL streaming replica for reads that tolerate a little staleness (search, lists,
# dashboards, exports): opt-in per view (config/replica.py); every write stays on the primary.
DATABASE_REPLICA_URL = env_str("DATABASE_REPLICA_URL", "")
if DATABASE_REPLICA_URL:
    DATABASES["replica"] = env_database(
        "DATABASE_REPLICA_URL",
        DATABASE_REPLICA_URL,
        prepared_statements=env_bool("DATABASE_PREPARED_STATEMENTS", True),
        connect_timeout=env_int("DATABASE_CONNECT_TIMEOUT", 5, minimum=1),
    )
    # Tests read the primary's test database through it instead of creating another.
    DATABASES["replica"]["TEST"] = {"MIRROR": "default"}
DATABASE_ROUTERS = ["config.replica.ReplicaRouter"]
# A connection that ran a query this recently is not checked with SELECT 1 before the next
# request's first query (PgBouncer's server_check_delay; config/postgresql/base.py).
DATABASE_HEALTH_CHECK_AFTER_IDLE_SECONDS = env_int(
    "DATABASE_HEALTH_CHECK_AFTER_IDLE_SECONDS", 10, minimum=0
)
# After a client writes, its reads stay on the primary this long (read-your-writes).
DATABASE_REPLICA_PIN_SECONDS = env_int("DATABASE_REPLICA_PIN_SECONDS", 5, minimum=0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_redis_url("REDIS_URL", "redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": env_redis_url("CACHE_URL", REDIS_URL),
        "KEY_PREFIX": "switchyard",
    }
}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "/static/"
# Where collectstatic writes and whitenoise serves from (the test suite keeps its own in .run/).
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles")))
LOGIN_URL = "portal:login"
LOGIN_REDIRECT_URL = "portal:dashboard"
LOGOUT_REDIRECT_URL = "portal:login"

# --- Security hardening (on whenever DEBUG is off) ---------------------------------------
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
SESSION_COOKIE_SECURE = not DEBUG
CSRF_COOKIE_SECURE = not DEBUG
# Sent on the site's own requests and top-level links only; no script reads either cookie
# (forms carry the CSRF token, the API docs get it in their page).
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_HTTPONLY = True
# A refused form says what happened and what to do, in the portal's words (config.urls).
CSRF_FAILURE_VIEW = "config.urls.csrf_failure"
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31536000, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True
# Signed-in sessions (portal, admin, the API's session callers): each row knows its user, so
# an account's sessions can all be ended; one ends after SESSION_IDLE_MINUTES without a request
# and SESSION_LIFETIME_HOURS after signing in, whatever its use (marketplace/sessions.py).
SESSION_ENGINE = "marketplace.sessions"
SESSION_IDLE_TIMEOUT = env_duration(
    "SESSION_IDLE_MINUTES", 60, unit="minutes", minimum=5, maximum=24 * 60
)
SESSION_LIFETIME = env_duration("SESSION_LIFETIME_HOURS", 12, unit="hours", minimum=1, maximum=720)
if SESSION_IDLE_TIMEOUT > SESSION_LIFETIME:
    raise ImproperlyConfigured(
        "SESSION_IDLE_MINUTES must not be longer than SESSION_LIFETIME_HOURS"
    )
# The cookie goes with the session's lifetime (it was two weeks).
SESSION_COOKIE_AGE = int(SESSION_LIFETIME.total_seconds())
# The reverse proxies in front of the app (a count, or addresses/CIDRs): through them the
# client's address is read from X-Forwarded-For (config/client_ip.py); without, REMOTE_ADDR.
TRUSTED_PROXIES = env_trusted_proxies("TRUSTED_PROXIES")
# Content-Security-Policy on every page outside /api/ (config/csp.py).
CONTENT_SECURITY_POLICY = CSP_POLICY

# --- REST API ------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["config.api.parsers.JSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "config.api.negotiation.ContentNegotiation",
    # The key class comes first: its WWW-Authenticate makes unauthenticated calls 401, not 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "marketplace.auth.ApiKeyAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "TEST_REQUEST_DEFAULT_FORMAT": "json",
    "EXCEPTION_HANDLER": "config.api.errors.exception_handler",
}
if DEBUG:
    REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"].append(
        "rest_framework.renderers.BrowsableAPIRenderer"
    )

SPECTACULAR_SETTINGS = {
    "TITLE": "Switchyard API",
    "DESCRIPTION": "Reserve GPU capacity at repurposed mining sites: search, quote, reserve, "
    "cancel, extend; usage and billing.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The customers' document; the site agents' endpoints are at /api/schema/agent/.
    "PREPROCESSING_HOOKS": ["config.api_docs.customer_endpoints"],
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI and Redoc are served from our own static files, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Several models have a "status"; name the reservation's enum after what it is.
    "ENUM_NAME_OVERRIDES": {
        "ReservationStatusEnum": "marketplace.models.core.ReservationStatus",
        "LedgerKindEnum": "billing.models.LedgerKind",
        "AgentJobKindEnum": "marketplace.models.provisioning.AgentJobKind",
        "EventTypeEnum": "marketplace.models.events.EventType",
        "WebhookDeliveryStatusEnum": "marketplace.models.webhooks.DeliveryStatus",
        "TierEnum": "marketplace.models.core.Tier",
        "ResaleTierEnum": "marketplace.models.resale.RESALE_TIER_CHOICES",
        "ListingStatusEnum": "marketplace.models.resale.ListingStatus",
    },
}

# --- Celery --------------------------------------------------------------------------------
CELERY_BROKER_URL = env_redis_url("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ALWAYS_EAGER = env_bool("CELERY_TASK_ALWAYS_EAGER", False)
# Tasks go to the queues provisioning, billing, webhooks, telemetry and default
# (config/celery.py). Another name here sends every task to that one queue (tests and
# benchmarks keep theirs apart in a shared Redis so).
CELERY_TASK_DEFAULT_QUEUE = env_str("CELERY_TASK_DEFAULT_QUEUE", "default")
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 120, minimum=1)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 180, minimum=1)
if CELERY_TASK_TIME_LIMIT <= CELERY_TASK_SOFT_TIME_LIMIT:
    raise ImproperlyConfigured(
        "CELERY_TASK_TIME_LIMIT must be greater than CELERY_TASK_SOFT_TIME_LIMIT"
    )

# --- Inventory health ----------------------------------------------------------------------
# The largest inventory file import_inventory reads (a 100,000-GPU CSV is about 3 MiB).
INVENTORY_IMPORT_MAX_BYTES = env_int("INVENTORY_IMPORT_MAX_BYTES", 32 * 2**20, minimum=1024)
NODE_OFFLINE_AFTER = env_duration("NODE_OFFLINE_AFTER_SECONDS", 180, minimum=10)
# How often every site agent heartbeats, told in each heartbeat's answer (an agent given its
# own heartbeat_seconds keeps that; agents take 1-300 s). It sets an idle fleet's request load
# and how soon an idle node starts a job. A node is marked offline only after three intervals
# without a heartbeat, at least: one lost or late heartbeat must not take it out of sale.
AGENT_HEARTBEAT_SECONDS = env_int("AGENT_HEARTBEAT_SECONDS", 10, minimum=1, maximum=300)
if AGENT_HEARTBEAT_SECONDS > NODE_OFFLINE_AFTER.total_seconds() / 3:
    raise ImproperlyConfigured(
        "AGENT_HEARTBEAT_SECONDS must be at most a third of NODE_OFFLINE_AFTER_SECONDS, so that "
        f"a node misses several heartbeats before it is marked offline; got "
        f"{AGENT_HEARTBEAT_SECONDS} with NODE_OFFLINE_AFTER_SECONDS="
        f"{int(NODE_OFFLINE_AFTER.total_seconds())}"
    )
# The most heartbeats a second the fleet may send (the web tier is sized for it, docs/scaling.md):
# a fleet past AGENT_HEARTBEAT_SECONDS × this many nodes is told a longer interval, up to a
# third of NODE_OFFLINE_AFTER (inventory.selectors.agent_heartbeat_seconds). 0: no limit.
AGENT_HEARTBEATS_PER_SECOND = env_int("AGENT_HEARTBEATS_PER_SECOND", 400, minimum=0)
# GPU telemetry (docs/health.md): raw samples for this many hours, per-minute rollups for days.
TELEMETRY_RAW_RETENTION = env_duration("TELEMETRY_RAW_RETENTION_HOURS", 6, unit="hours", minimum=1)
TELEMETRY_ROLLUP_RETENTION = env_duration(
    "TELEMETRY_ROLLUP_RETENTION_DAYS", 30, unit="days", minimum=1
)

# --- Marketplace ---------------------------------------------------------------------------
QUOTE_TTL = env_duration("QUOTE_TTL_SECONDS", 300, minimum=10)
# Grid curtailment (docs/grid.md): the least notice a preempted reservation gets unless the
# grid operator's call itself gives less; how recent a GPU's power reading must be to count
# as its draw (older: rated power).
CURTAILMENT_MIN_NOTICE = env_duration("CURTAILMENT_MIN_NOTICE_SECONDS", 120, minimum=0)
CURTAILMENT_POWER_FRESH = env_duration("CURTAILMENT_POWER_FRESH_SECONDS", 120, minimum=10)
# How far a demand-response call's signed timestamp may be from our clock (docs/grid.md).
DEMAND_RESPONSE_SIGNATURE_TOLERANCE = env_duration(
    "DEMAND_RESPONSE_SIGNATURE_TOLERANCE_SECONDS", 300, minimum=5
)
# After staff change a source's secret, calls signed with the old one are still accepted for
# this long (the operator's systems switch over; 0: at once). A leaked one is ended at once.
DEMAND_RESPONSE_SECRET_OVERLAP = env_duration(
    "DEMAND_RESPONSE_SECRET_OVERLAP_HOURS", 24, unit="hours", minimum=0
)
# How long an e-mailed invitation to join an organisation can be accepted.
INVITATION_TTL = env_duration("INVITATION_TTL_DAYS", 7, unit="days", minimum=1)
# Invitations an organisation may send a day (revoked ones count): in all, and to one address.
INVITATIONS_PER_DAY = env_int("INVITATIONS_PER_DAY", 50, minimum=1)
INVITATIONS_PER_ADDRESS_PER_DAY = env_int("INVITATIONS_PER_ADDRESS_PER_DAY", 3, minimum=1)
API_THROTTLE_RATE = env_rate("API_THROTTLE_RATE", "600/min")
# Requests a node's agent may make (its node token, every /api/v1/agent/ endpoint) per window;
# a busy agent at its defaults makes about 60 a minute, one beating every second and polling
# every 0.3 s about 330 (config/api/throttling.py, AgentRateThrottle).
AGENT_THROTTLE_RATE = env_rate("AGENT_THROTTLE_RATE", "600/min")
# An agent over its budget waits out the window, silent: the window must be shorter than the
# offline time, and hold at least a heartbeat, its workload report and a lease per interval.
_agent_count, _agent_window = rate_window(AGENT_THROTTLE_RATE)
_agent_beats = -(-_agent_window // AGENT_HEARTBEAT_SECONDS)  # heartbeats a window, rounded up
if _agent_window >= NODE_OFFLINE_AFTER.total_seconds() or _agent_count < 3 * _agent_beats:
    raise ImproperlyConfigured(
        "AGENT_THROTTLE_RATE must let every agent heartbeat: a window shorter than "
        "NODE_OFFLINE_AFTER_SECONDS and at least 3 requests per AGENT_HEARTBEAT_SECONDS in it; "
        f"got {AGENT_THROTTLE_RATE!r} with NODE_OFFLINE_AFTER_SECONDS="
        f"{int(NODE_OFFLINE_AFTER.total_seconds())} and AGENT_HEARTBEAT_SECONDS="
        f"{AGENT_HEARTBEAT_SECONDS}"
    )
# Failed authentications (a wrong or revoked API key or node token) one client address may
# make per window; past them its requests with credentials are answered 429 until the window
# ends, without a lookup (config/api/throttling.py, AuthFailureLimit). The node agents behind
# an address over it wait the window out: it must be shorter than the offline time.
AUTH_FAILURE_RATE = env_rate("AUTH_FAILURE_RATE", "30/min")
if rate_window(AUTH_FAILURE_RATE)[1] >= NODE_OFFLINE_AFTER.total_seconds():
    raise ImproperlyConfigured(
        "AUTH_FAILURE_RATE's window must be shorter than NODE_OFFLINE_AFTER_SECONDS (the "
        f"agents behind a refused address wait it out); got {AUTH_FAILURE_RATE!r} with "
        f"NODE_OFFLINE_AFTER_SECONDS={int(NODE_OFFLINE_AFTER.total_seconds())}"
    )
# How long a process keeps an API key it read (a change to any key empties every process's
# cache at once, through Redis: marketplace/auth.py); 0: read the key on every request.
API_KEY_CACHE_SECONDS = env_int("API_KEY_CACHE_SECONDS", 60, minimum=0)
# With Redis unreachable, rate limits let requests through uncounted for this long, then
# answer 503 with Retry-After until Redis is back (config/api/throttling.py).
RATE_LIMIT_FAIL_OPEN_SECONDS = env_int("RATE_LIMIT_FAIL_OPEN_SECONDS", 300, minimum=0)
# Portal sign-in attempts per account name from one address (and 5 times that per address).
PORTAL_SIGN_IN_RATE = env_rate("PORTAL_SIGN_IN_RATE", "10/hour")
CURRENCY = env_str("CURRENCY", "usd").lower()
if _currency_refused := currency_refusal(CURRENCY):
    raise ImproperlyConfigured(f"CURRENCY: {_currency_refused} Got {CURRENCY!r}.")

# --- Grid power prices (docs/grid.md) -------------------------------------------------------
# A zone with no price received for this long is stale: its sites are priced from their
# static energy price until the feed is back.
GRID_PRICE_MAX_AGE = env_duration("GRID_PRICE_MAX_AGE_HOURS", 26, unit="hours", minimum=1)
# Prices per MWh outside [floor, cap] are refused at the door (and ignored by pricing if the
# bounds were tightened after they were stored). Negative prices are real; absurd ones are not.
GRID_PRICE_FLOOR_PER_MWH = env_decimal("GRID_PRICE_FLOOR_PER_MWH", Decimal("-500"))
GRID_PRICE_CAP_PER_MWH = env_decimal("GRID_PRICE_CAP_PER_MWH", Decimal("5000"))
if GRID_PRICE_FLOOR_PER_MWH >= GRID_PRICE_CAP_PER_MWH:
    raise ImproperlyConfigured(
        "GRID_PRICE_FLOOR_PER_MWH must be below GRID_PRICE_CAP_PER_MWH, got "
        f"{GRID_PRICE_FLOOR_PER_MWH} and {GRID_PRICE_CAP_PER_MWH}"
    )

# --- Retention (docs/retention.md) ---------------------------------------------------------
# Rows a retention job deletes per transaction.
RETENTION_BATCH_SIZE = env_int("RETENTION_BATCH_SIZE", 5000, minimum=1)
# Provisioning attempts, agent jobs and dispatch markers of finished reservations (the 30-day
# reliability figure reads the attempts).
PROVISIONING_HISTORY_RETENTION_DAYS = env_int("PROVISIONING_HISTORY_RETENTION_DAYS", 90, minimum=31)
# Allocations and history entries of reservations that ended this long ago (the reservation
# row itself is kept: money refers to it).
# The shortest period searched, quoted, booked or resold (an extension may add any length).
RESERVATION_MIN_SECONDS = env_int("RESERVATION_MIN_SECONDS", 60, minimum=1)
RESERVATION_HISTORY_RETENTION_DAYS = env_int("RESERVATION_HISTORY_RETENTION_DAYS", 400, minimum=90)

# --- Events and webhooks (docs/integrators.md) ---------------------------------------------
EVENT_RETENTION_DAYS = env_int("EVENT_RETENTION_DAYS", 30, minimum=30)
# Development and tests only: let webhook endpoints be plain http and resolve to loopback or
# private addresses. Off, an endpoint must be https on a public address.
WEBHOOK_ALLOW_INSECURE = env_bool("WEBHOOK_ALLOW_INSECURE", False)
WEBHOOK_TIMEOUT = env_int("WEBHOOK_TIMEOUT_SECONDS", 10, minimum=1)
# A delivery is retried with exponential backoff for this long; an endpoint whose deliveries
# have all failed for this long is disabled and its owners are e-mailed.
WEBHOOK_RETRY_FOR = env_duration("WEBHOOK_RETRY_HOURS", 72, unit="hours", minimum=1)
# After a secret rotation the old secret keeps signing (beside the new one) for this long.
WEBHOOK_SECRET_OVERLAP = env_duration("WEBHOOK_SECRET_OVERLAP_HOURS", 24, unit="hours", minimum=0)

# --- Provisioning --------------------------------------------------------------------------
# Starts and ends live in PostgreSQL; beat runs the dispatcher every DISPATCH_INTERVAL, so a
# reservation starts (and ends) within that interval plus queue latency of its time.
PROVISIONING_DRIVER = env_str("PROVISIONING_DRIVER", "simulated")
if PROVISIONING_DRIVER not in {"simulated", "site_agent"}:
    raise ImproperlyConfigured(
        f"PROVISIONING_DRIVER must be simulated or site_agent, got {PROVISIONING_DRIVER!r}"
    )
SIMULATED_DRIVER_LATENCY_SECONDS = float(
    env_decimal("SIMULATED_DRIVER_LATENCY_SECONDS", Decimal("1"))
)
SIMULATED_DRIVER_FAILURE_RATE = float(env_decimal("SIMULATED_DRIVER_FAILURE_RATE", Decimal("0")))
if SIMULATED_DRIVER_LATENCY_SECONDS < 0 or not 0 <= SIMULATED_DRIVER_FAILURE_RATE <= 1:
    raise ImproperlyConfigured(
        "SIMULATED_DRIVER_LATENCY_SECONDS must be >= 0 and SIMULATED_DRIVER_FAILURE_RATE in [0, 1]"
    )
# Append one JSON line per simulated driver call to this file (tests count calls with it).
SIMULATED_DRIVER_LOG = env_str("SIMULATED_DRIVER_LOG", "")
PROVISIONING_DISPATCH_INTERVAL_SECONDS = env_int(
    "PROVISIONING_DISPATCH_INTERVAL_SECONDS", 5, minimum=1
)
PROVISIONING_DISPATCH_BATCH = env_int("PROVISIONING_DISPATCH_BATCH", 100, minimum=1)
PROVISIONING_STUCK_AFTER = env_duration("PROVISIONING_STUCK_AFTER_SECONDS", 120, minimum=1)
# A worker renews its lease on a reservation while it works on it; a dead worker's lease
# lapses after this long, and the reservation can be picked up again.
PROVISIONING_WORKER_LEASE_SECONDS = env_int("PROVISIONING_WORKER_LEASE_SECONDS", 30, minimum=1)
PROVISIONING_MAX_ATTEMPTS = env_int("PROVISIONING_MAX_ATTEMPTS", 5, minimum=1)
PROVISIONING_DEFAULT_IMAGE = env_str("PROVISIONING_DEFAULT_IMAGE", "docker.io/library/ubuntu:24.04")
# A customer's image from a registry at localhost or a loopback, link-local or private address
# is refused at booking (the site agents refuse to pull it too, unless started with
# --allow-private-registries): on a node it would reach the site's own network.
WORKLOAD_PRIVATE_REGISTRIES = env_bool("WORKLOAD_PRIVATE_REGISTRIES", False)
AGENT_JOB_LEASE = env_duration("AGENT_JOB_LEASE_SECONDS", 60, minimum=1)
# A job no agent has leased after this long means the node's agent is gone: provisioning moves
# the reservation to other GPUs, a release completes without waiting for the stop.
AGENT_JOB_STALL = env_duration("AGENT_JOB_STALL_SECONDS", 180, minimum=5)
# A site agent reports a start job done only once the container runs and every published
# port accepts TCP on the customer's address; a workload not ready by then fails (no charge).
PROVISIONING_READINESS_TIMEOUT_SECONDS = env_int(
    "PROVISIONING_READINESS_TIMEOUT_SECONDS", 120, minimum=1
)
# A stop sends SIGTERM, waits this long for the workload to exit, then SIGKILL; per tier.
# Interruptible workloads get at least 30 s to checkpoint.
PROVISIONING_STOP_GRACE_SECONDS = {
    "on_demand": env_int("PROVISIONING_STOP_GRACE_SECONDS_ON_DEMAND", 10, minimum=0),
    "reserved": env_int("PROVISIONING_STOP_GRACE_SECONDS_RESERVED", 10, minimum=0),
    "interruptible": env_int("PROVISIONING_STOP_GRACE_SECONDS_INTERRUPTIBLE", 30, minimum=30),
}
# An active workload whose container vanished or stalled (not its own exit) is restarted in
# place; past this many restarts within the window (a crash loop) the next one ends it. 0: never.
PROVISIONING_WORKLOAD_RESTARTS = env_int("PROVISIONING_WORKLOAD_RESTARTS", 3, minimum=0)
PROVISIONING_WORKLOAD_RESTART_WINDOW = env_duration(
    "PROVISIONING_WORKLOAD_RESTART_WINDOW_SECONDS", 3600, minimum=60
)
# Redis redelivers an unacknowledged task after this long; tasks are idempotent, and a
# duplicate that arrives while the first copy still runs is a no-op.
CELERY_VISIBILITY_TIMEOUT_SECONDS = env_int("CELERY_VISIBILITY_TIMEOUT_SECONDS", 600, minimum=1)

# --- Stripe --------------------------------------------------------------------------------
# Billing against Stripe switches on when STRIPE_SECRET_KEY is set. STRIPE_API_BASE points the
# official library at another host (localstripe in tests and the local demo).
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY", "")
STRIPE_PUBLISHABLE_KEY = env_str("STRIPE_PUBLISHABLE_KEY", "")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET", "")
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "")
STRIPE_JS_URL = env_str("STRIPE_JS_URL", "https://js.stripe.com/v3/")
STRIPE_API_VERSION = env_str("STRIPE_API_VERSION", "2025-10-29.clover")
# How long one request to Stripe may take (connect and read); a call is tried at most twice.
STRIPE_TIMEOUT_SECONDS = env_int("STRIPE_TIMEOUT_SECONDS", 20, minimum=1)
STRIPE_METER_EVENT_NAME = env_str("STRIPE_METER_EVENT_NAME", "usage_minor_units")
BILLING_LOW_BALANCE_GRACE = env_duration("BILLING_LOW_BALANCE_GRACE_SECONDS", 3600, minimum=0)
# How long a postpaid organisation may book with an invoice past due (its payment failed, or
# it went overdue or uncollectible) before new reservations and extensions are refused; 0:
# refused at once. At most about ten years (a date beyond that is no date).
BILLING_POSTPAID_PAST_DUE_GRACE = env_duration(
    "BILLING_POSTPAID_PAST_DUE_GRACE_SECONDS", 604800, minimum=0, maximum=315_360_000
)
# A new billing account's automatic-recharge threshold and amount, in CURRENCY: unset, about
# US$50 and US$100 in it (billing.money.default_recharge_settings); set, within its top-up
# limits and in whole minor units, as a customer's own settings are.
_default_threshold, _default_amount = default_recharge_settings(CURRENCY)
BILLING_DEFAULT_RECHARGE_THRESHOLD = env_decimal(
    "BILLING_DEFAULT_RECHARGE_THRESHOLD", _default_threshold
)
BILLING_DEFAULT_RECHARGE_AMOUNT = env_decimal("BILLING_DEFAULT_RECHARGE_AMOUNT", _default_amount)
_least, _most = top_up_limits(CURRENCY)
for _name, _value, _low in (
    ("BILLING_DEFAULT_RECHARGE_THRESHOLD", BILLING_DEFAULT_RECHARGE_THRESHOLD, Decimal(0)),
    ("BILLING_DEFAULT_RECHARGE_AMOUNT", BILLING_DEFAULT_RECHARGE_AMOUNT, _least),
):
    if not _low <= _value <= _most or _value != money_round(_value, CURRENCY):
        raise ImproperlyConfigured(
            f"{_name} must be between {_low:,} and {_most:,} {CURRENCY.upper()} in whole "
            f"minor units of it, got {_value}"
        )
# Hours of an on-demand reservation the prepaid balance must cover before it is accepted.
# The metering run books each reservation's completed clock hour at minute
# (reservation id % this) of the next hour, so the lines of 100,000 reservations are not all
# written by one run (docs/money.md). At most 58: every hour's lines are then written within
# the next hour, which postpaid reporting relies on (billing.services.postpaid).
BILLING_USAGE_BOOK_SPREAD_MINUTES = env_int(
    "BILLING_USAGE_BOOK_SPREAD_MINUTES", 30, minimum=1, maximum=58
)
BILLING_ON_DEMAND_COMMIT_HOURS = env_int("BILLING_ON_DEMAND_COMMIT_HOURS", 1, minimum=0)

# --- E-mail --------------------------------------------------------------------------------
# Notices (billing, curtailments) and the portal's password resets. SMTP in production; with
# DEBUG on and no EMAIL_HOST, messages are printed to the console instead of sent.
EMAIL_HOST = env_str("EMAIL_HOST", "")
EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Switchyard <noreply@localhost>")
SERVER_EMAIL = DEFAULT_FROM_EMAIL
# Seconds an SMTP connect or reply may take. Django's default waits for ever: a mail server
# that hangs held the request sending inline (broker down) for good, and a worker's task until
# its time limit killed it, unretried; a timeout raises, and marketplace.mail retries it.
EMAIL_TIMEOUT = 10
EMAIL_BACKEND = (
    "django.core.mail.backends.console.EmailBackend"
    if DEBUG and not EMAIL_HOST
    else "django.core.mail.backends.smtp.EmailBackend"
)
# Days a sent message stays in the mail outbox (marketplace_mailmessage) before retention
# deletes it; a pending one is kept until it is sent.
MAIL_RETENTION_DAYS = env_int("MAIL_RETENTION_DAYS", 14, minimum=1)
# Days a failed message stays (for staff to send it again) after its last attempt.
MAIL_FAILED_RETENTION_DAYS = env_int("MAIL_FAILED_RETENTION_DAYS", 90, minimum=1)
# How long a password-reset link works.
PASSWORD_RESET_TIMEOUT = env_int("PASSWORD_RESET_TIMEOUT_SECONDS", 3600, minimum=60)
# How long the link that finishes a sign-up (mailed to prove the address) works.
SIGNUP_CONFIRM_HOURS = env_int("SIGNUP_CONFIRM_HOURS", 24, minimum=1, maximum=168)

# --- Operations: logs, metrics, static files (docs/operations.md) --------------------------
LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    raise ImproperlyConfigured(f"LOG_LEVEL must be a logging level name, got {LOG_LEVEL!r}")
# json: one JSON object a line (production); plain: for people (make run, DEBUG).
LOG_FORMAT = env_str("LOG_FORMAT", "plain" if DEBUG else "json")
if LOG_FORMAT not in {"json", "plain"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or plain, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    # request_id: the Request-Id of the HTTP request being served, or of the one that enqueued
    # the running Celery task ("-" elsewhere).
    "filters": {"request_id": {"()": "config.request_id.RequestIdLogFilter"}},
    "formatters": {
        "json": {"()": "config.logs.JsonLogFormatter"},
        "plain": {
            "()": "config.logs.PlainLogFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s",
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    # The Stripe library logs request details at INFO.
    "loggers": {"stripe": {"level": "WARNING"}},
}

# GET /metrics (Prometheus): allowed with `Authorization: Bearer <METRICS_TOKEN>`, or from an
# address in METRICS_ALLOWED_IPS (addresses or networks). Neither set: refused to everyone.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
if METRICS_TOKEN and len(METRICS_TOKEN) < 32:
    raise ImproperlyConfigured("METRICS_TOKEN must be at least 32 characters")
METRICS_ALLOWED_IPS = env_networks("METRICS_ALLOWED_IPS", ["127.0.0.1", "::1"] if DEBUG else [])
# Where each process of a multi-process server (gunicorn, Celery prefork) writes its metrics,
# so one scrape sums them; read by prometheus_client itself, checked here. Empty: one process.
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR", "")
if PROMETHEUS_MULTIPROC_DIR and not Path(PROMETHEUS_MULTIPROC_DIR).is_dir():
    raise ImproperlyConfigured("PROMETHEUS_MULTIPROC_DIR must be an existing directory")
# host:port on which a Celery worker serves its task metrics (empty: not served).
CELERY_METRICS_ADDRESS = env_address("CELERY_METRICS_ADDRESS", "")
# Database and cache timings for /metrics: the same backends, instrumented.
for _alias in DATABASES:  # django-prometheus's, see its base.py; the replica's alike
    DATABASES[_alias]["ENGINE"] = "config.postgresql"
CACHES["default"]["BACKEND"] = "config.metrics.cache.InstrumentedRedisCache"
# The probes also stay plain HTTP if the middleware order changes.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]

# whitenoise serves /static/ from STATIC_ROOT (collectstatic), compressed, with content hashes
# in the names and a year's caching; with DEBUG the files are read from the apps, unhashed.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
# Fixed when the settings load (whitenoise would read DEBUG later, which tests switch off).
WHITENOISE_USE_FINDERS = DEBUG
WHITENOISE_AUTOREFRESH = DEBUG
