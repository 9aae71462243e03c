"""Destructive actions ask first, in Chromium: removing a card and deleting a webhook endpoint
open a page that says what is lost, whose button does it (no one-click removal)."""

import pytest
from playwright.sync_api import expect

from billing.models import PaymentMethod
from billing.services.accounts import billing_account_get_or_create
from marketplace.models import WebhookEndpoint
from marketplace.services.webhooks import webhook_endpoint_create
from tests.portal.test_portal_accessibility import contrast_failures


@pytest.fixture(autouse=True)
def insecure_allowed(settings):
    settings.WEBHOOK_ALLOW_INSECURE = True


def test_deleting_a_webhook_endpoint_is_confirmed_on_its_own_page(signed_in):
    page, _user, organization = signed_in
    endpoint, _ = webhook_endpoint_create(
        organization=organization, url="http://127.0.0.1:9/hooks", event_types=[]
    )

    page.goto(f"{page.base}/webhooks/{endpoint.public_id}")
    page.get_by_role("link", name="Delete…").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Delete this webhook endpoint?")
    expect(page.locator("#delete-effect")).to_contain_text("cannot be undone")
    assert WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()
    assert contrast_failures(page) == []
    page.get_by_role("link", name="Cancel").click()
    expect(page.get_by_role("heading", level=1)).to_have_text(endpoint.url)
    page.get_by_role("link", name="Delete…").click()
    page.get_by_role("button", name="Delete endpoint").click()

    expect(page.locator(".messages")).to_contain_text("Deleted the endpoint")
    assert not WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()


def test_removing_a_card_is_confirmed_on_its_own_page(signed_in):
    page, _user, organization = signed_in
    account = billing_account_get_or_create(organization=organization)
    PaymentMethod.objects.create(
        organization=organization, stripe_payment_method_id="pm_only", brand="visa", last4="4242"
    )
    account.default_payment_method_id = "pm_only"
    account.save(update_fields=["default_payment_method_id"])

    page.goto(f"{page.base}/billing/payment-methods")
    page.get_by_role("link", name="Remove Visa ending 4242").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Remove Visa ending 4242?")
    expect(page.locator("#remove-effect")).to_contain_text("It is your only card")
    expect(page.get_by_role("button", name="Remove card")).to_be_visible()
    assert contrast_failures(page) == []
    assert PaymentMethod.objects.get().detached_at is None
