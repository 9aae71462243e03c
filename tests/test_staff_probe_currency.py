"""Currencies staff type in the admin (a rate card's, a billing account's) are ones Switchyard
charges in, written as the ledger writes them: "USD" is refused as another currency than the
accounts' "usd" would be, a three-decimal one (KWD) would be charged a tenth of its price, and
Stripe refuses fractions of an ISK."""

from decimal import Decimal

import pytest
from django.urls import reverse

from billing.models import BillingAccount
from marketplace.models import RateCard
from tests.factories import GpuModelFactory, OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(username="ops", is_staff=True, is_superuser=True))
    return client


@pytest.mark.parametrize(
    "typed, error",
    [
        ("kwd", "KWD has three decimals"),
        ("isk", "Stripe charges ISK in whole units only"),  # it refuses 1,000.50 ISK
        ("u$d", "three-letter ISO 4217 code"),
        ("xyz", "XYZ is not a currency Stripe charges in."),  # no limits could be set for it
        ("", "This field is required."),
    ],
)
def test_a_rate_card_in_a_currency_not_charged_in_is_refused(staff_client, typed, error):
    model = GpuModelFactory()

    response = staff_client.post(
        reverse("admin:marketplace_ratecard_add"),
        {"gpu_model": model.pk, "price_per_gpu_hour": "2.5000", "currency": typed},
    )

    assert response.status_code == 200  # the form again, with the error
    assert error in response.content.decode()
    assert not RateCard.objects.exists()


def test_a_rate_cards_currency_is_written_as_the_ledger_writes_it(staff_client):
    model = GpuModelFactory()

    response = staff_client.post(
        reverse("admin:marketplace_ratecard_add"),
        {"gpu_model": model.pk, "price_per_gpu_hour": "2.5000", "currency": " EUR "},
    )

    assert response.status_code == 302
    card = RateCard.objects.get()
    assert (card.currency, card.price_per_gpu_hour) == ("eur", Decimal("2.5000"))


def test_staff_cannot_give_an_account_a_three_decimal_currency(staff_client):
    account = BillingAccount.objects.create(organization=OrganizationFactory())
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])

    response = staff_client.post(
        url,
        {"currency": "kwd", "recharge_threshold_minor": account.recharge_threshold_minor,
         "recharge_amount_minor": account.recharge_amount_minor},
    )  # fmt: skip

    assert response.status_code == 200
    assert "currency" in response.context["adminform"].form.errors
    account.refresh_from_db()
    assert account.currency == "usd"
