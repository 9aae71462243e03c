"""The output serializers billing's events share with its API: an event shows a top-up, the
balance or an invoice as the API does. This module imports no services that record events
(the balance reads the account and the money position only), so billing's event recorder
imports it at module top, as does the API.
"""

from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from billing.models import BillingMode, FundingState, TopUpStatus
from billing.money import from_minor_units, top_up_limits
from billing.selectors import (
    currency_choices,
    currency_lock_reason,
    invoice_past_due,
    month_start,
    spend_minor,
)
from billing.services.accounts import billing_account_get_or_create
from billing.services.holds import money_position
from config.api.serializers import Serializer

__all__ = [
    "money_text",
    "MoneyField",
    "BalanceOutput",
    "balance_data",
    "InvoiceOutput",
    "TopUpOutput",
]


def money_text(amount_minor: int | None, currency: str) -> str | None:
    """Minor units as the API shows money: a decimal string in major units (None stays None)."""
    return None if amount_minor is None else str(from_minor_units(int(amount_minor), currency))


@extend_schema_field(OpenApiTypes.STR)
class MoneyField(serializers.Field):
    """Reads `<source>` (minor units) and the object's currency; renders a decimal string."""

    def __init__(self, **kwargs):
        kwargs["read_only"] = True
        super().__init__(**kwargs)

    def get_attribute(self, instance):
        value = super().get_attribute(instance)
        currency = instance["currency"] if isinstance(instance, dict) else instance.currency
        return money_text(value, currency)

    def to_representation(self, value):
        return value


class InvoiceOutput(Serializer):
    id = serializers.CharField(source="stripe_invoice_id")
    status = serializers.CharField()
    currency = serializers.CharField()
    amount_due = MoneyField(source="amount_due_minor")
    amount_paid = MoneyField(source="amount_paid_minor")
    hosted_invoice_url = serializers.CharField()
    period_start = serializers.DateTimeField(allow_null=True)
    period_end = serializers.DateTimeField(allow_null=True)
    past_due = serializers.BooleanField(
        help_text="Unpaid (open or uncollectible) after its payment failed, or it went overdue "
        "or uncollectible. Past due for longer than the grace, it blocks new reservations and "
        "extensions until it is paid."
    )
    payment_failed_at = serializers.DateTimeField(
        allow_null=True,
        help_text="When it first became past due; kept once it is paid or void.",
    )


class BalanceOutput(Serializer):
    currency = serializers.CharField(
        help_text="The currency the organisation is billed in, which every booking is in."
    )
    currency_changeable = serializers.BooleanField(
        help_text="Whether PATCH billing/settings may still change `currency`: only until "
        "money moves (a top-up, a credit or a booking's hold in it)."
    )
    currency_choices = serializers.ListField(
        child=serializers.CharField(),
        help_text="The currencies PATCH billing/settings takes as `currency`: those something "
        "is sold in, and this one (only this one once it can no longer change).",
    )
    balance = serializers.CharField(help_text="Prepaid balance: the sum of the ledger.")
    accrued = serializers.CharField(
        help_text="Usage accrued by the second and not yet booked to the ledger (it is booked "
        "every hour and whenever a reservation stops, ends or moves)."
    )
    held = serializers.CharField(
        help_text="Committed by bookings and not yet used or charged (open holds beyond the "
        "usage that fills them): reserved terms until the meter charges them, on-demand first "
        "hours until used."
    )
    available = serializers.CharField(
        help_text="balance − accrued − held: what new reservations and extensions can commit "
        "(prepaid), and what the low-balance rules read."
    )
    mode = serializers.ChoiceField(choices=BillingMode.choices)
    funding_state = serializers.ChoiceField(choices=FundingState.choices)
    grace_until = serializers.DateTimeField(allow_null=True)
    auto_recharge_enabled = serializers.BooleanField()
    recharge_threshold = serializers.CharField()
    recharge_amount = serializers.CharField()
    monthly_spend_limit = serializers.CharField(allow_null=True)
    spent_this_month = serializers.CharField()
    default_payment_method = serializers.CharField(allow_blank=True)
    top_up_min = serializers.CharField(
        help_text="The least one top-up (or automatic recharge) may be in this currency: at "
        "least Stripe's minimum charge in it."
    )
    top_up_max = serializers.CharField(
        help_text="The most one top-up (or automatic recharge, or the recharge threshold) may "
        "be in this currency."
    )
    invoice_past_due = InvoiceOutput(
        allow_null=True,
        help_text="Postpaid: the unpaid invoice that became past due first (its payment "
        "failed, or it went overdue or uncollectible), or null. Past due for longer than the "
        "grace, it blocks new reservations and extensions (402 `invoice_past_due`) until it "
        "is paid at its `hosted_invoice_url`.",
    )
    bookings_refused_from = serializers.DateTimeField(
        allow_null=True,
        help_text="When new reservations and extensions are, or will be, refused for "
        "`invoice_past_due` (when it became past due, plus the grace); null when none is.",
    )


def balance_data(org) -> dict:
    """The balance as GET billing/balance shows it (also the object of balance events)."""
    account = billing_account_get_or_create(organization=org)
    c = account.currency
    position = money_position(organization_id=org.pk)
    top_up_min, top_up_max = top_up_limits(c)
    changeable = currency_lock_reason(organization_id=org.pk) is None
    past_due = (
        invoice_past_due(organization_id=org.pk) if account.mode == BillingMode.POSTPAID else None
    )
    return {
        "currency": c,
        "currency_changeable": changeable,
        "currency_choices": currency_choices(account=account) if changeable else [c],
        "balance": money_text(position.balance, c),
        "accrued": money_text(position.accrued, c),
        "held": money_text(position.held, c),
        "available": money_text(position.available, c),
        "mode": account.mode,
        "funding_state": account.funding_state,
        "grace_until": account.grace_until,
        "auto_recharge_enabled": account.auto_recharge_enabled,
        "recharge_threshold": money_text(account.recharge_threshold_minor, c),
        "recharge_amount": money_text(account.recharge_amount_minor, c),
        "monthly_spend_limit": money_text(account.monthly_spend_limit_minor, c),
        "spent_this_month": money_text(
            spend_minor(organization=org, since=month_start(timezone.now())), c
        ),
        "default_payment_method": account.default_payment_method_id,
        "top_up_min": str(top_up_min),
        "top_up_max": str(top_up_max),
        "invoice_past_due": past_due,
        "bookings_refused_from": past_due.bookings_refused_from if past_due else None,
    }


class TopUpOutput(Serializer):
    id = serializers.CharField(source="public_id", help_text="tu_…")
    amount = MoneyField(source="amount_minor")
    currency = serializers.CharField()
    automatic = serializers.BooleanField()
    status = serializers.ChoiceField(choices=TopUpStatus.choices)
    failure_reason = serializers.CharField()
    created_at = serializers.DateTimeField()
