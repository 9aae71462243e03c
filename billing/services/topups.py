"""Prepaid top-ups: manual and automatic recharges as off-session PaymentIntents via the outbox.

A top-up adds to the balance once: the ledger entry's key is "top_up:<id>", written either from
the PaymentIntent's synchronous result or from the payment_intent.succeeded webhook, whichever
comes first. Automatic recharge fires once per drop below the threshold: the account's
recharge_armed flag is cleared when one starts and set again when the balance is back at or
above the threshold, and the database allows one pending automatic top-up per organisation.
"""

import logging
from decimal import Decimal

from django.db import IntegrityError, transaction
from django.utils import timezone

from billing.models import (
    BillingAccount,
    BillingMode,
    LedgerKind,
    PaymentMethod,
    TopUp,
    TopUpStatus,
)
from billing.money import (
    from_minor_units,
    to_minor_units,
    to_minor_units_asked,
    top_up_limits,
    top_up_range_text,
)
from billing.selectors import balance_minor
from billing.services.accounts import billing_account_get_or_create
from billing.services.events import top_up_events_record
from billing.services.holds import money_position
from billing.services.ledger import ledger_entry_add
from billing.services.notices import notice_send
from billing.services.outbox import outbox_enqueue
from config.errors import PaymentRequired, PermissionDenied, ValidationFailed
from marketplace.models import Organization
from marketplace.services.audit import audit_record
from marketplace.services.organizations import organization_active_check

__all__ = [
    "top_up_create",
    "top_up_succeed",
    "top_up_fail",
    "auto_recharge_check",
    "auto_recharge_for_reservation",
    "recharge_declined",
    "reservation_recharge_amount",
]

logger = logging.getLogger(__name__)


def _start_top_up(
    *, account: BillingAccount, amount_minor: int, automatic: bool, reason: str = ""
) -> TopUp:
    top_up = TopUp.objects.create(
        organization=account.organization,
        amount_minor=amount_minor,
        currency=account.currency,
        automatic=automatic,
        reason=reason,
        payment_method_id=account.default_payment_method_id,
    )
    outbox_enqueue(
        kind="payment_intent.create",
        payload={"top_up_id": top_up.pk},
        idempotency_key=f"top_up:{top_up.pk}",
    )
    return top_up


@transaction.atomic
def top_up_create(*, organization: Organization, amount: Decimal) -> TopUp:
    """Charge the default card off-session for `amount` (major units of the account's currency,
    within money.top_up_limits) and credit the balance."""
    if isinstance(amount, float):
        raise TypeError("amount must be Decimal, not float")
    billing_account_get_or_create(organization=organization)
    account = BillingAccount.objects.select_for_update().get(organization=organization)
    organization_active_check(organization_id=organization.pk)  # staff suspended it: no charge
    least, most = top_up_limits(account.currency)
    if not isinstance(amount, Decimal) or not (least <= amount <= most):
        raise ValidationFailed(
            f"A top-up is between {top_up_range_text(account.currency)}.",
            code="amount_out_of_range",
            field="amount",
        )
    amount_minor = to_minor_units_asked(amount, account.currency, field="amount")
    if not account.stripe_customer_id or not account.default_payment_method_id:
        raise PaymentRequired("Add a card before topping up.", code="no_payment_method")
    top_up = _start_top_up(account=account, amount_minor=amount_minor, automatic=False)
    audit_record(
        organization_id=organization.pk,
        action="top_up.create",
        object_type="top_up",
        object_id=top_up.public_id,
        # What is charged, in the currency's decimals ("1000.50"), not as typed ("1000.5000").
        changes={
            "after": {
                "amount": str(from_minor_units(amount_minor, account.currency)),
                "currency": account.currency,
            }
        },
    )
    return top_up


@transaction.atomic
def top_up_succeed(*, top_up_id: int, payment_intent_id: str) -> bool:
    """Credit a top-up once. Returns True if this call credited it."""
    top_up = TopUp.objects.select_for_update().filter(pk=top_up_id).first()
    if top_up is None or top_up.status == TopUpStatus.SUCCEEDED:
        return False
    top_up.status = TopUpStatus.SUCCEEDED
    top_up.stripe_payment_intent_id = payment_intent_id
    top_up.failure_reason = ""
    top_up.completed_at = timezone.now()
    top_up.save(
        update_fields=["status", "stripe_payment_intent_id", "failure_reason", "completed_at"]
    )
    ledger_entry_add(
        organization=top_up.organization,
        kind=LedgerKind.TOP_UP,
        amount_minor=top_up.amount_minor,
        currency=top_up.currency,
        idempotency_key=f"top_up:{top_up.pk}",
        description=("Automatic recharge" if top_up.automatic else "Top-up")
        + f" ({payment_intent_id})",
    )
    top_up_events_record(top_up=top_up, succeeded=True)
    _receipt_send(top_up)
    return True


def _receipt_send(top_up: TopUp) -> None:
    """Our own receipt for a top-up, e-mailed to the owners and billing members (a notice)."""
    c = top_up.currency
    what = f"automatic recharge ({top_up.reason})" if top_up.automatic else "top-up"
    notice_send(
        organization=top_up.organization,
        kind="receipt",
        message=f"Receipt: {_money(top_up.amount_minor, c)} charged to "
        f"{_card_words(top_up.payment_method_id)} on {top_up.completed_at:%Y-%m-%d %H:%M} UTC "
        f"for a {what}; "
        f"payment {top_up.stripe_payment_intent_id}, top-up {top_up.public_id}. Your balance is "
        f"now {_money(balance_minor(organization=top_up.organization), c)}.",
    )


@transaction.atomic
def top_up_fail(*, top_up_id: int, reason: str, payment_intent_id: str = "") -> bool:
    """Mark a pending top-up failed (no ledger entry). Returns True if this call failed it."""
    top_up = TopUp.objects.select_for_update().filter(pk=top_up_id).first()
    if top_up is None or top_up.status != TopUpStatus.PENDING:
        return False
    top_up.status = TopUpStatus.FAILED
    top_up.failure_reason = reason[:2000]
    if payment_intent_id:
        top_up.stripe_payment_intent_id = payment_intent_id
    top_up.completed_at = timezone.now()
    top_up.save(
        update_fields=["status", "failure_reason", "stripe_payment_intent_id", "completed_at"]
    )
    top_up_events_record(top_up=top_up, succeeded=False)
    notice_send(
        organization=top_up.organization,
        kind="top_up_failed",
        message=f"Your card was not charged for a top-up of {from_minor_units(top_up.amount_minor, top_up.currency)} "
        f"{top_up.currency.upper()}: {reason}",
    )
    return True


@transaction.atomic
def auto_recharge_check(*, organization: Organization) -> TopUp | None:
    """Start one automatic recharge if the prepaid balance is below the threshold (armed)."""
    account = BillingAccount.objects.select_for_update().filter(organization=organization).first()
    if account is None or account.mode != BillingMode.PREPAID:
        return None
    # What is left once accrued usage and holds are counted, as the funding rules read it.
    balance = money_position(organization_id=organization.pk).available
    if balance >= account.recharge_threshold_minor:
        if not account.recharge_armed:
            account.recharge_armed = True
            account.save(update_fields=["recharge_armed"])
        return None
    if not (account.auto_recharge_enabled and account.recharge_armed):
        return None
    # Recharge enough to get back over the threshold even after a deep drop, within the cap.
    amount_minor = min(
        max(account.recharge_amount_minor, account.recharge_threshold_minor - balance),
        _top_up_most_minor(account.currency),
    )
    c = account.currency
    top_up = _start_automatic(
        account=account,
        amount_minor=amount_minor,
        reason=f"your balance ({_money(balance, c)}) fell below your recharge threshold "
        f"({_money(account.recharge_threshold_minor, c)})",
    )
    if top_up is None:
        return None
    account.recharge_armed = False
    account.save(update_fields=["recharge_armed"])
    return top_up


def recharge_rearm_for_new_card(*, account: BillingAccount) -> bool:
    """Under the account's lock, once `account.default_payment_method_id` is a card just made
    the default: an automatic recharge the previous card declined left the account disarmed
    until its balance came back over the threshold, which it cannot do by itself; the new
    card re-arms it, so the next metering run charges it (if the balance is still below the
    threshold) instead of the account going on to grace and suspension with a working card
    saved. True if it re-armed."""
    if account.recharge_armed or not account.auto_recharge_enabled:
        return False
    last = (
        TopUp.objects.filter(organization_id=account.organization_id, automatic=True)
        .order_by("-id")
        .first()
    )
    if last is None or last.status != TopUpStatus.FAILED:
        return False  # one is still pending, or the last one went through
    if recharge_declined(account=account) is not None:
        return False  # the new default's own last charge failed too
    account.recharge_armed = True
    account.save(update_fields=["recharge_armed"])
    return True


def recharge_declined(*, account: BillingAccount) -> TopUp | None:
    """The last charge to the account's saved card, if it failed (declined, or needing the
    customer there): a refused booking does not start an automatic recharge on that card again
    (each retry of the booking would charge it, be declined and e-mail the owners) until a
    charge to it goes through or another card is made the default."""
    last = (
        TopUp.objects.filter(
            organization_id=account.organization_id,
            payment_method_id=account.default_payment_method_id,
        )
        .exclude(status=TopUpStatus.PENDING)
        .order_by("-id")
        .first()
    )
    return last if last is not None and last.status == TopUpStatus.FAILED else None


def reservation_recharge_amount(*, account: BillingAccount, shortfall_minor: int) -> int | None:
    """What an automatic recharge for a refused commitment would charge, in minor units: the
    shortfall plus the recharge threshold (so the booking does not leave the balance at once
    below it), at least the usual recharge amount. None when there would be none: automatic
    recharge off, no saved card, postpaid, the card's last charge failed (recharge_declined),
    or more than a top-up may be (the customer decides)."""
    if not (
        account.mode == BillingMode.PREPAID
        and account.auto_recharge_enabled
        and account.stripe_customer_id
        and account.default_payment_method_id
    ):
        return None
    if recharge_declined(account=account) is not None:
        return None
    amount_minor = max(
        account.recharge_amount_minor, shortfall_minor + account.recharge_threshold_minor
    )
    if amount_minor > _top_up_most_minor(account.currency):
        return None
    return amount_minor


@transaction.atomic
def auto_recharge_for_reservation(
    *, organization: Organization, needed_minor: int, amount_minor: int | None = None
) -> TopUp | None:
    """Start one automatic recharge of `amount_minor` (as the refusal stated it) so that what
    is available covers `needed_minor` (a commitment the funding gate refused).

    Runs in its own transaction (a task the gate sends), never in the refused reservation's,
    so the top-up and its charge are recorded whatever became of that reservation. Nothing
    happens if what is available already covers it, automatic recharge is no longer set up,
    or one is already on its way (the database allows one pending per organisation).
    """
    account = BillingAccount.objects.select_for_update().filter(organization=organization).first()
    if account is None:
        return None
    # What new commitments can use: balance − accrued usage − holds (billing.services.holds).
    available = money_position(organization_id=organization.pk).available
    if available >= needed_minor:
        return None
    stated = reservation_recharge_amount(account=account, shortfall_minor=needed_minor - available)
    if stated is None:
        return None
    c = account.currency
    return _start_automatic(
        account=account,
        amount_minor=amount_minor or stated,
        reason=f"a reservation needed {_money(needed_minor, c)} and {_money(available, c)} was "
        "available",
    )


def _top_up_most_minor(currency: str) -> int:
    return to_minor_units(top_up_limits(currency)[1], currency)


def _money(amount_minor: int, currency: str) -> str:
    return f"{from_minor_units(amount_minor, currency)} {currency.upper()}"


def _card_words(stripe_payment_method_id: str) -> str:
    """A saved card as its owner knows it ("your Visa ending 4242"), not Stripe's id."""
    card = PaymentMethod.objects.filter(stripe_payment_method_id=stripe_payment_method_id).first()
    if card is None or not card.last4:
        return "your saved card"
    return f"your {card.brand.title() or 'card'} ending {card.last4}"


def _start_automatic(*, account: BillingAccount, amount_minor: int, reason: str) -> TopUp | None:
    """Start an automatic recharge on the saved card and tell the owners why; None without a
    card, or while one is already on its way (one pending automatic top-up per organisation)."""
    if not (account.stripe_customer_id and account.default_payment_method_id):
        return None
    try:
        # Suspended by staff (a stolen card, say): its card is not charged, not even by itself.
        organization_active_check(organization_id=account.organization_id)
    except PermissionDenied:
        return None
    try:
        with transaction.atomic():
            top_up = _start_top_up(
                account=account, amount_minor=amount_minor, automatic=True, reason=reason
            )
    except IntegrityError:
        return None
    notice_send(
        organization=account.organization,
        kind="automatic_recharge",
        message=f"We are charging {_money(amount_minor, account.currency)} to "
        f"{_card_words(account.default_payment_method_id)} because {reason}. Automatic "
        "recharge can be turned off on the Billing page.",
    )
    return top_up
