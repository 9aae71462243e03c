"""Refunds to the card through Stripe's Refunds API (via the outbox), and their ledger lines.

A refund takes money out of the prepaid balance and pays it back on the card of one
successful top-up. Only what is available can be refunded (the balance less accrued usage and
open holds, money_position), decided under the billing account's lock as the funding gate
decides. The ledger line (kind=refund, negative, key "refund:<id>") is written when the refund
is requested, so the balance cannot be spent twice while Stripe works; if Stripe refuses it, a
reversing adjustment ("refund_reversal:<id>") puts the money back.

Stripe is the truth, read back from Stripe by the webhook processor before it is applied (never
taken from an event's payload): the refund's lines always net to −amount while it is pending or
succeeded and to 0 once failed. Stripe's failure of a refund is final (Stripe never moves a
refund from failed to succeeded), so a success read before it and applied after it moves
nothing. Only a failure of our own (the request to Stripe gave up) can be followed by a success:
the refund was made after all, and the money is taken again ("refund_reinstated:<id>:<n>"); a
failure after that returns it again ("refund_reversal:<id>:<n>"), each once (the refund's row
lock and the keys).

A refund made at Stripe but not through Switchyard (in the Dashboard) is recorded as if staff had
made it (refund_record_from_stripe): a refund row with Stripe's id and its refund line, once per
Stripe refund (under the top-up's row lock), with no check of what is available: the money has
left already, so the balance goes negative if it must.

A card dispute (top_up_dispute_settle): when Stripe withdraws a disputed top-up's money, the
balance loses it (an adjustment, "dispute:<dispute id>:withdrawn"); when the dispute is won and
Stripe reinstates the funds, it is given back ("dispute:<dispute id>:reinstated"). Each happens
once per dispute, and a reinstatement implies the withdrawal, so events repeated or in any
order leave the lines at what Stripe did. Every line from Stripe's side is a billing notice to
the owners and an audit entry (actor "stripe"), and the funding rules follow the new balance.
"""

import logging
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q, Sum
from django.db.models.functions import Coalesce

from billing.models import (
    BillingAccount,
    LedgerEntry,
    LedgerKind,
    OutboxMessage,
    Refund,
    RefundStatus,
    TopUp,
    TopUpStatus,
)
from billing.money import from_minor_units, to_minor_units_asked
from billing.selectors import balance_minor
from billing.services.funding import billing_account_lock, funding_state_update
from billing.services.holds import money_position
from billing.services.ledger import ledger_entry_add
from billing.services.notices import notice_send
from billing.services.outbox import OutboxHandler, outbox_enqueue, outbox_handler
from billing.stripe_gateway import StripeGateway
from config.errors import Conflict, ValidationFailed
from marketplace.services.audit import audit_record

__all__ = [
    "refund_create",
    "refund_mark_succeeded",
    "refund_mark_failed",
    "refund_record_from_stripe",
    "top_up_dispute_settle",
]

logger = logging.getLogger(__name__)

# Who made what Stripe did on its own side (a Dashboard refund, a dispute), in the audit log.
STRIPE_ACTOR = "stripe"


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
    # 10.005 USD or 5.5 JPY is refused, not rounded into another amount than the one asked.
    amount_minor = to_minor_units_asked(amount, top_up.currency, field="amount")
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
    refund = _refund_write(
        top_up=top_up, amount_minor=amount_minor, reason=reason, created_by=created_by
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
        changes={
            "after": {
                # As refunded, in the currency's decimals, not as typed.
                "refund": str(from_minor_units(amount_minor, top_up.currency)),
                "currency": top_up.currency,
                "reason": reason,
            }
        },
    )
    return refund


def _refund_write(
    *,
    top_up: TopUp,
    amount_minor: int,
    reason: str,
    created_by: AbstractBaseUser | None = None,
    status: str = RefundStatus.PENDING,
    stripe_refund_id: str = "",
    stripe_failure: str = "",
) -> Refund:
    """The refund row and its line (the money leaves the balance when the refund is asked for;
    a refund already failed has none). Called under the top-up's and the account's locks."""
    refund = Refund.objects.create(
        organization=top_up.organization,
        top_up=top_up,
        amount_minor=amount_minor,
        currency=top_up.currency,
        reason=reason,
        status=status,
        stripe_refund_id=stripe_refund_id,
        failure_reason=stripe_failure,
        created_by=created_by,
    )
    if status == RefundStatus.FAILED:
        return refund
    ledger_entry_add(
        organization=top_up.organization,
        kind=LedgerKind.REFUND,
        amount_minor=-amount_minor,
        currency=top_up.currency,
        idempotency_key=f"refund:{refund.pk}",
        description=f"Refund to card: {reason}",
        created_by=created_by,
    )
    return refund


# Stripe's refund statuses as ours (pending and requires_action: on its way).
_STRIPE_REFUND_STATUS = {
    "succeeded": RefundStatus.SUCCEEDED,
    "failed": RefundStatus.FAILED,
    "canceled": RefundStatus.FAILED,
}


@transaction.atomic
def refund_record_from_stripe(
    *, top_up_id: int, stripe_refund_id: str, amount_minor: int, currency: str, status: str
) -> tuple[Refund, bool]:
    """Record a refund of a top-up's charge that was made at Stripe, not through Switchyard,
    as if staff had made it; (refund, created). `status` is Stripe's. The refund already
    recorded with that Stripe id comes back instead (created = False): once per Stripe refund.
    One Stripe has failed already is recorded failed, with no line, so an older read of it
    applied later finds Stripe's failure (final) rather than nothing."""
    top_up = TopUp.objects.select_for_update().get(pk=top_up_id)
    existing = Refund.objects.filter(stripe_refund_id=stripe_refund_id).first()
    if existing is not None:
        return existing, False
    if currency.lower() != top_up.currency.lower() or amount_minor <= 0:
        raise ValueError(
            f"refund {stripe_refund_id} of {amount_minor} {currency} does not fit top-up "
            f"{top_up.pk} ({top_up.amount_minor} {top_up.currency})"
        )
    our_status = _STRIPE_REFUND_STATUS.get(status, RefundStatus.PENDING)
    # The account's lock, as every change of its available money takes. No check of what is
    # available: the money has left through the card already.
    billing_account_lock(top_up.organization_id)
    refund = _refund_write(
        top_up=top_up,
        amount_minor=amount_minor,
        reason="Refunded at Stripe, not through Switchyard",
        status=our_status,
        stripe_refund_id=stripe_refund_id,
        stripe_failure=status if our_status == RefundStatus.FAILED else "",
    )
    if our_status == RefundStatus.FAILED:
        return refund, True
    c = top_up.currency
    audit_record(
        organization_id=top_up.organization_id,
        action="refund.create",
        object_type="top_up",
        object_id=top_up.public_id,
        changes={"after": {"refund": str(from_minor_units(amount_minor, c)), "currency": c,
                           "reason": refund.reason, "stripe_refund": stripe_refund_id}},
        actor=STRIPE_ACTOR,
    )  # fmt: skip
    notice_send(
        organization=top_up.organization,
        kind="refund",
        message=f"{_money(amount_minor, c)} of your top-up {top_up.public_id} was refunded to "
        f"your card (Stripe refund {stripe_refund_id}) and taken from your balance, which is now "
        f"{_money(balance_minor(organization=top_up.organization), c)}.",
    )
    funding_state_update(organization=top_up.organization)
    return refund, True


@transaction.atomic
def refund_mark_succeeded(*, refund_id: int, stripe_refund_id: str) -> None:
    refund = Refund.objects.select_for_update().get(pk=refund_id)
    if refund.status == RefundStatus.SUCCEEDED:
        return
    if refund.status == RefundStatus.FAILED and refund.stripe_refund_id:
        # Stripe failed this refund, and a failed refund stays failed: the success is an older
        # read of it. (A failure without Stripe's id was our request giving up.)
        logger.info("refund %s: success after Stripe's failure ignored (stale)", refund.pk)
        return
    refund.status = RefundStatus.SUCCEEDED
    refund.stripe_refund_id = stripe_refund_id
    refund.save(update_fields=["status", "stripe_refund_id"])
    _refund_lines_settle(
        refund, description=f"Refund {refund.pk} succeeded at Stripe after all; paid to the card"
    )


@transaction.atomic
def refund_mark_failed(*, refund_id: int, reason: str, stripe_refund_id: str = "") -> None:
    """The refund failed: at Stripe (`stripe_refund_id`, Stripe's word, final) or in our request
    to Stripe (none: Stripe may still have made it, and a later success is applied)."""
    refund = Refund.objects.select_for_update().get(pk=refund_id)
    if refund.status == RefundStatus.FAILED:
        if stripe_refund_id and not refund.stripe_refund_id:
            refund.stripe_refund_id = stripe_refund_id
            refund.save(update_fields=["stripe_refund_id"])
        return
    refund.status = RefundStatus.FAILED
    refund.failure_reason = reason[:2000]
    refund.stripe_refund_id = stripe_refund_id or refund.stripe_refund_id
    refund.save(update_fields=["status", "failure_reason", "stripe_refund_id"])
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
    funding_state_update(organization=refund.organization)


@transaction.atomic
def top_up_dispute_settle(
    *,
    top_up_id: int,
    dispute_id: str,
    amount_minor: int,
    currency: str,
    withdrawn: bool,
    reinstated: bool,
    reason: str = "",
    status: str = "",
) -> list[LedgerEntry]:
    """Bring a disputed top-up's lines to what Stripe has done with the disputed money: taken
    off the balance once it was withdrawn, given back once it was reinstated (a reinstatement
    implies the withdrawal). Returns the lines this call wrote."""
    if not (withdrawn or reinstated):
        return []
    top_up = TopUp.objects.select_for_update().get(pk=top_up_id)
    if currency.lower() != top_up.currency.lower() or not 0 < amount_minor <= top_up.amount_minor:
        raise ValueError(
            f"dispute {dispute_id} of {amount_minor} {currency} does not fit top-up "
            f"{top_up.pk} ({top_up.amount_minor} {top_up.currency})"
        )
    billing_account_lock(top_up.organization_id)
    c, money = top_up.currency, _money(amount_minor, top_up.currency)
    steps = [("withdrawn", -amount_minor, f"Card payment disputed ({reason or 'no reason'}): "
              f"funds withdrawn by Stripe (dispute {dispute_id}, top-up {top_up.public_id})")]  # fmt: skip
    if reinstated:
        steps.append(("reinstated", amount_minor, f"Dispute {dispute_id} won: funds reinstated "
                      f"by Stripe (top-up {top_up.public_id})"))  # fmt: skip
    written = []
    for step, signed_minor, description in steps:
        entry, created = ledger_entry_add(
            organization=top_up.organization,
            kind=LedgerKind.ADJUSTMENT,
            amount_minor=signed_minor,
            currency=c,
            idempotency_key=f"dispute:{dispute_id}:{step}",
            description=description,
        )
        if not created:
            continue
        written.append(entry)
        audit_record(
            organization_id=top_up.organization_id,
            action=f"dispute.funds_{step}",
            object_type="top_up",
            object_id=top_up.public_id,
            changes={"after": {"dispute": dispute_id, "amount": str(from_minor_units(amount_minor, c)),
                               "currency": c, "reason": reason, "status": status}},
            actor=STRIPE_ACTOR,
        )  # fmt: skip
    if not written:
        return []
    balance = _money(balance_minor(organization=top_up.organization), c)
    took, gave = any(e.amount_minor < 0 for e in written), any(e.amount_minor > 0 for e in written)
    if took and gave:  # both learnt at once (the reinstatement's event came first)
        kind = "dispute_funds_reinstated"
        message = (f"Your card payment for top-up {top_up.public_id} ({money}) was disputed and "
                   f"the dispute decided for us: your balance ({balance}) is unchanged.")  # fmt: skip
    elif gave:
        kind = "dispute_funds_reinstated"
        message = (f"The dispute of your card payment for top-up {top_up.public_id} was decided "
                   f"for us: {money} is back on your balance, which is now {balance}.")  # fmt: skip
    else:
        kind = "dispute_funds_withdrawn"
        message = (f"Your card payment for top-up {top_up.public_id} was disputed "
                   f"({reason or 'no reason given'}), and the card issuer took the {money} back: "
                   f"it is taken from your balance, which is now {balance}.")  # fmt: skip
        # The card disputes what it paid: it is not charged again by itself (the funding
        # update below would start an automatic recharge on a balance gone short).
        stopped = BillingAccount.objects.filter(
            organization_id=top_up.organization_id, auto_recharge_enabled=True
        ).update(auto_recharge_enabled=False)
        if stopped:
            message += " Automatic recharge is turned off; turn it on again in Billing."
            audit_record(
                organization_id=top_up.organization_id,
                action="billing_settings.update",
                object_type="billing_account",
                object_id=top_up.organization.public_id,
                changes={"after": {"auto_recharge_enabled": False}, "reason": "card dispute"},
                actor=STRIPE_ACTOR,
            )
    notice_send(organization=top_up.organization, kind=kind, message=message)
    funding_state_update(organization=top_up.organization)
    return written


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
            refund_mark_failed(
                refund_id=refund_id,
                reason=result.get("failure_reason") or "failed",
                stripe_refund_id=result["id"],
            )
        elif result.get("status") == "succeeded":
            refund_mark_succeeded(refund_id=refund_id, stripe_refund_id=result["id"])
        else:
            Refund.objects.filter(pk=refund_id).update(stripe_refund_id=result["id"])

    def failed(self, message: OutboxMessage, error: str) -> None:
        refund_mark_failed(refund_id=message.payload["refund_id"], reason=error)
