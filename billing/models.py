"""Money: billing accounts, the append-only ledger, the Stripe outbox and mirrors.

Amounts are integer minor units (`amount_minor`, cents for USD) with the currency beside them.
Ledger sign convention: a positive entry adds to the organisation's balance (top-up, credit,
SLA credit), a negative entry takes from it (usage, reserved-term charge, a refund paid back to
the card). The balance is never stored: it is the sum of the organisation's entries.
"""

from datetime import datetime

from django.conf import settings
from django.db import models
from django.db.models import Q

from marketplace import ids
from marketplace.models import Organization, Reservation

__all__ = [
    "BillingMode",
    "FundingState",
    "BillingAccount",
    "PaymentMethod",
    "LedgerKind",
    "LedgerEntry",
    "LedgerImmutable",
    "TopUpStatus",
    "TopUp",
    "RefundStatus",
    "Refund",
    "OutboxStatus",
    "OutboxMessage",
    "WebhookEvent",
    "INVOICE_UNPAID_STATUSES",
    "Invoice",
    "UsageAggregate",
    "BillingNotice",
    "HoldStatus",
    "Hold",
    "UsageAccrual",
    "Balance",
]


class BillingMode(models.TextChoices):
    PREPAID = "prepaid"
    POSTPAID = "postpaid"


class FundingState(models.TextChoices):
    OK = "ok"
    WARNING = "warning"
    GRACE = "grace"
    SUSPENDED = "suspended"


class BillingAccount(models.Model):
    """An organisation's billing settings and its Stripe customer."""

    organization = models.OneToOneField(
        Organization, on_delete=models.PROTECT, related_name="billing_account"
    )
    currency = models.CharField(max_length=3, default="usd")
    stripe_customer_id = models.CharField(max_length=64, blank=True, db_index=True)
    mode = models.CharField(max_length=10, choices=BillingMode.choices, default=BillingMode.PREPAID)
    postpaid_approved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    postpaid_approved_at = models.DateTimeField(null=True, blank=True)
    # Opt-in: charging a card unasked needs the customer's say-so and a saved card.
    auto_recharge_enabled = models.BooleanField(default=False)
    recharge_threshold_minor = models.BigIntegerField(
        default=5000, help_text="Recharge (and warn) when the balance drops below this."
    )
    recharge_amount_minor = models.BigIntegerField(default=10000)
    # One automatic recharge per drop below the threshold: disarmed when one is started,
    # re-armed when the balance is back at or above the threshold.
    recharge_armed = models.BooleanField(default=True)
    monthly_spend_limit_minor = models.BigIntegerField(
        null=True, blank=True, help_text="Empty: no limit."
    )
    default_payment_method_id = models.CharField(max_length=64, blank=True)
    funding_state = models.CharField(
        max_length=10, choices=FundingState.choices, default=FundingState.OK
    )
    grace_until = models.DateTimeField(null=True, blank=True)
    funding_state_changed_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(mode__in=BillingMode.values), name="billing_account_mode_valid"
            ),
            models.CheckConstraint(
                condition=Q(recharge_threshold_minor__gte=0) & Q(recharge_amount_minor__gt=0),
                name="billing_account_recharge_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"billing of {self.organization}"


class PaymentMethod(models.Model):
    """Mirror of a Stripe PaymentMethod attached to the organisation's customer."""

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="payment_methods"
    )
    stripe_payment_method_id = models.CharField(max_length=64, unique=True)
    brand = models.CharField(max_length=32, blank=True)
    last4 = models.CharField(max_length=4, blank=True)
    exp_month = models.PositiveSmallIntegerField(null=True, blank=True)
    exp_year = models.PositiveSmallIntegerField(null=True, blank=True)
    detached_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.brand} …{self.last4}"


class LedgerKind(models.TextChoices):
    # The labels are what statements and the usage page show ("Top-up", not "Top Up").
    USAGE = "usage", "Usage"
    RESERVED_CHARGE = "reserved_charge", "Reserved-term charge"
    TOP_UP = "top_up", "Top-up"
    # A staff (goodwill) credit. A reserved term's money given back for time it did not get
    # (cancelled, failed, curtailed by force, a resold window returned) is a term_refund: an
    # accountant reads them apart in every view (statement, CSV, API, admin).
    CREDIT = "credit", "Credit"
    TERM_REFUND = "term_refund", "Reserved-term refund"
    SLA_CREDIT = "sla_credit", "SLA credit"
    REFUND = "refund", "Refund"
    ADJUSTMENT = "adjustment", "Adjustment"
    # A reserved term's holder resold part of it: what the buyer was charged (+), and the
    # platform's fee on it (−), on the seller's balance (marketplace ResaleListing).
    RESALE_PROCEEDS = "resale_proceeds", "Resale proceeds"
    RESALE_FEE = "resale_fee", "Resale fee"


class LedgerImmutable(Exception):
    """Ledger entries are never changed or deleted; correct with a new entry."""


class LedgerEntry(models.Model):
    """One money movement. Append-only (a database trigger refuses UPDATE and DELETE).

    Shown by its `public_id` (led_…), never its sequential id, which would tell any customer
    how many lines the whole platform writes. Rows the metering run inserts in SQL get theirs
    from the column's database default (billing 0011)."""

    public_id = models.CharField(
        max_length=40, unique=True, default=ids.ledger_entry_id, editable=False
    )
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    kind = models.CharField(max_length=20, choices=LedgerKind.choices)
    amount_minor = models.BigIntegerField(help_text="Signed: + adds to the balance, − takes.")
    currency = models.CharField(max_length=3)
    reservation = models.ForeignKey(
        Reservation, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    period_start = models.DateTimeField(null=True, blank=True)
    period_end = models.DateTimeField(null=True, blank=True)
    gpu_seconds = models.BigIntegerField(default=0)
    idempotency_key = models.CharField(max_length=200, unique=True)
    description = models.TextField(blank=True)
    # PROTECT, not SET_NULL: clearing the column would be an UPDATE, which the ledger refuses.
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "ledger entries"
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=LedgerKind.values), name="ledger_kind_valid"
            ),
            models.CheckConstraint(
                condition=Q(period_start__isnull=True)
                | Q(period_end__isnull=True)
                | Q(period_end__gte=models.F("period_start")),
                name="ledger_period_valid",
            ),
        ]
        indexes = [
            models.Index(fields=["organization", "-created_at", "-id"]),
            models.Index(fields=["reservation", "kind"]),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount_minor} {self.currency}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise LedgerImmutable("ledger entries cannot be changed")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise LedgerImmutable("ledger entries cannot be deleted")


class UsageAccrual(models.Model):
    """A metered reservation's usage, accrued to the second and booked to the ledger coarsely.

    Every metering run sets `gpu_seconds` (GPU-seconds delivered from activation up to
    `accrued_until`, outages excluded) and `accrued_minor` (their cost, rounded once on the
    total) for all open accruals in one statement. Booking (billing.services.usage.usage_book)
    writes one usage line for what is accrued but not booked — hourly, at every state change,
    extension and the end — and adds it to `booked_*` in the same statement, so
    accrued_minor − booked_minor is exactly the money accrued but not yet in the ledger.
    """

    reservation = models.OneToOneField(
        Reservation, on_delete=models.PROTECT, primary_key=True, related_name="+"
    )
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    currency = models.CharField(max_length=3)
    price_per_gpu_hour = models.DecimalField(max_digits=12, decimal_places=4)
    # Priced before the last price change (booked then at the old price): the cost of
    # gpu_seconds is price_from_minor + (gpu_seconds − price_from_gpu_seconds) × price.
    price_from_gpu_seconds = models.BigIntegerField(default=0)
    price_from_minor = models.BigIntegerField(default=0)
    gpu_seconds = models.BigIntegerField(default=0)
    accrued_minor = models.BigIntegerField(default=0)
    accrued_until = models.DateTimeField()
    # The clock was running at accrued_until (active, not released, no outage open): the live
    # figure adds the seconds since then.
    running = models.BooleanField(default=False)
    gpu_count = models.PositiveIntegerField(default=1)
    booked_gpu_seconds = models.BigIntegerField(default=0)
    booked_minor = models.BigIntegerField(default=0)
    booked_until = models.DateTimeField()
    # Set once the reservation has ended and its last late correction window has passed.
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(gpu_seconds__gte=0) & Q(booked_gpu_seconds__gte=0),
                name="usage_accrual_seconds_non_negative",
            ),
        ]
        indexes = [
            models.Index(
                fields=["organization"],
                condition=Q(closed_at__isnull=True),
                name="usage_accrual_open_org_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"accrual of {self.reservation_id}: {self.gpu_seconds} GPU-s"

    @property
    def unbooked_minor(self) -> int:
        return self.accrued_minor - self.booked_minor


class Balance(models.Model):
    """An organisation's balance: the sum of its ledger entries, kept by a database trigger on
    every ledger insert (billing migration 0007), so reading it does not sum the ledger."""

    organization = models.OneToOneField(
        Organization, on_delete=models.PROTECT, primary_key=True, related_name="+"
    )
    amount_minor = models.BigIntegerField(default=0)

    def __str__(self) -> str:
        return f"balance of {self.organization_id}: {self.amount_minor}"


class HoldStatus(models.TextChoices):
    OPEN = "open"
    CHARGED = "charged"
    RELEASED = "released"


class Hold(models.Model):
    """Money committed but not yet charged (DESIGN invariant 9).

    A reservation's committed part, or an extension's, held against the organisation's balance
    from the transaction that books it: the funding gate counts what is left of every open hold
    (amount − charged). The meter's charges for the reservation fill its holds in id order
    (charged_minor); a hold filled completely is `charged`. When the reservation is cancelled or
    ends, what was never charged is `released`.
    """

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    reservation = models.ForeignKey(Reservation, on_delete=models.PROTECT, related_name="+")
    amount_minor = models.BigIntegerField()
    charged_minor = models.BigIntegerField(default=0)
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=10, choices=HoldStatus.choices, default=HoldStatus.OPEN)
    description = models.CharField(max_length=200, blank=True)
    idempotency_key = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="hold_positive"),
            models.CheckConstraint(
                condition=Q(charged_minor__gte=0) & Q(charged_minor__lte=models.F("amount_minor")),
                name="hold_charged_within_amount",
            ),
            models.CheckConstraint(
                condition=Q(status__in=HoldStatus.values), name="hold_status_valid"
            ),
        ]
        indexes = [
            # What the funding gate sums on every reservation: the organisation's open holds.
            models.Index(
                fields=["organization"], condition=Q(status="open"), name="hold_open_org_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"hold {self.amount_minor} {self.currency} {self.status}"

    @property
    def open_minor(self) -> int:
        return self.amount_minor - self.charged_minor if self.status == HoldStatus.OPEN else 0


class OpenHoldsDelta(models.Model):
    """A change to what an organisation's open holds still commit (amount − charged).

    Written by the database's triggers on every statement that changes holds (billing
    migrations 0009 and 0010), never by Python: the sum of an organisation's rows is its open
    holds, so the funding gate does not read every hold of an organisation that has booked far
    ahead. A statement adds its change to a row of the organisation that no other transaction
    holds (SKIP LOCKED: no writer waits on another) and inserts a row only when all are held;
    the metering run and the gate fold an organisation's rows into one
    (holds.open_holds_fold, money_position(fold=True)).
    """

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    amount_minor = models.BigIntegerField()

    def __str__(self) -> str:
        return f"open holds of {self.organization_id}: {self.amount_minor:+}"


class TopUpStatus(models.TextChoices):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class TopUp(models.Model):
    """A charge of the saved card that adds to the prepaid balance (manual or automatic).
    Shown by its `public_id` (tu_…), never its sequential id (billing 0012)."""

    public_id = models.CharField(max_length=40, unique=True, default=ids.top_up_id, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    automatic = models.BooleanField(default=False)
    reason = models.TextField(blank=True, help_text="Why an automatic recharge was started.")
    payment_method_id = models.CharField(max_length=64)
    status = models.CharField(
        max_length=10, choices=TopUpStatus.choices, default=TopUpStatus.PENDING
    )
    stripe_payment_intent_id = models.CharField(max_length=64, blank=True, db_index=True)
    failure_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="top_up_positive"),
            # At most one automatic recharge in flight per organisation.
            models.UniqueConstraint(
                fields=["organization"],
                condition=Q(automatic=True, status="pending"),
                name="top_up_one_pending_auto",
            ),
        ]

    def __str__(self) -> str:
        return f"top-up {self.pk} {self.amount_minor} {self.currency} {self.status}"


class RefundStatus(models.TextChoices):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class Refund(models.Model):
    """Money paid back to the card of a top-up through Stripe's Refunds API."""

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    top_up = models.ForeignKey(TopUp, on_delete=models.PROTECT, related_name="refunds")
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    reason = models.TextField()
    status = models.CharField(
        max_length=10, choices=RefundStatus.choices, default=RefundStatus.PENDING
    )
    stripe_refund_id = models.CharField(max_length=64, blank=True, db_index=True)
    failure_reason = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="refund_positive"),
        ]

    def __str__(self) -> str:
        return f"refund {self.pk} {self.amount_minor} {self.currency} {self.status}"


class OutboxStatus(models.TextChoices):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class OutboxMessage(models.Model):
    """A Stripe write recorded before it is sent; the key makes a resend harmless."""

    kind = models.CharField(max_length=40)
    payload = models.JSONField()
    idempotency_key = models.CharField(max_length=200, unique=True)
    status = models.CharField(
        max_length=10, choices=OutboxStatus.choices, default=OutboxStatus.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(db_index=True)
    last_error = models.TextField(blank=True)
    stripe_object_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="outbox_pending_due_idx",
            ),
            # The admin's search: the messages about a Stripe object (pi_…, re_…).
            models.Index(fields=["stripe_object_id"], name="outbox_stripe_object"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.idempotency_key} {self.status}"


class WebhookEvent(models.Model):
    """A verified Stripe event, stored once per event id and processed by a task."""

    stripe_event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    payload = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    processed_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["-received_at", "-id"]

    def __str__(self) -> str:
        return f"{self.type} {self.stripe_event_id}"


# An invoice in one of these statuses is unpaid: one that became past due (payment_failed_at)
# blocks its organisation's new bookings while it stays here (billing.services.funding).
INVOICE_UNPAID_STATUSES = ("open", "uncollectible")


class Invoice(models.Model):
    """Mirror of a Stripe invoice (postpaid organisations), kept up to date by webhooks."""

    organization = models.ForeignKey(
        Organization, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    stripe_invoice_id = models.CharField(max_length=64, unique=True)
    stripe_customer_id = models.CharField(max_length=64)
    status = models.CharField(max_length=20)
    currency = models.CharField(max_length=3)
    amount_due_minor = models.BigIntegerField(default=0)
    amount_paid_minor = models.BigIntegerField(default=0)
    hosted_invoice_url = models.URLField(max_length=500, blank=True)
    period_start = models.DateTimeField(null=True, blank=True)
    period_end = models.DateTimeField(null=True, blank=True)
    # History, never cleared: when the invoice first became past due (Stripe reported a failed
    # payment, or it went overdue or uncollectible). It blocks new bookings only while the
    # invoice is unpaid (INVOICE_UNPAID_STATUSES); paid or void ends that, the date stays.
    payment_failed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the invoice first became past due (payment failed, overdue or "
        "uncollectible); kept once paid or void.",
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-period_start", "-id"]
        indexes = [
            # What the funding gate reads on every postpaid booking: the organisation's unpaid
            # past-due invoices, oldest failure first (few rows, usually none).
            models.Index(
                fields=["organization", "payment_failed_at"],
                condition=Q(payment_failed_at__isnull=False, status__in=INVOICE_UNPAID_STATUSES),
                name="invoice_past_due_org_idx",
            ),
        ]

    def __str__(self) -> str:
        return self.stripe_invoice_id

    @property
    def past_due(self) -> bool:
        """Unpaid and past due: what blocks bookings (after the grace)."""
        return self.payment_failed_at is not None and self.status in INVOICE_UNPAID_STATUSES

    @property
    def bookings_refused_from(self) -> datetime | None:
        """When, unpaid, it starts refusing the organisation's new commitments: its first
        failure plus BILLING_POSTPAID_PAST_DUE_GRACE."""
        if self.payment_failed_at is None:
            return None
        return self.payment_failed_at + settings.BILLING_POSTPAID_PAST_DUE_GRACE


class UsageAggregate(models.Model):
    """What a postpaid organisation's ledger lines written in one hour add up to, reported to
    Stripe as money (billing.services.postpaid): `amount_minor` > 0 is owed (a meter event of
    that many minor units), < 0 given back (a credit on the Stripe customer's balance).

    Normally one row per organisation and hour; a line that lands late in an hour already
    reported adds a row with the difference, so an hour's rows always add up to its lines.
    """

    organization = models.ForeignKey(Organization, on_delete=models.PROTECT, related_name="+")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    gpu_seconds = models.BigIntegerField(help_text="The usage lines' GPU-seconds (for reading).")
    sent_gpu_seconds = models.BigIntegerField(
        default=0, help_text="Before billing 0013 only: the GPU-seconds a meter event carried."
    )
    amount_minor = models.BigIntegerField(help_text="Owed (+) or given back (−), minor units.")
    currency = models.CharField(max_length=3)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-period_start", "-id"]
        indexes = [
            models.Index(
                fields=["organization", "period_start"], name="usage_aggregate_org_period_idx"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.organization_id} {self.period_start:%Y-%m-%d %H:%M} {self.amount_minor:+}"

    @property
    def identifier(self) -> str:
        return f"sy-usage-{self.pk}"


class BillingNotice(models.Model):
    """A funding notice shown to the organisation (and logged): never a silent stop."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=30)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.kind}: {self.message[:60]}"
