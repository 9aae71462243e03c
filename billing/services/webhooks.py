"""Stripe webhooks: verify, store once, process in a task.

webhook_receive runs in the request: it verifies the signature (nothing is stored if it is
bad), inserts the event keyed by Stripe's event id (a replay finds the row and is not queued
again) and queues processing on commit. webhook_event_process runs in the task; it locks the
row, skips it if already processed, and applies the event to our records. Every handler is
itself idempotent (ledger keys, status checks), so even a forced re-run does no harm.

A refund's status is applied from Stripe's current state of it, read back before the event is
applied, never from the event's payload (a late delivery may carry a status long gone). A card
dispute is applied from what Stripe has done with its money (withdrawn, reinstated): facts
that, once true, stay true, so a repeated or late delivery adds nothing and needs no read.
An invoice is mirrored in Stripe's order of its stages (a late event never moves it back); its
first failure to be paid (payment failed, overdue, uncollectible) is recorded once, with an
event and a notice, and blocks the organisation's bookings after a grace until it is paid.
"""

import json
import logging
from datetime import UTC, datetime
from functools import partial

import stripe
from django.db import transaction
from django.utils import timezone

from billing.models import (
    BillingAccount,
    Invoice,
    Refund,
    RefundStatus,
    TopUp,
    WebhookEvent,
)
from billing.money import from_minor_units
from billing.services.events import invoice_event_record
from billing.services.notices import notice_send
from billing.services.payment_methods import payment_method_mark_detached, payment_method_mirror
from billing.services.refunds import (
    refund_mark_failed,
    refund_mark_succeeded,
    refund_record_from_stripe,
    top_up_dispute_settle,
)
from billing.services.top_up_payments import top_up_credit
from billing.services.topups import top_up_fail
from billing.stripe_gateway import get_gateway
from config.celery import task_enqueue
from config.errors import NotFound
from marketplace.models import EventType

__all__ = ["InvalidSignature", "webhook_receive", "webhook_event_process"]

logger = logging.getLogger(__name__)
PROCESS_TASK = "billing.tasks.webhook_process"


class InvalidSignature(Exception):
    pass


def webhook_receive(*, payload: bytes, signature: str, secret: str) -> tuple[WebhookEvent, bool]:
    """Verify and store one delivery. Returns (event, created)."""
    if not secret:
        raise InvalidSignature("STRIPE_WEBHOOK_SECRET is not set")
    try:
        # Verification is local (HMAC over the raw body with our endpoint secret).
        event = stripe.Webhook.construct_event(payload, signature, secret).to_dict()
    except (stripe.SignatureVerificationError, ValueError, json.JSONDecodeError) as exc:
        raise InvalidSignature(str(exc)) from exc
    with transaction.atomic():
        row, created = WebhookEvent.objects.get_or_create(
            stripe_event_id=event["id"],
            defaults={"type": event.get("type", ""), "payload": event},
        )
        if created:
            transaction.on_commit(lambda: _queue(row.pk))
    return row, created


def _queue(event_id: int) -> None:
    try:
        task_enqueue(PROCESS_TASK, [event_id])
    except Exception:  # noqa: BLE001 — the stored event is picked up by the sweeper
        logger.warning("could not queue webhook event %s; the sweeper will process it", event_id)


def webhook_event_process(*, event_id: int) -> bool:
    """Apply one stored event. Returns True if this call processed it.

    What an event needs from Stripe beyond its payload (a charge's refunds, a SetupIntent's
    card) is fetched first, with no transaction open; the event is then applied under its
    row lock in one short transaction that calls nobody.
    """
    row = WebhookEvent.objects.filter(pk=event_id).first()
    if row is None or row.processed_at is not None:
        return False
    obj = (row.payload.get("data") or {}).get("object") or {}
    fetch = _FETCHERS.get(row.type)
    if fetch is not None:
        try:
            obj = fetch(obj)
        except Exception as exc:  # noqa: BLE001 — recorded on the event; the sweeper retries it
            logger.warning(
                "webhook event %s (%s): fetch failed: %s", row.stripe_event_id, row.type, exc
            )
            WebhookEvent.objects.filter(pk=event_id, processed_at__isnull=True).update(
                error=f"{type(exc).__name__}: {exc}"[:2000]
            )
            return False
    return _webhook_event_apply(event_id=event_id, obj=obj)


@transaction.atomic
def _webhook_event_apply(*, event_id: int, obj: dict) -> bool:
    row = WebhookEvent.objects.select_for_update(skip_locked=True).filter(pk=event_id).first()
    if row is None or row.processed_at is not None:
        return False
    handler = _HANDLERS.get(row.type)
    if handler is not None:
        try:
            with transaction.atomic():
                if handler is _invoice_mirror:
                    # Which event, and when Stripe sent it (since when an invoice is past due).
                    handler(obj, event_type=row.type, event_at=_ts(row.payload.get("created")))
                else:
                    handler(obj)
        except Exception as exc:  # noqa: BLE001 — recorded on the event; the sweeper retries it
            logger.exception("webhook event %s (%s) failed", row.stripe_event_id, row.type)
            row.error = f"{type(exc).__name__}: {exc}"[:2000]
            row.save(update_fields=["error"])
            return False
    row.processed_at = timezone.now()
    row.error = ""
    row.save(update_fields=["processed_at", "error"])
    return True


def _top_up_for(pi: dict) -> TopUp | None:
    top_up_id = (pi.get("metadata") or {}).get("top_up")
    if top_up_id and str(top_up_id).isdigit():
        return TopUp.objects.filter(pk=int(top_up_id)).first()
    return (
        TopUp.objects.filter(stripe_payment_intent_id=pi.get("id", "")).first()
        if pi.get("id")
        else None
    )


def _top_up_paid_by(pi: dict) -> TopUp | None:
    """The top-up this PaymentIntent pays, only if it is the payment that top-up asked for: its
    amount, currency and customer, and no other PaymentIntent recorded for it. Metadata alone
    names a top-up, so a payment made otherwise on the same Stripe account (another
    environment, the Dashboard, a script) must not credit or fail one; such a mismatch is
    logged and left for billing_reconcile."""
    top_up = _top_up_for(pi)
    if top_up is None:
        return None
    amount = pi.get("amount_received") or pi.get("amount")
    customer = _id(pi.get("customer"))
    account_customer = (
        BillingAccount.objects.filter(organization_id=top_up.organization_id)
        .values_list("stripe_customer_id", flat=True)
        .first()
    )
    problems = [
        name
        for name, wrong in (
            ("amount", amount != top_up.amount_minor),
            ("currency", str(pi.get("currency") or "").lower() != top_up.currency),
            ("customer", bool(customer) and customer != account_customer),
            (
                "payment intent",
                bool(top_up.stripe_payment_intent_id)
                and top_up.stripe_payment_intent_id != pi.get("id"),
            ),
        )
        if wrong
    ]
    if problems:
        logger.error(
            "stripe webhook: %s names top-up %s but its %s differ; nothing applied",
            pi.get("id"),
            top_up.pk,
            ", ".join(problems),
        )
        return None
    return top_up


def _payment_intent_succeeded(pi: dict) -> None:
    top_up = _top_up_paid_by(pi)
    if top_up is not None:
        top_up_credit(top_up_id=top_up.pk, payment_intent_id=pi["id"])


def _payment_intent_failed(pi: dict) -> None:
    top_up = _top_up_paid_by(pi)
    if top_up is not None:
        error = pi.get("last_payment_error") or {}
        reason = error.get("message") or error.get("code") or "payment failed"
        top_up_fail(top_up_id=top_up.pk, reason=reason, payment_intent_id=pi["id"])


def _id(value) -> str:
    """An id Stripe gives as a string, or as the object when expanded."""
    return (value.get("id") if isinstance(value, dict) else value) or ""


def _top_up_of_payment_intent(payment_intent) -> TopUp | None:
    pi_id = _id(payment_intent)
    return _top_up_for({"id": pi_id}) if pi_id else None


def _refund_changed(refund: dict) -> None:
    """Apply Stripe's current state of a refund (as read by _refund_fetch)."""
    row = Refund.objects.filter(stripe_refund_id=refund.get("id", "")).first()
    if row is None:
        refund_id = (refund.get("metadata") or {}).get("refund")
        row = (
            Refund.objects.filter(pk=int(refund_id)).first()
            if str(refund_id or "").isdigit()
            else None
        )
    status = refund.get("status")
    if row is None:
        # Not one of ours: a refund of a top-up's charge made at Stripe (the Dashboard).
        top_up = _top_up_of_payment_intent(refund.get("payment_intent"))
        if top_up is None:
            return
        row, created = refund_record_from_stripe(
            top_up_id=top_up.pk,
            stripe_refund_id=refund["id"],
            amount_minor=int(refund.get("amount") or 0),
            currency=refund.get("currency") or "",
            status=status or "",
        )
        if created:
            return
    if status == "succeeded" and row.status != RefundStatus.SUCCEEDED:
        refund_mark_succeeded(refund_id=row.pk, stripe_refund_id=refund["id"])
    elif status in ("failed", "canceled"):
        refund_mark_failed(
            refund_id=row.pk,
            reason=refund.get("failure_reason") or status,
            stripe_refund_id=refund["id"],
        )


def _with_payment_intent(obj: dict) -> dict:
    """A refund or dispute with its charge's PaymentIntent (which names our top-up)."""
    if obj.get("payment_intent") or not obj.get("charge"):
        return obj
    charge = get_gateway().charge_retrieve(charge_id=_id(obj["charge"]))
    return {**obj, "payment_intent": charge.get("payment_intent") or ""}


def _refund_fetch(refund: dict) -> dict:
    # Stripe's current state of the refund: the payload's may be older than what we applied.
    return _with_payment_intent(get_gateway().refund_retrieve(refund_id=refund["id"]))


def _charge_refunds_fetch(charge: dict) -> dict:
    # Stripe's current refunds of the charge, asked for through its PaymentIntent (the current
    # API no longer embeds them, and embedded ones would be as old as the event).
    pi_id = _id(charge.get("payment_intent"))
    if not pi_id:
        return {**charge, "refunds": {"data": []}}  # not a PaymentIntent's: no top-up of ours
    refunds = get_gateway().refunds_for_payment_intent(payment_intent_id=pi_id)
    return {
        **charge,
        "refunds": {"data": [{**r, "payment_intent": r.get("payment_intent") or pi_id}
                             for r in refunds]},
    }  # fmt: skip


def _charge_refunded(charge: dict) -> None:
    for refund in (charge.get("refunds") or {}).get("data") or []:
        _refund_changed(refund)


def _dispute_changed(dispute: dict, *, withdrawn: bool = False, reinstated: bool = False) -> None:
    """Apply what Stripe has done with a disputed top-up's money. The event type says it
    (funds_withdrawn, funds_reinstated), and so do the dispute's balance transactions (a
    withdrawal is negative, a reinstatement positive) and a lost dispute."""
    top_up = _top_up_of_payment_intent(dispute.get("payment_intent"))
    if top_up is None:
        logger.info("dispute %s is not of a top-up's charge; ignored", dispute.get("id"))
        return
    moves = [
        int(t.get("amount") or 0) for t in dispute.get("balance_transactions") or []
        if isinstance(t, dict)
    ]  # fmt: skip
    reinstated = reinstated or any(m > 0 for m in moves)
    withdrawn = withdrawn or any(m < 0 for m in moves) or dispute.get("status") == "lost"
    top_up_dispute_settle(
        top_up_id=top_up.pk,
        dispute_id=dispute["id"],
        amount_minor=int(dispute.get("amount") or 0),
        currency=dispute.get("currency") or "",
        withdrawn=withdrawn,
        reinstated=reinstated,
        reason=dispute.get("reason") or "",
        status=dispute.get("status") or "",
    )


def _org_for_customer(customer_id: str):
    account = (
        BillingAccount.objects.filter(stripe_customer_id=customer_id)
        .select_related("organization")
        .first()
    )
    return account.organization if account else None


def _payment_method_attached(pm: dict) -> None:
    organization = _org_for_customer(pm.get("customer") or "")
    if organization is not None:
        _mirror_quietly(organization, pm)


def _payment_method_detached(pm: dict) -> None:
    payment_method_mark_detached(stripe_payment_method_id=pm.get("id", ""))


def _setup_intent_card_fetch(intent: dict) -> dict:
    # The card is usable once attached; Stripe attaches it when the SetupIntent has a
    # customer, and announces it with payment_method.attached. We only need its details.
    pm_id = intent.get("payment_method")
    if not pm_id or not intent.get("customer") or not _org_for_customer(intent["customer"]):
        return intent
    return {
        **intent,
        "payment_method": get_gateway().payment_method_retrieve(payment_method_id=pm_id),
    }


def _setup_intent_succeeded(intent: dict) -> None:
    organization = _org_for_customer(intent.get("customer") or "")
    pm = intent.get("payment_method")
    if organization is None or not isinstance(pm, dict):
        return
    if pm.get("customer") == intent.get("customer"):
        _mirror_quietly(organization, pm)


def _mirror_quietly(organization, pm: dict) -> None:
    try:
        with transaction.atomic():
            payment_method_mirror(organization=organization, stripe_payment_method=pm)
    except NotFound:
        # Stored for another organisation: a card never moves (and the event is done).
        logger.warning("payment method %s belongs to another organisation", pm.get("id"))


def _ts(value):
    return datetime.fromtimestamp(int(value), tz=UTC) if value else None


# An invoice reaching one of these statuses is an event for its organisation (once: a
# repeated or late Stripe event finds the status already there).
_INVOICE_STATUS_EVENTS = {"open": EventType.INVOICE_FINALIZED, "paid": EventType.INVOICE_PAID}


# How far along an invoice is: Stripe may deliver its events out of order, and a late
# invoice.finalized (open) must not undo an invoice.paid. Paid and void are final;
# uncollectible may still be paid.
_INVOICE_STAGE = {"draft": 0, "open": 1, "uncollectible": 2, "paid": 3, "void": 3}


# Stripe's word that an unpaid invoice is past due: a payment attempt failed (the invoice
# stays open while Stripe retries), or it passed its due date (sent for payment by e-mail).
# An invoice marked uncollectible is past due whatever the event.
_INVOICE_PAST_DUE_EVENTS = {
    "invoice.payment_failed": "its payment failed",
    "invoice.overdue": "it is overdue",
}


def _invoice_mirror(
    invoice: dict, *, event_type: str = "", event_at: datetime | None = None
) -> None:
    organization = _org_for_customer(invoice.get("customer") or "")
    before, failed_before = (
        Invoice.objects.select_for_update()
        .filter(stripe_invoice_id=invoice["id"])
        .values_list("status", "payment_failed_at")
        .first()
    ) or (None, None)
    status = invoice.get("status") or ""
    if before is not None and _INVOICE_STAGE.get(status, 0) < _INVOICE_STAGE.get(before, 0):
        logger.info("invoice %s: %s after %s ignored (out of order)", invoice["id"], status, before)
        return
    if before in ("paid", "void") and status != before:
        return  # final: nothing moves it
    if status == "uncollectible":
        cause = "it was marked uncollectible"
    elif status == "open":
        cause = _INVOICE_PAST_DUE_EVENTS.get(event_type)
    else:
        cause = None  # a late failure of an invoice paid or void since is no failure
    failed_at = failed_before
    if cause:
        # Since the first failure Stripe reported (a later one, or a late delivery of an
        # earlier one, moves it no later); kept as history once paid or void.
        now = timezone.now()
        at = min(event_at or now, now)
        failed_at = min(failed_before, at) if failed_before else at
    mirrored, _ = Invoice.objects.update_or_create(
        stripe_invoice_id=invoice["id"],
        defaults={
            "organization": organization,
            "stripe_customer_id": invoice.get("customer") or "",
            "status": invoice.get("status") or "",
            "currency": invoice.get("currency") or "",
            "amount_due_minor": int(invoice.get("amount_due") or 0),
            "amount_paid_minor": int(invoice.get("amount_paid") or 0),
            "hosted_invoice_url": invoice.get("hosted_invoice_url") or "",
            "period_start": _ts(invoice.get("period_start")),
            "period_end": _ts(invoice.get("period_end")),
            "payment_failed_at": failed_at,
        },
    )
    if not mirrored.organization_id:
        return
    status_event = _INVOICE_STATUS_EVENTS.get(mirrored.status)
    if status_event and mirrored.status != before:
        invoice_event_record(invoice=mirrored, type=status_event)
    if cause and failed_before is None:
        # Once per invoice, however many attempts fail or deliveries repeat.
        invoice_event_record(invoice=mirrored, type=EventType.INVOICE_PAYMENT_FAILED)
        _invoice_past_due_notice(mirrored, cause=cause)


def _invoice_past_due_notice(invoice: Invoice, *, cause: str) -> None:
    owed = from_minor_units(invoice.amount_due_minor - invoice.amount_paid_minor, invoice.currency)
    period = (
        f", for {invoice.period_start:%Y-%m-%d} to {invoice.period_end:%Y-%m-%d}"
        if invoice.period_start and invoice.period_end
        else ""
    )
    pay = (
        f"Pay it at {invoice.hosted_invoice_url}"
        if invoice.hosted_invoice_url
        else "Pay it from the invoice Stripe sent you"
    )
    refused_from = invoice.bookings_refused_from
    when = (
        f"If it is still unpaid at {refused_from:%Y-%m-%d %H:%M} UTC, new reservations and "
        "extensions will be refused until it is paid"
        if refused_from > timezone.now()
        else "New reservations and extensions are refused until it is paid"
    )
    notice_send(
        organization=invoice.organization,
        kind="invoice_past_due",
        message=f"Invoice {invoice.stripe_invoice_id} ({owed} {invoice.currency.upper()} due"
        f"{period}) is past due: {cause}. {pay}. {when}; running reservations keep running.",
    )


# Stripe reads an event needs before it is applied (made outside any transaction).
_FETCHERS = {
    "charge.refunded": _charge_refunds_fetch,
    "refund.created": _refund_fetch,
    "refund.updated": _refund_fetch,
    "charge.refund.updated": _refund_fetch,
    "charge.dispute.created": _with_payment_intent,
    "charge.dispute.funds_withdrawn": _with_payment_intent,
    "charge.dispute.funds_reinstated": _with_payment_intent,
    "charge.dispute.closed": _with_payment_intent,
    "setup_intent.succeeded": _setup_intent_card_fetch,
}

_HANDLERS = {
    "payment_intent.succeeded": _payment_intent_succeeded,
    "payment_intent.payment_failed": _payment_intent_failed,
    "charge.refunded": _charge_refunded,
    "refund.created": _refund_changed,
    "refund.updated": _refund_changed,
    "charge.refund.updated": _refund_changed,
    "charge.dispute.created": _dispute_changed,
    "charge.dispute.funds_withdrawn": partial(_dispute_changed, withdrawn=True),
    "charge.dispute.funds_reinstated": partial(_dispute_changed, reinstated=True),
    "charge.dispute.closed": _dispute_changed,
    "payment_method.attached": _payment_method_attached,
    "payment_method.detached": _payment_method_detached,
    "setup_intent.succeeded": _setup_intent_succeeded,
    "invoice.created": _invoice_mirror,
    "invoice.finalized": _invoice_mirror,
    "invoice.paid": _invoice_mirror,
    "invoice.payment_failed": _invoice_mirror,
    "invoice.payment_succeeded": _invoice_mirror,
    "invoice.updated": _invoice_mirror,
    "invoice.voided": _invoice_mirror,
    "invoice.overdue": _invoice_mirror,
    "invoice.marked_uncollectible": _invoice_mirror,
}
