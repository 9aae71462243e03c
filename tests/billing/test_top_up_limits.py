"""Top-up and recharge limits are the account's currency's (billing.money.top_up_limits): at
least Stripe's minimum charge in it, at most a sensible maximum in it, stated in the refusal,
the API's balance and the portal's forms."""

from decimal import Decimal

import pytest

from billing.models import BillingAccount, OutboxMessage, TopUp, TopUpStatus
from billing.money import (
    STRIPE_MAXIMUM_CHARGE_MINOR,
    STRIPE_MINIMUM_CHARGE,
    TOP_UP_LIMITS,
    from_minor_units,
    top_up_limits,
)
from billing.services.accounts import billing_account_get_or_create
from billing.services.topups import auto_recharge_check, reservation_recharge_amount
from config.currency import APPROXIMATE_UNITS_PER_USD, SUPPORTED_CURRENCIES, minor_unit
from marketplace.models import Role
from tests.billing.conftest import save_card, stripe_client
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def jpy_org(settings):
    """An organisation whose billing account is in yen (no minor unit)."""
    settings.CURRENCY = "jpy"
    membership = MembershipFactory(role=Role.OWNER, user__password="!")
    billing_account_get_or_create(organization=membership.organization)
    return membership.organization


@pytest.fixture
def usd_org(settings):
    settings.CURRENCY = "usd"
    membership = MembershipFactory(role=Role.OWNER, user__password="!")
    billing_account_get_or_create(organization=membership.organization)
    return membership.organization


def _org_in(settings, currency: str):
    settings.CURRENCY = currency
    membership = MembershipFactory(role=Role.OWNER, user__password="!")
    billing_account_get_or_create(organization=membership.organization)
    return membership.organization


def _owner_api(api_client, org):
    api_client.force_authenticate(org.memberships.get(role=Role.OWNER).user)
    return api_client


def _settings(org) -> tuple:
    a = BillingAccount.objects.get(organization=org)
    return (a.recharge_threshold_minor, a.recharge_amount_minor)


# --- the rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("currency", "limits"),
    [
        ("usd", ("5.00", "100000.00")),
        ("USD", ("5.00", "100000.00")),
        ("jpy", ("50", "10000000")),
        ("gbp", ("5.00", "100000.00")),
        ("czk", ("15.00", "999999.99")),  # Stripe's minimum is above 5; its maximum caps it
        ("huf", ("175.00", "999999.99")),
        # Not in Stripe's table: from the approximate rate (config.currency), US$1 rounded up
        # and US$100,000 rounded down, within Stripe's largest charge (eight digits).
        ("krw", ("2000", "99999999")),
        ("vnd", ("30000", "99999999")),
        ("xof", ("600", "56000000")),
        ("clp", ("1000", "94000000")),
        ("idr", ("20000.00", "999999.99")),
        ("php", ("60.00", "999999.99")),
        ("cny", ("8.00", "710000.00")),
        ("kyd", ("5.00", "83000.00")),  # US$1 is less than 5 of it: at least 5
    ],
)
def test_the_limits_are_the_currencys(currency, limits):
    assert top_up_limits(currency) == tuple(Decimal(x) for x in limits)


def test_every_currency_taken_has_limits_stripe_charges_and_a_customer_can_use():
    assert SUPPORTED_CURRENCIES >= set(TOP_UP_LIMITS)
    for currency in SUPPORTED_CURRENCIES:
        least, most = top_up_limits(currency)
        rate = APPROXIMATE_UNITS_PER_USD[currency]
        stripe_most = from_minor_units(STRIPE_MAXIMUM_CHARGE_MINOR, currency)
        assert Decimal(5) <= least < most <= stripe_most, currency
        # At least Stripe's minimum: the documented one, else US$0.50 with the rate halved.
        assert least >= STRIPE_MINIMUM_CHARGE.get(currency, Decimal("0.50") * rate * 2), currency
        # A top-up of US$10 is never too small, one of US$50,000 never too large (unless
        # Stripe's eight digits are less).
        assert least <= 10 * rate, currency
        assert most >= min(50_000 * rate, stripe_most), currency
        assert least == least.quantize(minor_unit(currency)), currency
        assert most == most.quantize(minor_unit(currency)), currency


def test_a_currency_not_taken_has_no_limits():
    with pytest.raises(ValueError, match="'xyz' is not a currency Switchyard charges in"):
        top_up_limits("xyz")


def test_every_listed_currency_is_within_what_stripe_charges():
    assert set(TOP_UP_LIMITS) == set(STRIPE_MINIMUM_CHARGE)
    for currency, (least, most) in TOP_UP_LIMITS.items():
        assert least >= max(Decimal(5), STRIPE_MINIMUM_CHARGE[currency]), currency
        assert most <= from_minor_units(STRIPE_MAXIMUM_CHARGE_MINOR, currency), currency
        assert least < most, currency
        # Whole minor units: an amount at a limit can be charged as it is written.
        assert least == least.quantize(minor_unit(currency)), currency
        assert most == most.quantize(minor_unit(currency)), currency


# --- top-ups through the API -----------------------------------------------------------------


@pytest.mark.parametrize("amount", ["40", "49", "10000001", "0.5"])
def test_a_yen_top_up_outside_the_yen_limits_is_a_400_that_states_them(jpy_org, api_client, amount):
    response = _owner_api(api_client, jpy_org).post(
        "/api/v1/billing/top-ups", {"amount": amount}, format="json"
    )

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("amount_out_of_range", "amount")
    assert error["message"] == "A top-up is between 50 and 10,000,000 JPY."
    assert not TopUp.objects.exists()
    assert not OutboxMessage.objects.exists()


@pytest.mark.stripe
def test_a_yen_top_up_of_stripes_minimum_is_charged_as_written(
    localstripe, jpy_org, api_client, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, jpy_org)
    client = _owner_api(api_client, jpy_org)

    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/api/v1/billing/top-ups", {"amount": "50"}, format="json")

    assert (response.status_code, response.json()["amount"]) == (202, "50")
    top_up = TopUp.objects.get()
    assert (top_up.status, top_up.amount_minor, top_up.currency) == (
        TopUpStatus.SUCCEEDED, 50, "jpy",
    )  # fmt: skip
    pi = stripe_client(localstripe).v1.payment_intents.retrieve(top_up.stripe_payment_intent_id)
    assert (pi.amount, pi.currency) == (50, "jpy")
    assert client.get("/api/v1/billing/balance").json()["balance"] == "50"


def test_the_largest_yen_top_up_is_taken(jpy_org, api_client):
    # Above the old cap of 100,000 in every currency (about US$650 in yen); no card, so 402
    # after the limits were passed.
    response = _owner_api(api_client, jpy_org).post(
        "/api/v1/billing/top-ups", {"amount": "10000000"}, format="json"
    )

    assert response.status_code == 402, response.content
    assert response.json()["error"]["code"] == "no_payment_method"


@pytest.mark.parametrize(
    ("amount", "status"), [("0.49", 400), ("4.99", 400), ("100000.01", 400), ("5.00", 402)]
)
def test_a_dollar_top_up_is_between_5_and_100000(usd_org, api_client, amount, status):
    response = _owner_api(api_client, usd_org).post(
        "/api/v1/billing/top-ups", {"amount": amount}, format="json"
    )

    assert response.status_code == status, response.content
    if status == 400:
        assert response.json()["error"]["message"] == (
            "A top-up is between 5.00 and 100,000.00 USD."
        )
    else:  # within the limits: refused only for want of a card
        assert response.json()["error"]["code"] == "no_payment_method"
    assert not TopUp.objects.exists()


@pytest.mark.parametrize(
    ("currency", "amount"),
    [
        ("vnd", "30000"),  # the least, about US$1.15
        ("vnd", "2500000"),  # about US$95, under the old ceiling of 10,000,000
        ("vnd", "50000000"),  # about US$1,900, over it
        ("vnd", "99999999"),  # Stripe's largest charge
        ("krw", "2000"),
        ("krw", "150000"),
        ("krw", "50000000"),  # about US$35,000, over the old ceiling
        ("krw", "99999999"),
    ],
)
def test_a_top_up_of_a_normal_size_in_won_or_dong_passes_the_limits(
    settings, api_client, currency, amount
):
    org = _org_in(settings, currency)

    response = _owner_api(api_client, org).post(
        "/api/v1/billing/top-ups", {"amount": amount}, format="json"
    )

    # Within the limits: refused only for want of a card.
    assert response.status_code == 402, response.content
    assert response.json()["error"]["code"] == "no_payment_method"
    assert not TopUp.objects.exists()


@pytest.mark.parametrize(
    ("currency", "amount", "message"),
    [
        ("vnd", "29999", "A top-up is between 30,000 and 99,999,999 VND."),  # about US$1.14
        ("vnd", "500", "A top-up is between 30,000 and 99,999,999 VND."),  # the old least
        ("vnd", "100000000", "A top-up is between 30,000 and 99,999,999 VND."),
        ("krw", "1999", "A top-up is between 2,000 and 99,999,999 KRW."),
        ("krw", "500", "A top-up is between 2,000 and 99,999,999 KRW."),  # about US$0.35
        ("krw", "100000000", "A top-up is between 2,000 and 99,999,999 KRW."),
    ],
)
def test_a_top_up_in_won_or_dong_outside_its_limits_is_a_400_that_states_them(
    settings, api_client, currency, amount, message
):
    org = _org_in(settings, currency)
    account = BillingAccount.objects.filter(organization=org)
    account.update(stripe_customer_id="cus_x", default_payment_method_id="pm_x")
    before = account.values().get()

    response = _owner_api(api_client, org).post(
        "/api/v1/billing/top-ups", {"amount": amount}, format="json"
    )

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"], error["message"]) == (
        "amount_out_of_range", "amount", message,
    )  # fmt: skip
    assert not TopUp.objects.exists()
    assert not OutboxMessage.objects.exists()
    assert account.values().get() == before


def test_the_balance_states_the_top_up_limits_of_its_currency(jpy_org, usd_org, api_client):
    jpy = _owner_api(api_client, jpy_org).get("/api/v1/billing/balance").json()
    usd = _owner_api(api_client, usd_org).get("/api/v1/billing/balance").json()

    assert (jpy["currency"], jpy["top_up_min"], jpy["top_up_max"]) == ("jpy", "50", "10000000")
    assert (usd["currency"], usd["top_up_min"], usd["top_up_max"]) == ("usd", "5.00", "100000.00")


# --- automatic recharge ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("recharge_amount", "40", "A recharge is between 50 and 10,000,000 JPY."),
        ("recharge_amount", "10000001", "A recharge is between 50 and 10,000,000 JPY."),
        ("recharge_threshold", "10000001", "The recharge threshold is between 0 and "
                                           "10,000,000 JPY."),
    ],
)  # fmt: skip
def test_yen_recharge_settings_outside_the_yen_limits_are_refused(
    jpy_org, api_client, field, value, message
):
    before = _settings(jpy_org)

    response = _owner_api(api_client, jpy_org).patch(
        "/api/v1/billing/settings", {field: value}, format="json"
    )

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"], error["message"]) == (
        "amount_out_of_range", field, message,
    )  # fmt: skip
    assert _settings(jpy_org) == before


def test_yen_recharge_settings_within_the_yen_limits_are_saved(jpy_org, api_client):
    response = _owner_api(api_client, jpy_org).patch(
        "/api/v1/billing/settings",
        {"recharge_amount": "50", "recharge_threshold": "10000000"},
        format="json",
    )

    assert response.status_code == 200, response.content
    assert (response.json()["recharge_amount"], response.json()["recharge_threshold"]) == (
        "50", "10000000",
    )  # fmt: skip
    assert _settings(jpy_org) == (10_000_000, 50)


def test_a_dollar_recharge_below_5_is_refused(usd_org, api_client):
    before = _settings(usd_org)
    response = _owner_api(api_client, usd_org).patch(
        "/api/v1/billing/settings", {"recharge_amount": "4.99"}, format="json"
    )

    assert response.status_code == 400
    assert response.json()["error"]["message"] == "A recharge is between 5.00 and 100,000.00 USD."
    assert _settings(usd_org) == before


def test_an_automatic_yen_recharge_is_capped_at_the_yen_maximum(jpy_org):
    BillingAccount.objects.filter(organization=jpy_org).update(
        stripe_customer_id="cus_x", default_payment_method_id="pm_x",
        auto_recharge_enabled=True, recharge_armed=True,
        recharge_amount_minor=1_000, recharge_threshold_minor=9_000_000,
    )  # fmt: skip

    top_up = auto_recharge_check(organization=jpy_org)

    # Back over the threshold from nothing: ¥9,000,000, not the old cap of ¥100,000.
    assert (top_up.amount_minor, top_up.currency) == (9_000_000, "jpy")
    account = BillingAccount.objects.get(organization=jpy_org)
    assert reservation_recharge_amount(account=account, shortfall_minor=1_000_000) == 10_000_000
    assert reservation_recharge_amount(account=account, shortfall_minor=1_000_001) is None


# --- the portal ------------------------------------------------------------------------------


def test_the_portal_states_the_yen_limits_and_refuses_below_them(jpy_org, client, settings):
    settings.STRIPE_SECRET_KEY = "sk_test_switchyard"  # the top-up form is shown
    client.force_login(jpy_org.memberships.get(role=Role.OWNER).user)

    top_up_page = client.get("/billing/top-ups").content.decode()
    overview = client.get("/billing/").content.decode()
    refused = client.post("/billing/top-ups", {"amount": "40", "once": "t1"})

    assert "Between 50 and 10,000,000 JPY." in top_up_page
    assert "Between 50 and 10,000,000 JPY." in overview  # the recharge amount
    assert "(at most 10,000,000 JPY)" in overview  # the recharge threshold
    assert refused.status_code == 400
    assert refused.context["form"].errors["amount"] == [
        "A top-up is between 50 and 10,000,000 JPY."
    ]
    assert not TopUp.objects.exists()


def test_the_portal_states_the_dollar_limits(usd_org, client, settings):
    settings.STRIPE_SECRET_KEY = "sk_test_switchyard"
    client.force_login(usd_org.memberships.get(role=Role.OWNER).user)

    assert "Between 5.00 and 100,000.00 USD." in client.get("/billing/top-ups").content.decode()


# --- the admin -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recharge_amount_minor", "refused"), [(40, True), (50, False), (10_000_001, True)]
)
def test_staff_set_yen_recharges_within_the_yen_limits(
    jpy_org, client, django_user_model, recharge_amount_minor, refused
):
    from django.urls import reverse

    staff = django_user_model.objects.create(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    account = BillingAccount.objects.get(organization=jpy_org)
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])

    response = client.post(url, {
        "currency": "jpy", "recharge_threshold_minor": account.recharge_threshold_minor,
        "recharge_amount_minor": recharge_amount_minor,
    })  # fmt: skip

    if refused:
        assert response.status_code == 200  # the form again, with the error
        assert response.context["adminform"].form.errors["recharge_amount_minor"] == [
            "A recharge is between 50 and 10,000,000 JPY."
        ]
        assert _settings(jpy_org) == (
            account.recharge_threshold_minor,
            account.recharge_amount_minor,
        )
    else:
        assert response.status_code == 302, response.context["adminform"].form.errors
        assert _settings(jpy_org)[1] == 50
