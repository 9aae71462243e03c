"""Probes of an account whose currency staff change (the admin, only while no money is on it):
its recharge settings are stored in minor units, so the same numbers mean another amount in
the new currency; they must still be within that currency's top-up limits
(billing.money.top_up_limits), and money committed in the old currency (an open hold) keeps
the currency as the ledger does."""

import pytest
from django.urls import reverse

from billing.models import BillingAccount, Hold
from tests.billing.conftest import make_reservation

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, django_user_model):
    staff = django_user_model.objects.create(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    return client


def _form(account, **changes) -> dict:
    form = {
        "currency": account.currency,
        "recharge_threshold_minor": account.recharge_threshold_minor,
        "recharge_amount_minor": account.recharge_amount_minor,
        **changes,
    }
    return {k: v for k, v in form.items() if v is not None}


def _yen_account(org, *, threshold_minor: int, amount_minor: int) -> BillingAccount:
    BillingAccount.objects.filter(organization=org).update(
        currency="jpy", recharge_threshold_minor=threshold_minor, recharge_amount_minor=amount_minor
    )
    return BillingAccount.objects.get(organization=org)


def test_a_currency_change_leaving_the_recharge_below_the_new_minimum_is_refused(staff_client, org):
    # ¥5,000 is a fine yen recharge; as forint minor units it is 50.00 HUF, under Stripe's
    # 175.00 HUF minimum charge.
    account = _yen_account(org, threshold_minor=1_000, amount_minor=5_000)
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])
    before = BillingAccount.objects.filter(pk=account.pk).values().get()

    response = staff_client.post(url, _form(account, currency="huf"))

    assert response.status_code == 200  # the form again, with the error
    errors = response.context["adminform"].form.errors
    assert errors["recharge_amount_minor"] == ["A recharge is between 175.00 and 999,999.99 HUF."]
    assert BillingAccount.objects.filter(pk=account.pk).values().get() == before


def test_a_currency_change_with_the_settings_restated_in_range_is_saved(staff_client, org):
    account = _yen_account(org, threshold_minor=1_000, amount_minor=5_000)
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])

    response = staff_client.post(url, _form(account, currency="huf", recharge_amount_minor=20_000))

    assert response.status_code == 302, response.context["adminform"].form.errors
    account.refresh_from_db()
    assert (account.currency, account.recharge_amount_minor) == ("huf", 20_000)


def test_a_currency_change_is_refused_while_money_is_held_in_the_old_one(staff_client, org):
    account = BillingAccount.objects.get(organization=org)
    reservation = make_reservation(org)
    Hold.objects.create(organization=org, reservation=reservation, amount_minor=4_000,
                        currency="usd", idempotency_key="hold:probe")  # fmt: skip
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])

    response = staff_client.post(url, _form(account, currency="eur"))

    assert response.status_code == 200
    assert "currency" in response.context["adminform"].form.errors
    account.refresh_from_db()
    assert account.currency == "usd"


def test_a_currency_change_is_refused_while_a_top_up_in_the_old_one_is_being_charged(
    staff_client, org
):
    from billing.models import TopUp, TopUpStatus

    account = BillingAccount.objects.get(organization=org)
    TopUp.objects.create(organization=org, amount_minor=5_000, currency="usd",
                         payment_method_id="pm_x", status=TopUpStatus.PENDING)  # fmt: skip
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])

    response = staff_client.post(url, _form(account, currency="eur"))

    assert response.status_code == 200
    assert response.context["adminform"].form.errors["currency"] == [
        "The billing currency (USD) can no longer be changed: a top-up in it is still being "
        "charged."
    ]
    account.refresh_from_db()
    assert account.currency == "usd"
    # Once it is settled (succeeded: on the ledger; failed: nothing), the rule is the ledger's.
    TopUp.objects.filter(organization=org).update(status=TopUpStatus.FAILED)
    assert staff_client.post(url, _form(account, currency="eur")).status_code == 302
