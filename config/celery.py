"""The Celery app.

Worker: celery -A config worker -l info -Q provisioning,billing,webhooks,telemetry,default
        (or workers per queue, on as many machines as needed: docs/scaling.md)
Beat:   celery -A config beat -l info

Starts and ends of reservations live in PostgreSQL; beat only runs short periodic tasks that
pick up what is due, so nothing depends on a long countdown parked in Redis.
"""

import logging
import os
from logging.config import dictConfig

from celery import Celery, signals
from celery.beat import PersistentScheduler, ScheduleEntry
from kombu.exceptions import KombuError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import RedisError

from config.env import env_int

# Importing it connects the task metrics' signal handlers.
from config.metrics.tasks import metrics_server_start
from config.queues import DEFAULT_QUEUE, QUEUES, TASK_QUEUES
from config.request_id import TASK_HEADER, current_request_id, request_id_bind, request_id_unbind

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

# Redis hands an unacknowledged task to another worker after this many seconds (settings.py
# documents CELERY_VISIBILITY_TIMEOUT_SECONDS; tasks are idempotent, so an early copy is harmless).
# Read here through config.env as settings.py reads them: this module loads before settings.
_VISIBILITY_TIMEOUT = env_int("CELERY_VISIBILITY_TIMEOUT_SECONDS", 600, minimum=1)
# Seconds a broker command may wait for Redis, as /readyz's probe does (config/health.py).
# Above kombu's BRPOP timeout (1 s), so an idle worker's poll is answered before it.
_BROKER_SOCKET_TIMEOUT = 2


def task_route(name: str) -> dict:
    """The queue a task is sent to. A process whose CELERY_TASK_DEFAULT_QUEUE is not "default"
    (tests and benchmarks, each on a queue of its own in a shared Redis) sends every task there,
    and its workers consume only that queue."""
    default = app.conf.task_default_queue
    if default != DEFAULT_QUEUE:
        return {"queue": default}
    for prefix, queue in TASK_QUEUES:
        if name.startswith(prefix):
            return {"queue": queue}
    return {"queue": DEFAULT_QUEUE}


def worker_queues() -> list[str]:
    """What a worker that does everything consumes (make worker, make run)."""
    default = app.conf.task_default_queue
    return list(QUEUES) if default == DEFAULT_QUEUE else [default]


app = Celery("switchyard")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    # Tasks are idempotent, so they are acknowledged only after they finish: a worker killed
    # half-way leaves the message to be delivered again.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        # kombu passes no socket timeout to redis-py (None: wait for ever), so a Redis that
        # hangs (stopped, or cut off without a reset) would hold every publish, and the
        # request or task sending it, until it came back. With a bound a send fails in
        # seconds (task_send's retries included) and the sweepers re-drive the work.
        "socket_timeout": _BROKER_SOCKET_TIMEOUT,
        "socket_connect_timeout": _BROKER_SOCKET_TIMEOUT,
        "visibility_timeout": _VISIBILITY_TIMEOUT,
        # kombu scans for expired unacknowledged messages every interval × throttle seconds
        # (100 s by default); keep that well below the visibility timeout.
        "unacked_restore_interval": max(1, min(10, _VISIBILITY_TIMEOUT // 10)),
        "unacked_restore_throttle": 1,
    },
    # Each kind of work on its own queue, so each scales with its own workers (task_route).
    task_routes=(lambda name, args, kwargs, options, task=None, **kw: task_route(name),),
    beat_schedule={
        "marketplace-dispatch-due-reservations": {
            "task": "marketplace.tasks.reservations_dispatch_due",
            "schedule": float(env_int("PROVISIONING_DISPATCH_INTERVAL_SECONDS", 5, minimum=1)),
        },
        "marketplace-sweep-stuck-reservations": {
            "task": "marketplace.tasks.reservations_sweep_stuck",
            "schedule": 30.0,
        },
        "marketplace-reconcile-reservation-outages": {
            "task": "marketplace.tasks.reservation_outages_reconcile",
            "schedule": 15.0,
        },
        "marketplace-withdraw-listings-of-ended-terms": {
            "task": "marketplace.tasks.resale_listings_withdraw_ended",
            "schedule": 60.0,
        },
        "marketplace-expire-listings-begun-unsold": {
            "task": "marketplace.tasks.resale_listings_expire_begun",
            "schedule": 60.0,
        },
        "marketplace-purge-idempotency-records": {
            "task": "marketplace.tasks.idempotency_records_purge",
            "schedule": 3600.0,
        },
        "marketplace-sweep-webhooks": {
            "task": "marketplace.tasks.webhooks_sweep",
            "schedule": 30.0,
        },
        # E-mail whose send task was lost, or whose retry is due (marketplace.mail).
        "marketplace-sweep-mail": {"task": "marketplace.mail.mail_outbox_sweep", "schedule": 15.0},
        "marketplace-prune-events": {"task": "marketplace.tasks.events_prune", "schedule": 86400.0},
        "marketplace-prune-history": {
            "task": "marketplace.tasks.history_prune",
            "schedule": 86400.0,
        },
        "marketplace-clear-expired-sessions": {
            "task": "marketplace.tasks.sessions_clear_expired",
            "schedule": 86400.0,
        },
        "billing-outbox-flush": {"task": "billing.tasks.outbox_flush", "schedule": 30.0},
        "billing-usage-meter": {"task": "billing.tasks.usage_meter", "schedule": 60.0},
        "billing-webhook-sweep": {"task": "billing.tasks.webhook_sweep", "schedule": 60.0},
        "billing-usage-report-postpaid": {
            "task": "billing.tasks.usage_report_postpaid",
            "schedule": 300.0,
        },
        "billing-sla-credits": {"task": "billing.tasks.sla_credits_issue", "schedule": 3600.0},
        "inventory-telemetry-flush": {"task": "inventory.tasks.telemetry_flush", "schedule": 5.0},
        "inventory-heartbeats-flush": {
            "task": "inventory.tasks.heartbeats_flush",
            "schedule": 5.0,
        },
        "inventory-burn-ins-expire": {"task": "inventory.tasks.burn_ins_expire", "schedule": 60.0},
        "inventory-telemetry-rollup": {
            "task": "inventory.tasks.telemetry_rollup",
            "schedule": 60.0,
        },
        "inventory-telemetry-retention": {
            "task": "inventory.tasks.telemetry_retention",
            "schedule": 3600.0,
        },
        "marketplace-reliability": {
            "task": "marketplace.tasks.reliability_compute",
            "schedule": 3600.0,
        },
        "marketplace-gpu-failures": {
            "task": "marketplace.tasks.gpu_failures_handle",
            "schedule": 30.0,
        },
        "inventory-mark-silent-nodes-offline": {
            "task": "inventory.tasks.nodes_mark_offline",
            "schedule": 30.0,
        },
    },
)
# A periodic task that waited in its queue longer than this (or its own interval, if longer) is
# acknowledged and dropped by the worker that takes it, not run (Celery's `expires`): newer
# copies follow it. After workers were away, the hours of sweeps beat queued meanwhile are
# skipped in a moment instead of run one by one ahead of the work queued since.
PERIODIC_EXPIRES_SECONDS = 300.0


def periodic_expires(entry: ScheduleEntry) -> float:
    """Seconds a periodic task sent now stays worth running."""
    run_every = getattr(entry.schedule, "run_every", None)
    interval = run_every.total_seconds() if run_every is not None else 0.0
    return max(interval, PERIODIC_EXPIRES_SECONDS)


class ExpiringScheduler(PersistentScheduler):
    """Beat's scheduler (celery beat, and worker -B): sends each periodic task with an expiry."""

    def apply_async(self, entry: ScheduleEntry, producer=None, advance=True, **kwargs):
        if "expires" not in entry.options:
            entry.options = {**entry.options, "expires": periodic_expires(entry)}
        return super().apply_async(entry, producer, advance, **kwargs)


app.conf.beat_scheduler = ExpiringScheduler

# Celery's Django fix-up closes every database connection before and after each task unless
# CELERY_DB_REUSE_MAX is set: a new PostgreSQL backend per task, which cost several times the
# work of a short task. Reuse connections as Django does between requests instead: closed when
# older than CONN_MAX_AGE or after an error (close_old_connections around each task).
app.conf.update(CELERY_DB_REUSE_MAX=1000)


@signals.task_prerun.connect
@signals.task_postrun.connect
def _close_old_connections(task=None, **kwargs) -> None:
    # At call time: this module loads with the config package (config/__init__), before the
    # settings module, so it imports nothing of Django's database layer at its top.
    from django.db import close_old_connections, connection

    # A task run eagerly (in a test, inside its transaction) must not lose its connection.
    if getattr(getattr(task, "request", None), "is_eager", False) or connection.in_atomic_block:
        return
    close_old_connections()


app.autodiscover_tasks()


# Logs: the settings' LOGGING (JSON or plain, with the request id) in workers and beat too,
# instead of Celery's own format on the root logger.
@signals.setup_logging.connect
def _logging_from_settings(**_kwargs) -> None:
    # At call time: see _close_old_connections (this module loads before the settings).
    from django.conf import settings

    dictConfig(settings.LOGGING)


# The request id of the HTTP request (or task) that enqueues a task travels in its headers,
# and the task runs under it: its log lines, and the tasks it enqueues in turn, carry it.
@signals.before_task_publish.connect
def _send_request_id(headers=None, **_kwargs) -> None:
    request_id = current_request_id()
    if headers is not None and request_id != "-":
        headers.setdefault(TASK_HEADER, request_id)


@signals.task_prerun.connect
def _bind_request_id(task=None, task_id=None, **_kwargs) -> None:
    # A task run eagerly (no message) keeps the id of the request it runs in.
    request_id = task.request.get(TASK_HEADER) or current_request_id()
    task.request.request_id_tokens = request_id_bind(request_id, task=(task.name, task_id))


@signals.task_postrun.connect
def _unbind_request_id(task=None, **_kwargs) -> None:
    tokens = getattr(task.request, "request_id_tokens", None)
    if tokens is not None:
        request_id_unbind(tokens)


@signals.worker_ready.connect
def _serve_task_metrics(**_kwargs) -> None:
    # At call time: see _close_old_connections (this module loads before the settings).
    from django.conf import settings

    if settings.CELERY_METRICS_ADDRESS:
        metrics_server_start(settings.CELERY_METRICS_ADDRESS)


logger = logging.getLogger(__name__)

# What a send raises while the broker is unreachable.
BROKER_ERRORS = (KombuOperationalError, KombuError, RedisError, OSError)
SEND_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}


def task_send(name: str, args: list, *, about: str, then: str = "") -> bool:
    """Send a task now, with a short retry. A broker outage is logged ("could not enqueue
    <name> for <about>: <error> <then>") and answered False, never raised: the caller keeps
    the work in the database, or tells the customer."""
    try:
        app.send_task(name, args=args, retry=True, retry_policy=SEND_RETRY_POLICY)
    except BROKER_ERRORS as exc:
        logger.warning("could not enqueue %s for %s: %s %s", name, about, exc, then)
        return False
    return True


def task_enqueue(name: str, args: list) -> None:
    """Send a task by name as its own .delay() would (a task registered in this process runs
    inline under task_always_eager, as tests ask), without importing its module: a service
    enqueues its tasks without importing the tasks that import it. Raises what sending raises."""
    app.signature(name, args=args).delay()
