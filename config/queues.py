"""The Celery queues and which tasks go to each: read by the app's router (config/celery.py)
and by the queue-length metric (config/metrics/business.py), so neither imports the other."""

__all__ = ["DEFAULT_QUEUE", "QUEUES", "TASK_QUEUES"]

# The queues, and which tasks go to each (by name; the first matching prefix wins). Each can be
# consumed by workers of its own on other machines (docs/scaling.md):
# - provisioning: starts and ends of reservations (driver and site-agent calls, seconds each);
# - billing: metering, Stripe's outbox and webhooks, recharges, SLA credits;
# - webhooks: sending events to customers' endpoints (waits on their servers: threads);
# - telemetry: writing and rolling up GPU telemetry, its retention, the heartbeat buffer's flush;
# - default: everything else (sweeps of silent nodes, reliability, pruning).
DEFAULT_QUEUE = "default"
QUEUES = ("provisioning", "billing", "webhooks", "telemetry", DEFAULT_QUEUE)
TASK_QUEUES = (
    ("marketplace.tasks.reservation_provision", "provisioning"),
    ("marketplace.tasks.reservation_release", "provisioning"),
    ("marketplace.tasks.reservations_dispatch_due", "provisioning"),
    ("marketplace.tasks.reservations_sweep_stuck", "provisioning"),
    ("marketplace.tasks.reservation_outages_reconcile", "provisioning"),
    ("marketplace.tasks.gpu_failures_handle", "provisioning"),
    ("marketplace.tasks.resale_listings_withdraw_ended", "provisioning"),
    ("marketplace.tasks.resale_listings_expire_begun", "provisioning"),
    ("marketplace.tasks.webhook", "webhooks"),
    ("billing.tasks.", "billing"),
    ("inventory.tasks.telemetry_", "telemetry"),
    ("inventory.tasks.heartbeats_flush", "telemetry"),
)
