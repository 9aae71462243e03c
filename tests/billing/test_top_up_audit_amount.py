"""A top-up's audit entry records the amount charged in the currency's own decimals, however
the customer wrote it ("1000.5", "1000.5000"; "1000.00" yen), through the portal or the API;
one refused records nothing."""

import pytest

from billing.models import BillingAccount, TopUp
from marketplace.models import AuditEntry, Role
from tests.clients import HttpsClient
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def customer(org):
    """An owner of `org` signed in, with a card on file (no charge is made here: the
    PaymentIntent is sent from the outbox after the commit, which these tests never reach)."""
    client = HttpsClient()
    client.force_login(MembershipFactory(organization=org, role=Role.OWNER).user)
    return client


def _billed_in(org, currency: str) -> None:
    BillingAccount.objects.filter(organization=org).update(
        currency=currency, stripe_customer_id="cus_test", default_payment_method_id="pm_test"
    )


def _recorded(org) -> dict:
    top_up = TopUp.objects.get(organization=org)
    entry = AuditEntry.objects.get(organization=org, action="top_up.create")
    assert entry.object_id == top_up.public_id
    return entry.changes


@pytest.mark.parametrize(
    ("currency", "typed", "recorded"),
    [
        ("usd", "1000.5", "1000.50"),
        ("usd", "60", "60.00"),
        ("jpy", "1000.00", "1000"),
        ("jpy", "1000", "1000"),
    ],
)
def test_the_portal_top_ups_audit_entry_has_the_currencys_decimals(
    org, customer, settings, currency, typed, recorded
):
    settings.STRIPE_SECRET_KEY = "sk_test_audit"  # the top-up form is offered
    _billed_in(org, currency)

    response = customer.post("/billing/top-ups", {"amount": typed, "once": "audit-1"})

    assert response.status_code == 302, response.content
    assert _recorded(org) == {"after": {"amount": recorded, "currency": currency}}


@pytest.mark.parametrize(
    ("currency", "sent", "recorded"),
    [("usd", 1000.5, "1000.50"), ("jpy", "1000", "1000"), ("jpy", 1000, "1000")],
)
def test_the_api_top_ups_audit_entry_has_the_currencys_decimals(
    org, customer, currency, sent, recorded
):
    _billed_in(org, currency)

    response = customer.post(
        "/api/v1/billing/top-ups", {"amount": sent}, content_type="application/json"
    )

    assert response.status_code == 202, response.content
    assert _recorded(org) == {"after": {"amount": recorded, "currency": currency}}


def test_a_yen_amount_with_a_fraction_is_refused_and_nothing_is_recorded(org, customer):
    _billed_in(org, "jpy")

    response = customer.post(
        "/api/v1/billing/top-ups", {"amount": "1000.50"}, content_type="application/json"
    )

    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("amount_precision", "amount")
    assert not TopUp.objects.filter(organization=org).exists()
    assert not AuditEntry.objects.filter(organization=org).exists()


@pytest.mark.parametrize(
    ("currency", "typed", "recorded"),
    [("usd", "25.5", "25.50"), ("jpy", "1000.00", "1000")],
)
def test_a_staff_credits_and_refunds_audit_entries_have_the_currencys_decimals(
    org, client, django_user_model, currency, typed, recorded
):
    from django.urls import reverse

    client.force_login(django_user_model.objects.create(username="staff", is_staff=True,
                                                        is_superuser=True))  # fmt: skip
    staff_client = client

    from billing.models import LedgerEntry, LedgerKind, TopUpStatus

    BillingAccount.objects.filter(organization=org).update(currency=currency)
    account = BillingAccount.objects.get(organization=org)
    top_up = TopUp.objects.create(organization=org, amount_minor=500000, currency=currency,
                                  payment_method_id="pm_x", status=TopUpStatus.SUCCEEDED)  # fmt: skip
    LedgerEntry.objects.create(organization=org, kind=LedgerKind.TOP_UP, amount_minor=500000,
                               currency=currency, idempotency_key="t")  # fmt: skip

    credit = staff_client.post(reverse("admin:billing_billingaccount_credit", args=[account.pk]),
                               {"amount": typed, "reason": "goodwill", "once": "c1"})  # fmt: skip
    refund = staff_client.post(reverse("admin:billing_topup_refund", args=[top_up.pk]),
                               {"amount": typed, "reason": "double", "once": "r1"})  # fmt: skip

    assert credit.status_code == refund.status_code == 302
    credited = AuditEntry.objects.get(organization=org, action="credit.issue")
    refunded = AuditEntry.objects.get(organization=org, action="refund.create")
    assert credited.changes["after"]["amount"] == recorded
    assert refunded.changes["after"]["refund"] == recorded
