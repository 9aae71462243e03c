"""Billing accounts and their Stripe customers."""

from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from billing.models import BillingAccount, BillingMode, UsageAccrual
from billing.money import (
    default_recharge_settings,
    from_minor_units,
    to_minor_units,
    to_minor_units_asked,
    top_up_limits,
    top_up_range_text,
)
from billing.selectors import currency_choices, currency_lock_reason
from billing.services.usage import METERED_TIERS, reservations_book_now
from billing.stripe_gateway import StripeGateway, get_gateway
from config.currency import currency_refusal
from config.errors import Conflict, InvalidTransition, ValidationFailed
from marketplace.models import Membership, Organization, Reservation, ReservationStatus, Role
from marketplace.services.audit import audit_changes, audit_record

__all__ = [
    "billing_account_get_or_create",
    "stripe_customer_ensure",
    "billing_account_approve_postpaid",
    "billing_currency_change_check",
    "billing_settings_check",
    "billing_settings_update",
]


def billing_account_get_or_create(*, organization: Organization) -> BillingAccount:
    currency = settings.CURRENCY
    account, _ = BillingAccount.objects.get_or_create(
        organization=organization,
        defaults={
            "currency": currency,
            "recharge_threshold_minor": to_minor_units(
                settings.BILLING_DEFAULT_RECHARGE_THRESHOLD, currency
            ),
            "recharge_amount_minor": to_minor_units(
                settings.BILLING_DEFAULT_RECHARGE_AMOUNT, currency
            ),
        },
    )
    return account


@transaction.atomic
def stripe_customer_ensure(
    *, organization: Organization, gateway: StripeGateway | None = None
) -> BillingAccount:
    """The organisation's account with a Stripe customer, creating the customer once.

    Synchronous (a SetupIntent needs the customer now). The row lock makes concurrent
    callers wait for the first; the idempotency key makes a retry after a crash return the
    same customer from Stripe.
    """
    billing_account_get_or_create(organization=organization)
    account = BillingAccount.objects.select_for_update().get(organization=organization)
    if account.stripe_customer_id:
        return account
    owner = (
        Membership.objects.filter(organization=organization, role=Role.OWNER)
        .select_related("user")
        .order_by("id")
        .first()
    )
    customer = (gateway or get_gateway()).customer_create(
        name=organization.name,
        email=owner.user.email if owner else "",
        organization_public_id=organization.public_id,
        idempotency_key=f"customer:{organization.public_id}",
    )
    account.stripe_customer_id = customer["id"]
    account.save(update_fields=["stripe_customer_id"])
    return account


@transaction.atomic
def billing_account_approve_postpaid(
    *, organization: Organization, approved_by: AbstractBaseUser
) -> BillingAccount:
    """Staff only: invoice this organisation monthly instead of drawing a prepaid balance.

    Usage accrued while prepaid is paid from the balance, not invoiced: its running
    reservations' usage is booked up to now first (each reservation locked, in id order,
    before the account, as a state change does), and only lines written after
    `postpaid_approved_at` are invoiced (billing.services.postpaid).
    """
    account = billing_account_get_or_create(organization=organization)
    if account.mode == BillingMode.POSTPAID:
        raise InvalidTransition("This organisation is already postpaid.", code="already_postpaid")
    running = Reservation.objects.filter(
        Q(status__in=(ReservationStatus.ACTIVE, ReservationStatus.RELEASING))
        | Q(
            pk__in=UsageAccrual.objects.filter(
                organization=organization, closed_at__isnull=True
            ).values("reservation_id")
        ),
        organization=organization,
        tier__in=METERED_TIERS,
        activated_at__isnull=False,
    )
    ids = list(running.select_for_update().order_by("pk").values_list("pk", flat=True))
    if ids:
        reservations_book_now(reservation_ids=ids, reason="switch to postpaid")
    account = BillingAccount.objects.select_for_update().get(organization=organization)
    if account.mode == BillingMode.POSTPAID:
        raise InvalidTransition("This organisation is already postpaid.", code="already_postpaid")
    account.mode = BillingMode.POSTPAID
    account.postpaid_approved_by = approved_by
    # After the booking above: every line it wrote is stamped before this instant.
    account.postpaid_approved_at = timezone.now()
    account.save(update_fields=["mode", "postpaid_approved_by", "postpaid_approved_at"])
    return account


_UNSET = object()


@transaction.atomic
def billing_settings_update(
    *,
    organization: Organization,
    currency: str | None = None,
    any_currency: bool = False,
    auto_recharge_enabled: bool | None = None,
    recharge_threshold: Decimal | None = None,
    recharge_amount: Decimal | None = None,
    monthly_spend_limit: "Decimal | None | object" = _UNSET,
) -> BillingAccount:
    """The customer's own settings: the billing currency (before any money moves: see
    billing_currency_change_check; `any_currency` for staff), automatic recharge and a monthly
    spend limit (None: none). Amounts are in the currency the account is billed in after the
    change.

    Automatic recharge is opt-in and needs a saved card; its amount and threshold are capped
    like a top-up in the account's currency (money.top_up_limits). Nothing changes when
    anything is refused.
    """
    billing_account_get_or_create(organization=organization)
    # The funding gate's lock (billing.services.funding.billing_account_lock takes this row).
    account = BillingAccount.objects.select_for_update().get(organization=organization)
    before = _settings(account)
    given = {"recharge_threshold": recharge_threshold, "recharge_amount": recharge_amount}
    given = {k: v for k, v in given.items() if v is not None}
    if monthly_spend_limit is not _UNSET:
        given["monthly_spend_limit"] = monthly_spend_limit
    fields = []
    if currency is not None and currency != account.currency:
        given = {**_defaults_carried(account, currency), **given}
        billing_currency_change_check(
            account=account, currency=currency, any_currency=any_currency, **given
        )
        account.currency = currency
        fields.append("currency")
    billing_settings_check(currency=account.currency, **given)

    for name in ("recharge_threshold", "recharge_amount"):
        if name in given:
            setattr(
                account,
                f"{name}_minor",
                to_minor_units_asked(given[name], account.currency, field=name),
            )
            fields.append(f"{name}_minor")
    if monthly_spend_limit is not _UNSET:
        account.monthly_spend_limit_minor = (
            None
            if monthly_spend_limit is None
            else to_minor_units_asked(
                monthly_spend_limit, account.currency, field="monthly_spend_limit"
            )
        )
        fields.append("monthly_spend_limit_minor")
    if auto_recharge_enabled is not None:
        if auto_recharge_enabled and not account.default_payment_method_id:
            raise ValidationFailed(
                "Save a card before turning automatic recharge on.",
                code="no_payment_method",
                field="auto_recharge_enabled",
            )
        account.auto_recharge_enabled = auto_recharge_enabled
        fields.append("auto_recharge_enabled")
    if fields:
        account.save(update_fields=fields)
    changes = audit_changes(before, _settings(account))
    if changes["after"]:
        audit_record(
            organization_id=organization.pk,
            action="billing_settings.update",
            object_type="billing_settings",
            object_id=organization.public_id,
            changes=changes,
        )
    return account


def billing_settings_check(
    *,
    currency: str,
    recharge_threshold: Decimal | None = None,
    recharge_amount: Decimal | None = None,
    monthly_spend_limit: "Decimal | None | object" = _UNSET,
) -> None:
    """The bounds of the settings in the account's `currency` (ValidationFailed naming the
    first out of them), for the customer's changes and staff's (the admin) alike. Bounded like
    a top-up (money.top_up_limits): an automatic charge is never larger than one the customer
    may make, nor smaller than one Stripe takes."""
    least, most = top_up_limits(currency)
    if recharge_threshold is not None and not Decimal(0) <= recharge_threshold <= most:
        raise ValidationFailed(
            f"The recharge threshold is between 0 and {most:,} {currency.upper()}.",
            code="amount_out_of_range",
            field="recharge_threshold",
        )
    if recharge_amount is not None and not least <= recharge_amount <= most:
        raise ValidationFailed(
            f"A recharge is between {top_up_range_text(currency)}.",
            code="amount_out_of_range",
            field="recharge_amount",
        )
    if monthly_spend_limit not in (_UNSET, None) and monthly_spend_limit < 0:
        raise ValidationFailed("Must be zero or more.", field="monthly_spend_limit")


def _recharge_defaults(currency: str) -> tuple[Decimal, Decimal]:
    """The recharge threshold and amount a new account in `currency` gets (major units)."""
    if currency == settings.CURRENCY:
        return settings.BILLING_DEFAULT_RECHARGE_THRESHOLD, settings.BILLING_DEFAULT_RECHARGE_AMOUNT
    return default_recharge_settings(currency)


def _defaults_carried(account: BillingAccount, currency: str) -> dict[str, Decimal]:
    """A recharge threshold or amount still at its default in the account's currency becomes
    the default in `currency` (50 USD becomes 43 EUR or 7,600 JPY, not 50 of them)."""
    carried = {}
    if currency_refusal(currency):
        return carried  # refused as such by billing_currency_change_check
    olds, news = _recharge_defaults(account.currency), _recharge_defaults(currency)
    for name, old, new in zip(("recharge_threshold", "recharge_amount"), olds, news, strict=True):
        if getattr(account, f"{name}_minor") == to_minor_units(old, account.currency):
            carried[name] = new
    return carried


def billing_currency_change_check(
    *, account: BillingAccount, currency: str, any_currency: bool = False, **settings
) -> None:
    """Whether `account`, locked by the caller, may be billed in `currency` from now on, with
    its settings as they will be: `settings` as billing_settings_check takes them, in major
    units of `currency`; one not given keeps its minor units, which are another amount in
    the new currency, so it must be within that currency's limits too.

    Customers choose among the currencies something is sold in (currency_choices); staff
    (`any_currency`) any Switchyard charges in. Refused once money has moved (Conflict
    `currency_locked`, currency_lock_reason). The caller saves the change in the same
    transaction, under the lock: the funding gate decides a booking and writes its hold, in
    the account's currency, under it, so none can hold money in the old currency between.
    """
    if refusal := currency_refusal(currency):
        raise ValidationFailed(refusal, code="invalid_currency", field="currency")
    if currency == account.currency:
        return
    choices = currency_choices(account=account)
    if not any_currency and currency not in choices:
        raise ValidationFailed(
            f"Nothing is sold in {currency.upper()}: choose one of "
            f"{', '.join(c.upper() for c in choices)}.",
            code="currency_not_sold",
            field="currency",
        )
    if reason := currency_lock_reason(organization_id=account.organization_id):
        raise Conflict(
            f"The billing currency ({account.currency.upper()}) can no longer be changed: "
            f"{reason}.",
            code="currency_locked",
            field="currency",
        )
    kept = {
        "recharge_threshold": account.recharge_threshold_minor,
        "recharge_amount": account.recharge_amount_minor,
        "monthly_spend_limit": account.monthly_spend_limit_minor,
    }
    kept = {
        name: from_minor_units(minor, currency)
        for name, minor in kept.items()
        if name not in settings and minor is not None
    }
    try:
        billing_settings_check(currency=currency, **kept, **settings)
    except ValidationFailed as exc:
        if exc.field not in kept:
            raise
        amount = f"{kept[exc.field]:,} {currency.upper()}"
        raise ValidationFailed(
            f"{exc.message} Kept as it is, the {exc.field.replace('_', ' ')} would be {amount}: "
            "set it in the same change.",
            code=exc.code,
            field=exc.field,
        ) from None


def _settings(account: BillingAccount) -> dict:
    """The customer's settings as the audit log shows them (minor units, as stored)."""
    return {
        "currency": account.currency,
        "auto_recharge_enabled": account.auto_recharge_enabled,
        "recharge_threshold_minor": account.recharge_threshold_minor,
        "recharge_amount_minor": account.recharge_amount_minor,
        "monthly_spend_limit_minor": account.monthly_spend_limit_minor,
    }
