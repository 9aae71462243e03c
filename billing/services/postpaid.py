"""Postpaid organisations → Stripe, in money: what the ledger says, once, per organisation and hour.

A postpaid organisation's ledger lines are written as everyone's are (usage booked hourly and
at state changes, reserved-term charges, cancellation refunds, SLA and staff credits, resale
proceeds and fees); the ledger says what it owes. Every run (Celery beat, every 5 minutes)
compares, per organisation and completed UTC hour (by the time the lines were written, two
minutes after the hour), what its invoiced lines add up to with what was already reported
for that hour, and records the difference as a UsageAggregate: normally once per hour, again
only when a line lands late in an hour already reported (a transaction that committed after
the run). Each aggregate goes to Stripe through the outbox, as money in minor units:

- owed (> 0): one Billing Meter event whose value is the amount in minor units (the meter
  sums `value`, and its price is 1 minor unit per unit), `identifier` "sy-usage-<id>",
  idempotency key "meter:<id>";
- given back (< 0: the hour's credits and corrections outweigh its charges): one customer
  balance transaction of that amount (a credit Stripe applies to the next invoice),
  idempotency key "balance_credit:<id>".

So Stripe is told exactly the ledger's amount (no GPU-seconds priced alike at any price, no
credit left behind), with one Stripe call per organisation and hour whatever the number of
reservations or lines. Invoiced lines: every kind except what moved over the card and is
settled there (top-ups, refunds to the card and their reversals), written after the switch
to postpaid (BillingAccount.postpaid_approved_at; none: postpaid from the start).
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q, QuerySet, Sum
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
from billing.money import from_minor_units
from billing.services.outbox import OutboxHandler, outbox_enqueue, outbox_handler
from billing.stripe_gateway import StripeGateway

__all__ = [
    "CARD_SETTLED_KINDS",
    "postpaid_invoiced_lines",
    "usage_aggregate_create",
    "usage_report_postpaid_run",
]

# Stripe accepts meter events up to 35 days old; we look back a little less.
LOOKBACK = timedelta(days=30)
SETTLE = timedelta(minutes=2)
HOUR = timedelta(hours=1)

# Money that moved over the card (a top-up's PaymentIntent, a Refund and the adjustment that
# reverses a failed one): Stripe settled it already, so it is not invoiced again.
CARD_SETTLED_KINDS = (LedgerKind.TOP_UP, LedgerKind.REFUND, LedgerKind.ADJUSTMENT)


def postpaid_invoiced_lines() -> QuerySet[LedgerEntry]:
    """The ledger lines a postpaid organisation is invoiced for: every kind but the card's,
    written since it became postpaid (lines from before were paid from its prepaid balance)."""
    account = "organization__billing_account__"
    return LedgerEntry.objects.filter(
        Q(**{f"{account}postpaid_approved_at__isnull": True})
        # After the switch: the lines it booked itself are stamped at or before its instant.
        | Q(created_at__gt=F(f"{account}postpaid_approved_at")),
        **{f"{account}mode": BillingMode.POSTPAID},
    ).exclude(kind__in=CARD_SETTLED_KINDS)


@transaction.atomic
def usage_aggregate_create(
    *, organization_id: int, period_start: datetime, currency: str
) -> UsageAggregate | None:
    """Record what the organisation's lines written in the hour from `period_start` add up to
    beyond what was reported for it, and queue it for Stripe. None: nothing is left to report.

    Under the billing account's row lock, so two runs (or a run and its retry) report each
    line once: the second finds the difference already recorded.
    """
    account = BillingAccount.objects.select_for_update().filter(organization_id=organization_id)
    if account.first() is None:
        return None
    in_hour = {"organization_id": organization_id, "currency": currency}
    ledger = (
        postpaid_invoiced_lines()
        .filter(created_at__gte=period_start, created_at__lt=period_start + HOUR, **in_hour)
        .aggregate(
            amount=Sum("amount_minor", default=0),
            gpu_seconds=Sum("gpu_seconds", filter=Q(kind=LedgerKind.USAGE), default=0),
        )
    )
    reported = UsageAggregate.objects.filter(period_start=period_start, **in_hour).aggregate(
        amount=Sum("amount_minor", default=0), gpu_seconds=Sum("gpu_seconds", default=0)
    )
    # A charge is negative in the ledger and owed (positive) here.
    owed = -int(ledger["amount"]) - int(reported["amount"])
    if owed == 0:
        return None
    aggregate = UsageAggregate.objects.create(
        organization_id=organization_id,
        period_start=period_start,
        period_end=period_start + HOUR,
        gpu_seconds=int(ledger["gpu_seconds"]) - int(reported["gpu_seconds"]),
        amount_minor=owed,
        currency=currency,
    )
    if owed > 0:
        outbox_enqueue(
            kind="meter_event.create",
            payload={"aggregate_id": aggregate.pk},
            idempotency_key=f"meter:{aggregate.pk}",
        )
    else:
        outbox_enqueue(
            kind="customer_balance.credit",
            payload={"aggregate_id": aggregate.pk},
            idempotency_key=f"balance_credit:{aggregate.pk}",
        )
    return aggregate


def usage_report_postpaid_run(*, now: datetime | None = None) -> int:
    """Report every completed hour of postpaid ledger lines not yet (wholly) reported.
    Returns the number of aggregates recorded."""
    now = now or timezone.now()
    # An hour is reported once SETTLE has passed after it: a line stamped just before the
    # hour by a transaction that commits just after it is in the ledger by then (one that
    # commits later still is reported by the next run that finds it).
    current_hour = (now - SETTLE).replace(minute=0, second=0, microsecond=0)
    since = current_hour - LOOKBACK
    ledger = (
        postpaid_invoiced_lines()
        .filter(created_at__gte=since, created_at__lt=current_hour)
        .annotate(hour=TruncHour("created_at"))
        .values("organization_id", "hour", "currency")
        .annotate(amount=Sum("amount_minor"))
        .order_by("organization_id", "hour", "currency")
    )
    reported = {
        (row["organization_id"], row["period_start"], row["currency"]): row["amount"]
        for row in UsageAggregate.objects.filter(period_start__gte=since)
        .values("organization_id", "period_start", "currency")
        .annotate(amount=Sum("amount_minor"))
        .order_by()
    }
    created = 0
    for row in ledger:
        key = (row["organization_id"], row["hour"], row["currency"])
        if -int(row["amount"]) == reported.get(key, 0):
            continue
        if usage_aggregate_create(
            organization_id=row["organization_id"],
            period_start=row["hour"],
            currency=row["currency"],
        ):
            created += 1
    return created


def _aggregate_and_customer(message: OutboxMessage) -> tuple[UsageAggregate, str]:
    aggregate = UsageAggregate.objects.get(pk=message.payload["aggregate_id"])
    account = BillingAccount.objects.get(organization_id=aggregate.organization_id)
    return aggregate, account.stripe_customer_id


@outbox_handler("meter_event.create")
class MeterEventCreate(OutboxHandler):
    """What an hour owes, in minor units, on the meter priced at 1 minor unit per unit."""

    def send(self, gateway: StripeGateway, message: OutboxMessage) -> dict:
        aggregate, customer_id = _aggregate_and_customer(message)
        result = gateway.meter_event_create(
            event_name=settings.STRIPE_METER_EVENT_NAME,
            identifier=aggregate.identifier,
            customer_id=customer_id,
            value=int(aggregate.amount_minor),
            timestamp=aggregate.period_start,
            idempotency_key=message.idempotency_key,
        )
        # A meter event has no id of its own; its identifier is ours.
        return {"id": result.get("identifier", aggregate.identifier), **result}


@outbox_handler("customer_balance.credit")
class CustomerBalanceCredit(OutboxHandler):
    """What an hour gives back, as a credit on the customer's balance (the next invoice)."""

    def send(self, gateway: StripeGateway, message: OutboxMessage) -> dict:
        aggregate, customer_id = _aggregate_and_customer(message)
        return gateway.customer_balance_credit(
            customer_id=customer_id,
            amount=from_minor_units(-int(aggregate.amount_minor), aggregate.currency),
            currency=aggregate.currency,
            description=f"Credits and corrections, {aggregate.period_start:%Y-%m-%d %H:00} UTC",
            metadata={"aggregate": aggregate.identifier},
            idempotency_key=message.idempotency_key,
        )
