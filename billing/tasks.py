"""Billing tasks. Each takes ids, loads fresh rows and calls a service; all are idempotent."""

import logging
from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from billing.models import WebhookEvent
from billing.services.credits import sla_credits_issue_for_month, sla_settle_delay
from billing.services.metering import usage_meter_run
from billing.services.outbox import outbox_due_ids, outbox_send
from billing.services.postpaid import usage_report_postpaid_run
from billing.services.topups import auto_recharge_for_reservation
from billing.services.webhooks import webhook_event_process
from marketplace.models import Organization

__all__ = [
    "outbox_send_task",
    "auto_recharge_for_reservation_task",
    "outbox_flush",
    "webhook_process",
    "webhook_sweep",
    "usage_meter",
    "sla_credits_issue",
    "usage_report_postpaid",
]

logger = logging.getLogger(__name__)


@shared_task(name="billing.tasks.outbox_send")
def outbox_send_task(message_id: int) -> str:
    return outbox_send(message_id=message_id)


@shared_task(name="billing.tasks.outbox_flush")
def outbox_flush(limit: int = 200) -> int:
    """Send every due pending message (the sweeper behind on_commit; replays after outages)."""
    sent = 0
    for message_id in outbox_due_ids(limit=limit):
        if outbox_send(message_id=message_id):
            sent += 1
    return sent


@shared_task(name="billing.tasks.auto_recharge_for_reservation")
def auto_recharge_for_reservation_task(
    organization_id: int, needed_minor: int, amount_minor: int | None = None
) -> int | None:
    """Sent by the funding gate when it refuses a booking for want of balance, with the
    amount its 402 stated."""
    organization = Organization.objects.filter(pk=organization_id).first()
    if organization is None:
        return None
    top_up = auto_recharge_for_reservation(
        organization=organization, needed_minor=needed_minor, amount_minor=amount_minor
    )
    return top_up.pk if top_up else None


@shared_task(name="billing.tasks.webhook_process")
def webhook_process(event_id: int) -> bool:
    return webhook_event_process(event_id=event_id)


@shared_task(name="billing.tasks.webhook_sweep")
def webhook_sweep() -> int:
    """Process stored events whose task was lost (older than a minute and not processed)."""
    ids = WebhookEvent.objects.filter(
        processed_at__isnull=True, received_at__lt=timezone.now() - timedelta(minutes=1)
    ).values_list("id", flat=True)[:500]
    return sum(1 for event_id in ids if webhook_event_process(event_id=event_id))


@shared_task(name="billing.tasks.usage_meter")
def usage_meter() -> int:
    """Meter every reservation that may owe something, then update each organisation's funding."""
    return usage_meter_run()


@shared_task(name="billing.tasks.sla_credits_issue")
def sla_credits_issue() -> int:
    """Credit the SLA misses of the last month that has settled: everything that can land in
    it has (sla_settle_delay after its end). Idempotent: once per reservation and month."""
    now = timezone.now()
    settled_up_to = (now - sla_settle_delay()).date().replace(day=1)
    last_month = (settled_up_to - timedelta(days=1)).replace(day=1)
    return sla_credits_issue_for_month(month=last_month, now=now)


@shared_task(name="billing.tasks.usage_report_postpaid")
def usage_report_postpaid() -> int:
    """Report each completed hour of postpaid ledger lines to Stripe, in money (one meter event
    or balance credit per organisation and hour)."""
    return usage_report_postpaid_run()
