"""Each kind of work goes to its own Celery queue, so each scales with workers of its own."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from config.celery import (
    DEFAULT_QUEUE,
    PERIODIC_EXPIRES_SECONDS,
    QUEUES,
    app,
    periodic_expires,
    task_route,
    worker_queues,
)
from tests.provisioning_support import broker_fixture, redis_test_client  # noqa: F401 (fixture)

# Every task of ours and where it must go: a new task fails the first test until it is added
# here, so its queue is a decision (config/queues.py's TASK_QUEUES), not an accident.
EXPECTED = {
    "marketplace.tasks.reservation_provision": "provisioning",
    "marketplace.tasks.reservation_release": "provisioning",
    "marketplace.tasks.reservations_dispatch_due": "provisioning",
    "marketplace.tasks.reservations_sweep_stuck": "provisioning",
    "marketplace.tasks.reservation_outages_reconcile": "provisioning",
    "marketplace.tasks.gpu_failures_handle": "provisioning",
    "marketplace.tasks.resale_listings_withdraw_ended": "provisioning",
    "marketplace.tasks.resale_listings_expire_begun": "provisioning",
    "marketplace.tasks.webhook_endpoint_send": "webhooks",
    "marketplace.tasks.webhooks_sweep": "webhooks",
    "marketplace.tasks.reliability_compute": "default",
    "marketplace.tasks.idempotency_records_purge": "default",
    "marketplace.tasks.events_prune": "default",
    "marketplace.tasks.noop": "default",
    "marketplace.mail.mail_send": "default",
    "marketplace.mail.mail_outbox_send": "default",
    "marketplace.mail.mail_outbox_sweep": "default",
    "marketplace.tasks.invitation_mail_send": "default",
    "marketplace.tasks.password_reset_mail_send": "default",
    "marketplace.tasks.signup_mail_send": "default",
    "marketplace.tasks.signup_taken_mail_send": "default",
    "marketplace.tasks.email_change_mail_send": "default",
    "billing.tasks.outbox_send": "billing",
    "billing.tasks.outbox_flush": "billing",
    "billing.tasks.auto_recharge_for_reservation": "billing",
    "billing.tasks.webhook_process": "billing",
    "billing.tasks.webhook_sweep": "billing",
    "billing.tasks.usage_meter": "billing",
    "billing.tasks.sla_credits_issue": "billing",
    "billing.tasks.usage_report_postpaid": "billing",
    "inventory.tasks.telemetry_flush": "telemetry",
    "inventory.tasks.telemetry_rollup": "telemetry",
    "inventory.tasks.telemetry_retention": "telemetry",
    "inventory.tasks.heartbeats_flush": "telemetry",
    "marketplace.tasks.history_prune": "default",
    "marketplace.tasks.sessions_clear_expired": "default",
    "inventory.tasks.nodes_mark_offline": "default",
    "inventory.tasks.burn_ins_expire": "default",
}


@pytest.fixture
def production_queues():
    previous = app.conf.task_default_queue
    app.conf.task_default_queue = DEFAULT_QUEUE
    yield
    app.conf.task_default_queue = previous


def _our_tasks() -> set[str]:
    app.loader.import_default_modules()
    return {
        name for name in app.tasks if name.split(".")[0] in {"marketplace", "billing", "inventory"}
    }


@pytest.mark.usefixtures("production_queues")
def test_every_task_is_routed_to_its_queue():
    assert _our_tasks() == set(EXPECTED)
    assert {name: task_route(name)["queue"] for name in EXPECTED} == EXPECTED
    assert set(EXPECTED.values()) == set(QUEUES)


@pytest.mark.usefixtures("production_queues")
def test_a_sent_task_lands_on_its_queue_through_celerys_router():
    route = app.amqp.router.route({}, "billing.tasks.usage_meter", args=(), kwargs={})
    assert route["queue"].name == "billing"
    route = app.amqp.router.route({}, "marketplace.tasks.webhook_endpoint_send", (1,), {})
    assert route["queue"].name == "webhooks"


@pytest.mark.usefixtures("production_queues")
def test_a_worker_for_everything_consumes_every_queue():
    assert worker_queues() == ["provisioning", "billing", "webhooks", "telemetry", "default"]


def test_a_process_on_a_queue_of_its_own_sends_everything_there():
    previous = app.conf.task_default_queue
    app.conf.task_default_queue = "bench-1234"
    try:
        assert {task_route(name)["queue"] for name in EXPECTED} == {"bench-1234"}
        assert worker_queues() == ["bench-1234"]
    finally:
        app.conf.task_default_queue = previous


def test_beat_schedules_only_tasks_that_exist():
    tasks = _our_tasks()
    assert {entry["task"] for entry in app.conf.beat_schedule.values()} <= tasks


def _beat_entry(name: str):
    scheduler = app.conf.beat_scheduler(app=app, lazy=True)  # what celery beat and -B run
    return scheduler, scheduler.Entry(name=name, app=app, **app.conf.beat_schedule[name])


def test_every_periodic_task_expires_once_newer_copies_follow_it():
    # Workers away for hours must not come back to hours of sweeps queued ahead of new work.
    expiries = {name: periodic_expires(_beat_entry(name)[1]) for name in app.conf.beat_schedule}
    assert expiries["inventory-heartbeats-flush"] == PERIODIC_EXPIRES_SECONDS
    assert expiries["marketplace-prune-events"] == 86400.0
    for name, expires in expiries.items():
        interval = app.conf.beat_schedule[name]["schedule"]
        assert expires == max(interval, PERIODIC_EXPIRES_SECONDS), name


def test_beat_publishes_a_periodic_task_with_its_expiry(broker):
    scheduler, entry = _beat_entry("marketplace-dispatch-due-reservations")
    before = datetime.now(UTC)

    scheduler.apply_async(entry, advance=False)

    [message] = [json.loads(raw) for raw in redis_test_client().lrange(broker, 0, -1)]
    assert message["headers"]["task"] == "marketplace.tasks.reservations_dispatch_due"
    left = datetime.fromisoformat(message["headers"]["expires"]) - before
    assert (
        timedelta(seconds=PERIODIC_EXPIRES_SECONDS - 5)
        < left
        <= timedelta(seconds=PERIODIC_EXPIRES_SECONDS + 5)
    )
