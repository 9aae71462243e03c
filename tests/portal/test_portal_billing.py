"""Billing in the browser: cards through localstripe's Stripe.js stand-in, top-ups, settings,
the ledger. Against a real localstripe; nothing here is mocked."""

import re
from datetime import timedelta

import pytest
from playwright.sync_api import expect

from billing.models import BillingAccount, LedgerKind, PaymentMethod, TopUp, TopUpStatus
from billing.selectors import balance_minor
from billing.services.accounts import billing_account_get_or_create
from billing.services.ledger import ledger_entry_add
from config.celery import app as celery_app
from marketplace.models import Membership, Role
from tests.billing.conftest import T0, make_reservation, save_card, stripe_client
from tests.clients import HttpsClient


@pytest.fixture
def stripe_js(localstripe, settings):
    """localstripe, with the portal loading its Stripe.js stand-in instead of js.stripe.com."""
    settings.STRIPE_JS_URL = f"{localstripe.url}/js.stripe.com/v3/"
    return localstripe


@pytest.fixture
def eager_celery():
    """The top-up's outbox task runs inline in the live server, so the charge settles."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


def _fill_card(page, number: str) -> None:
    page.get_by_placeholder("number").fill(number)
    page.get_by_placeholder("exp_month").fill("12")
    page.get_by_placeholder("exp_year").fill("30")
    page.get_by_placeholder("cvc").fill("123")
    page.get_by_placeholder("postal_code").fill("10001")


def _billing_tab(page, name: str):
    return page.get_by_role("navigation", name="Billing").get_by_role("link", name=name)


def _settings_row(organization) -> tuple:
    account = BillingAccount.objects.get(organization=organization)
    return (
        account.auto_recharge_enabled,
        account.recharge_threshold_minor,
        account.recharge_amount_minor,
        account.monthly_spend_limit_minor,
    )


def test_a_card_added_with_stripe_js_is_attached_and_listed_as_default(signed_in, stripe_js):
    page, _, organization = signed_in
    page.goto(page.base + "/dashboard")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Billing").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Billing")
    _billing_tab(page, "Payment methods").click()
    expect(page.get_by_text("No saved cards.")).to_be_visible()
    page.get_by_role("link", name="Add a card").click()

    _fill_card(page, "4242424242424242")
    page.get_by_role("button", name="Save card").click()

    expect(page).to_have_url(re.compile(r"/billing/payment-methods$"))
    expect(page.get_by_text("Visa ending 4242 saved.")).to_be_visible()
    row = page.get_by_role("row").filter(has_text="Visa ending 4242")
    expect(row).to_contain_text("12/2030")
    expect(row).to_contain_text("Default")
    pm = PaymentMethod.objects.get(organization=organization)
    account = BillingAccount.objects.get(organization=organization)
    assert (pm.brand, pm.last4, pm.exp_month, pm.exp_year) == ("visa", "4242", 12, 2030)
    assert account.default_payment_method_id == pm.stripe_payment_method_id
    # The portal's attach, not the stand-in's confirmation, attached it to the customer.
    remote = stripe_client(stripe_js).v1.payment_methods.retrieve(pm.stripe_payment_method_id)
    assert remote.customer == account.stripe_customer_id


def test_a_declined_card_shows_the_error_and_stores_nothing(signed_in, stripe_js):
    page, _, organization = signed_in
    page.goto(page.base + "/billing/payment-methods/new")

    _fill_card(page, "4000000000000002")
    page.get_by_role("button", name="Save card").click()

    expect(page.locator("#card-errors")).to_have_text("Your card was declined.")
    expect(page.get_by_role("button", name="Save card")).to_be_enabled()
    expect(page).to_have_url(re.compile(r"/billing/payment-methods/new$"))
    assert not PaymentMethod.objects.exists()
    assert BillingAccount.objects.get(organization=organization).default_payment_method_id == ""


def test_a_top_up_charges_the_card_and_the_page_shows_it(signed_in, stripe_js, eager_celery):
    page, _, organization = signed_in
    save_card(stripe_js, organization)
    page.goto(page.base + "/billing/top-ups")

    page.get_by_label("Amount").fill("75.00")
    page.get_by_role("button", name="Top up").click()

    expect(page.get_by_text("Top-up of 75.00 USD requested; its status is below.")).to_be_visible()
    row = page.get_by_role("row").filter(has_text="75.00 USD")
    expect(row).to_contain_text("manual")
    expect(row).to_contain_text("succeeded")
    top_up = TopUp.objects.get(organization=organization)
    assert (top_up.amount_minor, top_up.status, top_up.automatic) == (
        7500,
        TopUpStatus.SUCCEEDED,
        False,
    )
    assert balance_minor(organization=organization) == 7500
    _billing_tab(page, "Overview").click()
    expect(page.locator("#balance")).to_have_text("75.00 USD")


def test_a_plain_member_cannot_change_billing_settings(portal, live_server, django_user_model):
    from marketplace.services.organizations import organization_create

    owner = django_user_model.objects.create_user(username="ada", password="!")
    organization = organization_create(name="Ada Labs", owner=owner)
    billing_account_get_or_create(organization=organization)
    member = django_user_model.objects.create_user(username="bob", password="!")
    Membership.objects.create(organization=organization, user=member, role=Role.MEMBER)
    client = HttpsClient()
    client.force_login(member)
    portal.context.add_cookies(
        [{"name": "sessionid", "value": client.cookies["sessionid"].value, "url": live_server.url}]
    )
    before = _settings_row(organization)

    portal.goto(portal.base + "/billing/")
    expect(portal.locator("#balance")).to_have_text("0.00 USD")
    expect(portal.get_by_role("button", name="Save settings")).to_have_count(0)
    expect(
        portal.get_by_text("Only owners, admins and billing members can change billing settings.")
    ).to_be_visible()
    # A hand-made POST with a valid CSRF token: refused for the role, not for CSRF.
    csrf = next(c["value"] for c in portal.context.cookies() if c["name"] == "csrftoken")
    response = portal.request.post(
        portal.base + "/billing/",
        form={"recharge_threshold": "1.00", "recharge_amount": "500.00", "monthly_spend_limit": ""},
        headers={"X-CSRFToken": csrf, "Origin": portal.base},  # a browser sends its Origin
    )

    assert response.status == 403
    assert "Your role (member) cannot do this" in response.text()
    assert _settings_row(organization) == before


def test_the_usage_and_ledger_page_shows_entries_from_the_ledger_service(signed_in):
    page, user, organization = signed_in
    reservation = make_reservation(organization, gpu_count=2)
    ledger_entry_add(organization=organization, kind=LedgerKind.CREDIT, amount_minor=2500,
                     currency="usd", idempotency_key="welcome", description="Welcome credit",
                     created_by=user)  # fmt: skip
    ledger_entry_add(organization=organization, kind=LedgerKind.USAGE, amount_minor=-360,
                     currency="usd", idempotency_key="usage-1", reservation=reservation,
                     period_start=T0, period_end=T0 + timedelta(minutes=54), gpu_seconds=6480,
                     description="Usage")  # fmt: skip

    page.goto(page.base + "/billing/")
    expect(page.locator("#balance")).to_have_text("21.40 USD")
    _billing_tab(page, "Usage and ledger").click()

    usage = page.locator("#usage").get_by_role("row").filter(has_text=reservation.public_id)
    expect(usage).to_contain_text("2026-03-02")
    expect(usage).to_contain_text("1.80")
    expect(usage).to_contain_text("3.60 USD")
    credit = page.locator("#ledger").get_by_role("row").filter(has_text="Welcome credit")
    expect(credit).to_contain_text("Credit")
    expect(credit).to_contain_text("25.00 USD")
    charge = page.locator("#ledger").get_by_role("row").filter(has_text=reservation.public_id)
    expect(charge).to_contain_text("-3.60 USD")


def test_bad_amounts_get_a_form_error_and_write_nothing(signed_in, stripe_js):
    page, _, organization = signed_in
    billing_account_get_or_create(organization=organization)
    before = _settings_row(organization)

    page.goto(page.base + "/billing/top-ups")
    for amount, error in [("-5", "A top-up is between 5.00 and 100,000.00 USD."),
                          ("abc", "Enter a number.")]:  # fmt: skip
        page.get_by_label("Amount").fill(amount)
        page.get_by_role("button", name="Top up").click()
        expect(page.locator(".field.invalid p.error")).to_have_text(error)
    _billing_tab(page, "Overview").click()
    page.get_by_label("Recharge threshold").fill("9999999999999")
    page.get_by_role("button", name="Save settings").click()

    expect(page.locator(".field.invalid p.error")).to_have_text(
        "Ensure that there are no more than 12 digits in total."
    )
    assert not TopUp.objects.exists()
    assert _settings_row(organization) == before
