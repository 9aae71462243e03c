"""Refunds to the card through Stripe's Refunds API (via the outbox), and their ledger lines.

A refund takes money out of the prepaid balance and pays it back on the card of one
successful top-up. Only what is available can be refunded (the balance less accrued usage and
open holds, money_position), decided under the billing account's lock as the funding gate
decides. The ledger line (kind=refund, negative, key "refund:<id>") is written when the refund
is requested, so the balance cannot be spent twice while Stripe works; if Stripe refuses it, a
reversing adjustment ("refund_reversal:<id>") puts the money back.

Stripe is the truth, and its word may change or arrive out of order: the refund's lines always
net to −amount while it is pending or succeeded and to 0 once failed. A success after a failure
takes the money again ("refund_reinstated:<id>:<n>"), a failure after that returns it again
("refund_reversal:<id>:<n>"), each once (the refund's row lock and the keys).
"""

from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q, Sum
from django.db.models.functions import Coalesce

from billing.models import (
    LedgerEntry,
    LedgerKind,
    OutboxMessage,
    Refund,
    RefundStatus,
    TopUp,
    TopUpStatus,
)
from billing.money import from_minor_units, to_minor_units
from billing.services.funding import billing_account_lock
from billing.services.holds import money_position
from billing.services.ledger import ledger_entry_add
from billing.services.outbox import OutboxHandler, outbox_enqueue, outbox_handler
from billing.stripe_gateway import StripeGateway
from config.errors import Conflict, ValidationFailed
from marketplace.services.audit import audit_record

__all__ = ["refund_create", "refund_mark_succeeded", "refund_mark_failed"]


@transaction.atomic
def refund_create(
    *, top_up: TopUp, amount: Decimal, reason: str, created_by: AbstractBaseUser | None = None
) -> Refund:
    if isinstance(amount, float):
        raise TypeError("amount must be Decimal, not float")
    if not reason.strip():
        raise ValidationFailed("A refund needs a reason.", field="reason")
    top_up = TopUp.objects.select_for_update().get(pk=top_up.pk)
    if top_up.status != TopUpStatus.SUCCEEDED:
        raise Conflict("Only a successful top-up can be refunded.", code="not_refundable")
    amount_minor = to_minor_units(amount, top_up.currency)
    already = top_up.refunds.exclude(status=RefundStatus.FAILED).aggregate(
        total=Coalesce(Sum("amount_minor"), 0)
    )["total"]
    if amount_minor <= 0 or already + amount_minor > top_up.amount_minor:
        raise ValidationFailed(
            f"At most {from_minor_units(top_up.amount_minor - already, top_up.currency)} "
            "of this top-up can still be refunded.",
            code="amount_out_of_range",
            field="amount",
        )
    # Under the account lock, as the gate: a booking or another refund decided at the same
    # time counts this one, and money held for bookings is not paid out.
    billing_account_lock(top_up.organization_id)
    position = money_position(organization_id=top_up.organization_id)
    if position.available < amount_minor:
        c = top_up.currency
        raise Conflict(
            f"At most {_money(max(position.available, 0), c)} can be refunded now: the balance "
            f"is {_money(position.balance, c)}, of which "
            f"{_money(position.accrued + position.held, c)} is used or held for bookings; "
            f"the refund is {_money(amount_minor, c)}.",
            code="insufficient_balance",
            field="amount",
        )
    refund = Refund.objects.create(
        organization=top_up.organization,
        top_up=top_up,
        amount_minor=amount_minor,
        currency=top_up.currency,
        reason=reason,
        created_by=created_by,
    )
    ledger_entry_add(
        organization=top_up.organization,
        kind=LedgerKind.REFUND,
        amount_minor=-amount_minor,
        currency=top_up.currency,
        idempotency_key=f"refund:{refund.pk}",
        description=f"Refund to card: {reason}",
        created_by=created_by,
    )
    outbox_enqueue(
        kind="refund.create",
        payload={"refund_id": refund.pk},
        idempotency_key=f"refund:{refund.pk}",
    )
    audit_record(
        organization_id=top_up.organization_id,
        action="refund.create",
        object_type="top_up",
        object_id=top_up.public_id,
        changes={"after": {"refund": str(amount), "currency": top_up.currency, "reason": reason}},
    )
    return refund


@transaction.atomic
def refund_mark_succeeded(*, refund_id: int, stripe_refund_id: str) -> None:
    refund = Refund.objects.select_for_update().get(pk=refund_id)
    if refund.status == RefundStatus.SUCCEEDED:
        return
    refund.status = RefundStatus.SUCCEEDED
    refund.stripe_refund_id = stripe_refund_id
    refund.save(update_fields=["status", "stripe_refund_id"])
    _refund_lines_settle(
        refund, description=f"Refund {refund.pk} succeeded at Stripe after all; paid to the card"
    )


@transaction.atomic
def refund_mark_failed(*, refund_id: int, reason: str) -> None:
    refund = Refund.objects.select_for_update().get(pk=refund_id)
    if refund.status == RefundStatus.FAILED:
        return
    refund.status = RefundStatus.FAILED
    refund.failure_reason = reason[:2000]
    refund.save(update_fields=["status", "failure_reason"])
    _refund_lines_settle(
        refund,
        description=f"Refund {refund.pk} failed at Stripe ({reason}); amount returned to balance",
    )


def _refund_lines_settle(refund: Refund, *, description: str) -> None:
    """Write the line that brings the refund's ledger lines to what its status says: −amount
    while pending or succeeded, 0 once failed. Called under the refund's row lock."""
    lines = LedgerEntry.objects.filter(organization_id=refund.organization_id)
    reversals = lines.filter(
        Q(idempotency_key=f"refund_reversal:{refund.pk}")
        | Q(idempotency_key__startswith=f"refund_reversal:{refund.pk}:")
    ).count()
    reinstated = lines.filter(idempotency_key__startswith=f"refund_reinstated:{refund.pk}:").count()
    paid_out = 1 + reinstated - reversals  # times the amount is off the balance: 1 or 0
    if refund.status == RefundStatus.FAILED and paid_out == 1:
        kind, amount_minor = LedgerKind.ADJUSTMENT, refund.amount_minor
        key = f"refund_reversal:{refund.pk}" + (f":{reversals + 1}" if reversals else "")
    elif refund.status != RefundStatus.FAILED and paid_out == 0:
        kind, amount_minor = LedgerKind.REFUND, -refund.amount_minor
        key = f"refund_reinstated:{refund.pk}:{reinstated + 1}"
    else:
        return
    # The account's lock, as every change of its available money takes (funding's gate).
    billing_account_lock(refund.organization_id)
    ledger_entry_add(
        organization=refund.organization,
        kind=kind,
        amount_minor=amount_minor,
        currency=refund.currency,
        idempotency_key=key,
        description=description,
    )


def _money(amount_minor: int, currency: str) -> str:
    return f"{from_minor_units(amount_minor, currency)} {currency.upper()}"


@outbox_handler("refund.create")
class RefundCreate(OutboxHandler):
    def send(self, gateway: StripeGateway, message: OutboxMessage) -> dict:
        refund = Refund.objects.select_related("top_up").get(pk=message.payload["refund_id"])
        return gateway.refund_create(
            payment_intent_id=refund.top_up.stripe_payment_intent_id,
            amount=from_minor_units(refund.amount_minor, refund.currency),
            currency=refund.currency,
            metadata={"refund": str(refund.pk), "organization": refund.organization.public_id},
            idempotency_key=message.idempotency_key,
        )

    def succeeded(self, message: OutboxMessage, result: dict) -> None:
        refund_id = message.payload["refund_id"]
        if result.get("status") in ("failed", "canceled"):
            refund_mark_failed(refund_id=refund_id, reason=result.get("failure_reason") or "failed")
        elif result.get("status") == "succeeded":
            refund_mark_succeeded(refund_id=refund_id, stripe_refund_id=result["id"])
        else:
            Refund.objects.filter(pk=refund_id).update(stripe_refund_id=result["id"])

    def failed(self, message: OutboxMessage, error: str) -> None:
        refund_mark_failed(refund_id=message.payload["refund_id"], reason=error)
