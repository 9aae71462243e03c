"""The business at the time of the scrape, read from PostgreSQL and the Celery broker.

Computed on each scrape (a handful of aggregate queries over indexed columns) rather than kept
in each process, so every web process reports the same figures and none can drift. Prometheus
scrapes every 15 to 60 s; each collect costs a few milliseconds at the demo's scale and tens
of milliseconds at 100,000 GPUs.
"""

import logging
import time

import redis
from django.conf import settings
from django.db import DatabaseError
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from config.health import bounded_cursor, readiness
from config.queues import QUEUES
from inventory.selectors import agent_heartbeat_seconds

__all__ = ["business_registry"]

logger = logging.getLogger(__name__)

# Each gauge's query gives up after this long (a table locked by a migration, a wedged query):
# with the readiness probe's 2 s for PostgreSQL and each Redis URL, a scrape answers within
# Prometheus' default scrape_timeout of 10 s, saying switchyard_business_metrics_up 0.
_GAUGES_TIMEOUT_SECONDS = 3

# Each query yields rows of (label values..., value) for one gauge.
_GAUGES = [
    (
        "switchyard_reservations",
        "Reservations by status.",
        ["status"],
        "SELECT status, count(*) FROM marketplace_reservation GROUP BY status",
    ),
    (
        "switchyard_gpus",
        "GPUs by site, node status and health.",
        ["site", "node_status", "health"],
        """SELECT s.slug, n.status, g.health, count(*)
           FROM inventory_gpu g JOIN inventory_node n ON n.id = g.node_id
           JOIN inventory_site s ON s.id = n.site_id
           GROUP BY 1, 2, 3""",
    ),
    (
        "switchyard_gpus_allocated",
        "GPUs booked by a live reservation now, by site.",
        ["site"],
        """SELECT s.slug, count(*) FILTER (WHERE g.busy @> statement_timestamp())
           FROM inventory_gpu g JOIN inventory_node n ON n.id = g.node_id
           JOIN inventory_site s ON s.id = n.site_id
           GROUP BY 1""",
    ),
    (
        "switchyard_reservations_due_not_started",
        "Reservations past their start that are not active yet (pending, scheduled, provisioning).",
        [],
        """SELECT count(*) FROM marketplace_reservation
           WHERE status IN ('pending', 'scheduled', 'provisioning') AND starts_at <= statement_timestamp()""",
    ),
    (
        "switchyard_reservation_start_lag_seconds",
        "How long past its start the longest-waiting not yet active reservation is (0: none).",
        [],
        """SELECT coalesce(extract(epoch FROM statement_timestamp() - min(starts_at)), 0)
           FROM marketplace_reservation
           WHERE status IN ('pending', 'scheduled', 'provisioning') AND starts_at <= statement_timestamp()""",
    ),
    (
        "switchyard_provisioning_attempts_failed_last_hour",
        "Provision and release attempts that failed in the last hour, by kind and outcome.",
        ["kind", "outcome"],
        """SELECT kind, outcome, count(*) FROM marketplace_provisioningattempt
           WHERE outcome IN ('error', 'node_failure', 'abandoned', 'gave_up')
             AND started_at > statement_timestamp() - interval '1 hour'
           GROUP BY 1, 2""",
    ),
    (
        "switchyard_billing_outbox_messages",
        "Stripe writes in the billing outbox, by status.",
        ["status"],
        "SELECT status, count(*) FROM billing_outboxmessage WHERE status <> 'sent' GROUP BY 1",
    ),
    (
        "switchyard_billing_outbox_oldest_pending_age_seconds",
        "Age of the oldest Stripe write not sent yet (0: none).",
        [],
        """SELECT coalesce(extract(epoch FROM statement_timestamp() - min(created_at)), 0)
           FROM billing_outboxmessage WHERE status = 'pending'""",
    ),
    (
        "switchyard_mail_messages",
        "E-mails in the mail outbox not sent, by status (pending: to be tried; failed: given up, "
        "for staff to send again).",
        ["status"],
        "SELECT status, count(*) FROM marketplace_mailmessage WHERE status <> 'sent' GROUP BY 1",
    ),
    (
        "switchyard_mail_oldest_pending_age_seconds",
        "Age of the oldest e-mail not sent yet (0: none).",
        [],
        """SELECT coalesce(extract(epoch FROM statement_timestamp() - min(created_at)), 0)
           FROM marketplace_mailmessage WHERE status = 'pending'""",
    ),
    (
        "switchyard_stripe_webhook_events_failing",
        "Stripe events received whose processing failed and has not succeeded since.",
        [],
        """SELECT count(*) FROM billing_webhookevent
           WHERE processed_at IS NULL AND error <> ''""",
    ),
    (
        "switchyard_webhook_deliveries",
        "Customers' webhook deliveries not delivered, by status (pending: to be tried again; "
        "failed: given up).",
        ["status"],
        """SELECT status, count(*) FROM marketplace_webhookdelivery
           WHERE status <> 'succeeded' GROUP BY 1""",
    ),
    (
        "switchyard_webhook_deliveries_oldest_pending_age_seconds",
        "Age of the oldest event still waiting to be delivered to a customer's webhook (0: none).",
        [],
        """SELECT coalesce(extract(epoch FROM statement_timestamp() - min(event_created_at)), 0)
           FROM marketplace_webhookdelivery WHERE status = 'pending'""",
    ),
    (
        "switchyard_webhook_endpoints_failing",
        "Enabled webhook endpoints whose deliveries are failing.",
        [],
        """SELECT count(*) FROM marketplace_webhookendpoint
           WHERE enabled AND failing_since IS NOT NULL""",
    ),
    (
        "switchyard_billing_accounts_by_funding_state",
        "Billing accounts by funding state (warning, grace, suspended: balance low or gone).",
        ["funding_state"],
        "SELECT funding_state, count(*) FROM billing_billingaccount GROUP BY 1",
    ),
    (
        "switchyard_curtailments_active",
        "Curtailments not called off and not over, by phase (announced, in effect).",
        ["phase"],
        """SELECT CASE WHEN shed_at > statement_timestamp() THEN 'announced' ELSE 'in_effect' END, count(*)
           FROM marketplace_curtailment
           WHERE called_off_at IS NULL AND (until IS NULL OR until > statement_timestamp())
           GROUP BY 1""",
    ),
]

_broker: redis.Redis | None = None


def _queues() -> list[str]:
    return sorted({settings.CELERY_TASK_DEFAULT_QUEUE, *QUEUES})


def _queue_depths() -> GaugeMetricFamily:
    global _broker
    family = GaugeMetricFamily(
        "switchyard_celery_queue_length", "Tasks waiting in each Celery queue.", labels=["queue"]
    )
    if _broker is None:
        _broker = redis.Redis.from_url(
            settings.CELERY_BROKER_URL, socket_connect_timeout=2, socket_timeout=2
        )
    queues = _queues()
    pipe = _broker.pipeline(transaction=False)
    for queue in queues:
        pipe.llen(queue)
    for queue, length in zip(queues, pipe.execute(), strict=True):
        family.add_metric([queue], length)
    return family


class BusinessCollector(Collector):
    def collect(self):
        started = time.monotonic()
        up = 1
        try:
            with bounded_cursor(_GAUGES_TIMEOUT_SECONDS) as cursor:
                for name, documentation, labels, sql in _GAUGES:
                    family = GaugeMetricFamily(name, documentation, labels=labels)
                    cursor.execute(sql)
                    for *label_values, value in cursor.fetchall():
                        family.add_metric([str(v) for v in label_values], float(value))
                    yield family
            yield GaugeMetricFamily(
                "switchyard_agent_heartbeat_interval_seconds",
                "The interval every site agent is told to heartbeat at: AGENT_HEARTBEAT_SECONDS, "
                "longer for a fleet past AGENT_HEARTBEATS_PER_SECOND (at most a third of "
                "NODE_OFFLINE_AFTER_SECONDS).",
                value=agent_heartbeat_seconds(),
            )
        except DatabaseError:
            logger.exception("metrics: the business figures could not be read")
            up = 0
        try:
            yield _queue_depths()
        except (redis.RedisError, OSError):
            logger.exception("metrics: the Celery queue lengths could not be read")
            up = 0
        ready = GaugeMetricFamily(
            "switchyard_ready",
            "1 when the part answers as GET /readyz checks it (database, redis, migrations).",
            labels=["part"],
        )
        for part, state in readiness()[1].items():
            ready.add_metric([part], 1 if state == "ok" else 0)
        yield ready
        yield GaugeMetricFamily(
            "switchyard_business_metrics_up",
            "1 when the business figures and queue lengths were all read on this scrape.",
            value=up,
        )
        yield GaugeMetricFamily(
            "switchyard_business_metrics_collect_seconds",
            "How long reading the business figures took.",
            value=time.monotonic() - started,
        )


business_registry = CollectorRegistry(auto_describe=False)
business_registry.register(BusinessCollector())
