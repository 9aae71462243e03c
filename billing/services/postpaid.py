"""Postpaid usage → Stripe Billing Meters, one meter event per organisation and hour.

Usage lines are written to the ledger for every organisation alike (booked hourly from the
accruals, and at state changes: billing.services.usage); for postpaid ones, each completed UTC
hour's lines (by the time they were written, two minutes after the hour) are summed into a
UsageAggregate. A reservation's clock hour is booked in the first
BILLING_USAGE_BOOK_SPREAD_MINUTES (at most 58) minutes of the next hour, so every line of it
is written within that next hour and in its aggregate, once, whatever minute booked it;
and that aggregate is sent as one meter event whose `identifier` is derived from its id
("sy-usage-<id>"), through the outbox with the idempotency key "meter:<id>". A resend of the
same aggregate is therefore harmless twice over, and the number of Stripe calls grows with
organisations × hours, not with reservations. The meter (event_name settings.STRIPE_METER_EVENT_NAME,
sum of `value`, customer mapped by `stripe_customer_id`) is priced per GPU-second in Stripe.

Corrections (usage given back: an outage found late, a reservation ended early) can make an
hour's net usage negative, and a meter event cannot carry a negative value. Such an hour sends
nothing, and its GPU-seconds are taken off the next hours' events until they are used up: each
event carries max(0, all usage so far − all sent so far), so what Stripe has been told never
exceeds the usage (beyond an unused credit carried forward) and a credit is never lost.
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from billing.models import (
    BillingAccount,
    BillingMode,
    LedgerEntry,
    LedgerKind,
    OutboxMessage,
    UsageAggregate,
)
from billing.services.outbox import OutboxHandler, outbox_enqueue, outbox_handler
from billing.stripe_gateway import StripeGateway

__all__ = ["usage_aggregate_create", "usage_report_postpaid_run"]

# Stripe accepts meter events up to 35 days old; we look back a little less.
LOOKBACK = timedelta(days=30)
SETTLE = timedelta(minutes=2)


@transaction.atomic
def usage_aggregate_create(
    *,
    organization_id: int,
    period_start: datetime,
    gpu_seconds: int,
    amount_minor: int,
    currency: str,
) -> UsageAggregate | None:
    # One organisation's periods are aggregated one at a time: each takes off what the
    # previous ones left (the account row is the lock).
    BillingAccount.objects.select_for_update().filter(organization_id=organization_id).first()
    so_far = UsageAggregate.objects.filter(organization_id=organization_id).aggregate(
        usage=Sum("gpu_seconds", default=0), sent=Sum("sent_gpu_seconds", default=0)
    )
    sent = max(0, so_far["usage"] + gpu_seconds - so_far["sent"])
    try:
        with transaction.atomic():
            aggregate = UsageAggregate.objects.create(
                organization_id=organization_id,
                period_start=period_start,
                period_end=period_start + timedelta(hours=1),
                gpu_seconds=gpu_seconds,
                sent_gpu_seconds=sent,
                amount_minor=amount_minor,
                currency=currency,
            )
    except IntegrityError:
        return None  # already aggregated
    if sent > 0:
        outbox_enqueue(
            kind="meter_event.create",
            payload={"aggregate_id": aggregate.pk},
            idempotency_key=f"meter:{aggregate.pk}",
        )
    return aggregate


def usage_report_postpaid_run(*, now: datetime | None = None) -> int:
    """Aggregate every completed hour of postpaid usage not yet aggregated. Returns the count."""
    now = now or timezone.now()
    # An hour is aggregated once SETTLE has passed after it: a line stamped just before the
    # hour by a transaction that commits just after it is in the ledger by then.
    current_hour = (now - SETTLE).replace(minute=0, second=0, microsecond=0)
    postpaid = BillingAccount.objects.filter(mode=BillingMode.POSTPAID).values("organization_id")
    rows = (
        LedgerEntry.objects.filter(
            kind=LedgerKind.USAGE,
            organization_id__in=postpaid,
            created_at__gte=current_hour - LOOKBACK,
            created_at__lt=current_hour,
        )
        .annotate(hour=TruncHour("created_at"))
        .values("organization_id", "hour", "currency")
        .annotate(gpu_seconds=Sum("gpu_seconds"), amount=Sum("amount_minor"))
        .order_by("organization_id", "hour")
    )
    done = set(
        UsageAggregate.objects.filter(period_start__gte=current_hour - LOOKBACK).values_list(
            "organization_id", "period_start"
        )
    )
    created = 0
    for row in rows:
        if (row["organization_id"], row["hour"]) in done:
            continue
        if usage_aggregate_create(
            organization_id=row["organization_id"],
            period_start=row["hour"],
            gpu_seconds=int(row["gpu_seconds"]),
            amount_minor=-int(row["amount"]),
            currency=row["currency"],
        ):
            created += 1
    return created


@outbox_handler("meter_event.create")
class MeterEventCreate(OutboxHandler):
    def send(self, gateway: StripeGateway, message: OutboxMessage) -> dict:
        aggregate = UsageAggregate.objects.get(pk=message.payload["aggregate_id"])
        account = BillingAccount.objects.get(organization_id=aggregate.organization_id)
        result = gateway.meter_event_create(
            event_name=settings.STRIPE_METER_EVENT_NAME,
            identifier=aggregate.identifier,
            customer_id=account.stripe_customer_id,
            value=int(aggregate.sent_gpu_seconds),
            timestamp=aggregate.period_start,
            idempotency_key=message.idempotency_key,
        )
        # A meter event has no id of its own; its identifier is ours.
        return {"id": result.get("identifier", aggregate.identifier), **result}
