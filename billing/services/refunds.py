"""Refunds to the card through Stripe's Refunds API (via the outbox), and their ledger lines.

A refund takes money out of the prepaid balance and pays it back on the card of one
successful top-up. The ledger line (kind=refund, negative, key "refund:<id>") is written when
the refund is requested, so the balance cannot be spent twice while Stripe works; if Stripe
refuses it, a reversing adjustment ("refund_reversal:<id>") puts the money back.
"""

from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Sum
from django.db.models.functions import Coalesce

from billing.models import LedgerKind, OutboxMessage, Refund, RefundStatus, TopUp, TopUpStatus
from billing.money import from_minor_units, to_minor_units
from billing.selectors import balance_minor
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
    if balance_minor(organization=top_up.organization) < amount_minor:
        raise Conflict("The balance is lower than the refund.", code="insufficient_balance")
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


@transaction.atomic
def refund_mark_failed(*, refund_id: int, reason: str) -> None:
    refund = Refund.objects.select_for_update().get(pk=refund_id)
    if refund.status == RefundStatus.FAILED:
        return
    refund.status = RefundStatus.FAILED
    refund.failure_reason = reason[:2000]
    refund.save(update_fields=["status", "failure_reason"])
    ledger_entry_add(
        organization=refund.organization,
        kind=LedgerKind.ADJUSTMENT,
        amount_minor=refund.amount_minor,
        currency=refund.currency,
        idempotency_key=f"refund_reversal:{refund.pk}",
        description=f"Refund {refund.pk} failed at Stripe ({reason}); amount returned to balance",
    )


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
