"""Saving cards: SetupIntent for Stripe.js, then attach / set default / detach, mirrored locally.

These calls are synchronous (the customer is waiting for the answer and no money moves);
each still carries an idempotency key derived from our records.
"""

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.models import BillingAccount, PaymentMethod
from billing.services.accounts import stripe_customer_ensure
from billing.services.topups import recharge_rearm_for_new_card
from billing.stripe_gateway import (
    CardDeclined,
    PermanentStripeError,
    StripeGateway,
    StripeNotConfigured,
    TransientStripeError,
    get_gateway,
)
from config.errors import ApplicationError, NotFound, PaymentRequired, ValidationFailed
from marketplace.models import Organization
from marketplace.services.audit import audit_changes, audit_record

logger = logging.getLogger(__name__)

__all__ = [
    "StripeUnavailable",
    "setup_intent_create",
    "payment_method_attach",
    "payment_method_set_default",
    "payment_method_detach",
    "payment_method_mirror",
    "payment_method_mark_detached",
]


class StripeUnavailable(ApplicationError):
    type = "api_error"
    status_code = 503
    default_code = "payment_provider_unavailable"


@contextmanager
def _customer_facing_errors() -> Iterator[None]:
    """Synchronous Stripe calls answer the customer now: map their failures to clear 4xx/503."""
    try:
        yield
    except CardDeclined as exc:
        raise PaymentRequired(str(exc), code=exc.code or "card_declined") from exc
    except PermanentStripeError as exc:
        raise ValidationFailed(str(exc), code=exc.code or "stripe_invalid_request") from exc
    except TransientStripeError as exc:
        raise StripeUnavailable("The payment provider is unreachable; try again shortly.") from exc
    except StripeNotConfigured as exc:
        logger.error("A customer asked for a card operation, but %s", exc)
        raise StripeUnavailable(
            "Card payments are not available on this deployment; contact support.",
            code="payments_not_configured",
        ) from exc


@_customer_facing_errors()
def setup_intent_create(
    *, organization: Organization, gateway: StripeGateway | None = None
) -> dict:
    """What Stripe.js needs for confirmCardSetup(client_secret, …)."""
    gateway = gateway or get_gateway()
    account = stripe_customer_ensure(organization=organization, gateway=gateway)
    intent = gateway.setup_intent_create(
        customer_id=account.stripe_customer_id,
        # Each call is a new card-saving attempt; the key guards a retry of this one call.
        idempotency_key=f"setup_intent:{organization.public_id}:{uuid.uuid4().hex}",
    )
    return {
        "setup_intent_id": intent["id"],
        "client_secret": intent["client_secret"],
        "publishable_key": settings.STRIPE_PUBLISHABLE_KEY,
        "stripe_js_url": settings.STRIPE_JS_URL,
    }


def _card_fields(pm: dict) -> dict:
    card = pm.get("card") or {}
    return {
        "brand": card.get("brand") or "",
        "last4": card.get("last4") or "",
        "exp_month": card.get("exp_month"),
        "exp_year": card.get("exp_year"),
    }


def _not_ours(payment_method_id: str) -> NotFound:
    # Like any other organisation's object: not found, without saying whose it is.
    return NotFound(
        f"No payment method {payment_method_id!r} was set up for this organisation; save a "
        "card through this organisation's own card setup (SetupIntent).",
        code="no_such_payment_method",
        field="payment_method",
    )


@transaction.atomic
def payment_method_mirror(
    *, organization: Organization, stripe_payment_method: dict
) -> PaymentMethod:
    """Create or refresh our copy of a Stripe PaymentMethod (from an API result or webhook).

    A card stays with the organisation that saved it: one row per Stripe id (unique), and a
    row of another organisation is never taken over (NotFound).
    """
    pm, created = PaymentMethod.objects.select_for_update().get_or_create(
        stripe_payment_method_id=stripe_payment_method["id"],
        defaults={"organization": organization, **_card_fields(stripe_payment_method)},
    )
    if pm.organization_id != organization.pk:
        raise _not_ours(pm.stripe_payment_method_id)
    if not created:
        for name, value in _card_fields(stripe_payment_method).items():
            setattr(pm, name, value)
        pm.detached_at = None
        pm.save()
    account = BillingAccount.objects.select_for_update().get(organization=organization)
    if not account.default_payment_method_id:
        account.default_payment_method_id = pm.stripe_payment_method_id
        account.save(update_fields=["default_payment_method_id"])
        recharge_rearm_for_new_card(account=account)
    return pm


def _check_set_up_here(
    *, gateway: StripeGateway, customer_id: str, payment_method_id: str, setup_intent_id: str
) -> None:
    """The card must be this organisation's: already on its Stripe customer, or the result of
    one of its own SetupIntents (Stripe.js confirmCardSetup with its client secret)."""
    try:
        pm = gateway.payment_method_retrieve(payment_method_id=payment_method_id)
    except PermanentStripeError:
        raise _not_ours(payment_method_id) from None
    owner = pm.get("customer") or ""
    if owner == customer_id:
        return
    if owner or not setup_intent_id:
        raise _not_ours(payment_method_id)
    try:
        intent = gateway.setup_intent_retrieve(setup_intent_id=setup_intent_id)
    except PermanentStripeError:
        raise _not_ours(payment_method_id) from None
    if (
        intent.get("customer") != customer_id
        or intent.get("payment_method") != payment_method_id
        or intent.get("status") != "succeeded"
    ):
        raise _not_ours(payment_method_id)


@_customer_facing_errors()
def payment_method_attach(
    *,
    organization: Organization,
    payment_method_id: str,
    setup_intent_id: str = "",
    gateway: StripeGateway | None = None,
) -> PaymentMethod:
    """Attach a card this organisation set up to its customer (the first becomes default).

    Another organisation's card, or one from nobody's SetupIntent, is refused (404) before
    anything is attached or stored.
    """
    gateway = gateway or get_gateway()
    account = stripe_customer_ensure(organization=organization, gateway=gateway)
    stored = PaymentMethod.objects.filter(stripe_payment_method_id=payment_method_id).first()
    if stored is not None and stored.organization_id != organization.pk:
        raise _not_ours(payment_method_id)
    _check_set_up_here(
        gateway=gateway,
        customer_id=account.stripe_customer_id,
        payment_method_id=payment_method_id,
        setup_intent_id=setup_intent_id,
    )
    try:
        pm = gateway.payment_method_attach(
            payment_method_id=payment_method_id,
            customer_id=account.stripe_customer_id,
            idempotency_key=f"pm_attach:{organization.public_id}:{payment_method_id}",
        )
    except CardDeclined as exc:
        raise PaymentRequired(str(exc), code=exc.code, field="payment_method") from exc
    except PermanentStripeError as exc:
        # Not a refused card but a request Stripe cannot act on (no such payment method, one
        # attached to another customer): bad input, not a payment problem.
        raise ValidationFailed(
            f"Stripe cannot attach payment method {payment_method_id!r}: {exc}",
            code=exc.code or "invalid_payment_method",
            field="payment_method",
        ) from exc
    mirrored = payment_method_mirror(organization=organization, stripe_payment_method=pm)
    _audit(
        organization,
        "payment_method.add",
        payment_method_id,
        {"after": {"brand": mirrored.brand, "last4": mirrored.last4}},
    )
    return mirrored


@_customer_facing_errors()
def payment_method_set_default(
    *, organization: Organization, payment_method_id: str, gateway: StripeGateway | None = None
) -> BillingAccount:
    """Make a saved card the default: Stripe first, with no transaction open or row locked
    (as attach and detach), then our record under the account's lock."""
    pm = _attached(organization, payment_method_id)
    account = BillingAccount.objects.get(organization=organization)
    (gateway or get_gateway()).customer_set_default_payment_method(
        customer_id=account.stripe_customer_id,
        payment_method_id=payment_method_id,
        idempotency_key=f"pm_default:{organization.public_id}:{payment_method_id}:{pm.pk}",
    )
    with transaction.atomic():
        account = BillingAccount.objects.select_for_update().get(organization=organization)
        # Removed while Stripe answered: its detach cleared Stripe's default too.
        _attached(organization, payment_method_id)
        before = account.default_payment_method_id
        account.default_payment_method_id = payment_method_id
        account.save(update_fields=["default_payment_method_id"])
        recharge_rearm_for_new_card(account=account)
        _audit(
            organization,
            "payment_method.set_default",
            payment_method_id,
            audit_changes({"default": before}, {"default": payment_method_id}),
        )
    return account


def _attached(organization: Organization, payment_method_id: str) -> PaymentMethod:
    pm = PaymentMethod.objects.filter(
        organization=organization,
        stripe_payment_method_id=payment_method_id,
        detached_at__isnull=True,
    ).first()
    if pm is None:
        raise NotFound("No such payment method.", field="payment_method_id")
    return pm


@_customer_facing_errors()
def payment_method_detach(
    *, organization: Organization, payment_method_id: str, gateway: StripeGateway | None = None
) -> None:
    pm = _attached(organization, payment_method_id)
    (gateway or get_gateway()).payment_method_detach(
        payment_method_id=payment_method_id,
        idempotency_key=f"pm_detach:{payment_method_id}:{pm.pk}",
    )
    with transaction.atomic():
        payment_method_mark_detached(stripe_payment_method_id=payment_method_id)
        _audit(
            organization,
            "payment_method.remove",
            payment_method_id,
            {"before": {"brand": pm.brand, "last4": pm.last4}},
        )


def _audit(organization: Organization, action: str, payment_method_id: str, changes: dict):
    audit_record(
        organization_id=organization.pk,
        action=action,
        object_type="payment_method",
        object_id=payment_method_id,
        changes=changes,
    )


@transaction.atomic
def payment_method_mark_detached(*, stripe_payment_method_id: str) -> None:
    pm = (
        PaymentMethod.objects.select_for_update()
        .filter(stripe_payment_method_id=stripe_payment_method_id)
        .first()
    )
    if pm is None or pm.detached_at is not None:
        return
    pm.detached_at = timezone.now()
    pm.save(update_fields=["detached_at"])
    account = BillingAccount.objects.select_for_update().get(organization_id=pm.organization_id)
    if account.default_payment_method_id == stripe_payment_method_id:
        replacement = (
            PaymentMethod.objects.filter(
                organization_id=pm.organization_id, detached_at__isnull=True
            )
            .order_by("-created_at", "-id")
            .first()
        )
        account.default_payment_method_id = (
            replacement.stripe_payment_method_id if replacement else ""
        )
        # No card left: nothing to recharge from; turning it on again needs a new card.
        account.auto_recharge_enabled = account.auto_recharge_enabled and replacement is not None
        account.save(update_fields=["default_payment_method_id", "auto_recharge_enabled"])
