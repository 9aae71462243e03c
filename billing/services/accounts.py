"""Billing accounts and their Stripe customers."""

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from billing.models import BillingAccount, BillingMode
from billing.money import to_minor_units
from billing.stripe_gateway import StripeGateway, get_gateway
from config.errors import InvalidTransition
from marketplace.models import Membership, Organization, Role

__all__ = [
    "billing_account_get_or_create",
    "stripe_customer_ensure",
    "billing_account_approve_postpaid",
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
    """Staff only: invoice this organisation monthly instead of drawing a prepaid balance."""
    billing_account_get_or_create(organization=organization)
    account = BillingAccount.objects.select_for_update().get(organization=organization)
    if account.mode == BillingMode.POSTPAID:
        raise InvalidTransition("This organisation is already postpaid.", code="already_postpaid")
    account.mode = BillingMode.POSTPAID
    account.postpaid_approved_by = approved_by
    account.postpaid_approved_at = timezone.now()
    account.save(update_fields=["mode", "postpaid_approved_by", "postpaid_approved_at"])
    return account
