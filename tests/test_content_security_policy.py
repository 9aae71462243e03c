"""The portal's pages send a Content-Security-Policy; the card page lets in Stripe.js only."""

import pytest

from marketplace.models import Role
from tests.clients import HttpsClient
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


def _policy(response) -> dict[str, list[str]]:
    header = response["Content-Security-Policy"]
    return {
        part.split()[0]: part.split()[1:] for part in (p.strip() for p in header.split(";")) if part
    }


@pytest.fixture
def owner_client():
    membership = MembershipFactory(role=Role.OWNER)
    client = HttpsClient()
    client.force_login(membership.user)
    return client


@pytest.mark.parametrize("path", ["/login", "/dashboard", "/reservations", "/api-keys", "/admin/"])
def test_every_page_allows_only_its_own_origin(owner_client, path):
    response = owner_client.get(path)
    assert response.status_code in (200, 302)
    policy = _policy(response)
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]  # no nonce unless the page used one
    assert policy["object-src"] == ["'none'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert policy["form-action"] == ["'self'"]
    assert "unsafe-inline" not in response["Content-Security-Policy"]


def test_the_api_sends_no_policy(owner_client):
    assert "Content-Security-Policy" not in owner_client.get("/api/v1/organization")


@pytest.mark.stripe
def test_the_card_page_allows_stripe_js_and_its_own_nonced_script(
    owner_client, localstripe, settings
):
    settings.STRIPE_JS_URL = f"{localstripe.url}/js.stripe.com/v3/"
    response = owner_client.get("/billing/payment-methods/new")

    assert response.status_code == 200
    policy = _policy(response)
    nonce = response.wsgi_request.csp_nonce
    assert policy["script-src"] == ["'self'", f"'nonce-{nonce}'", localstripe.url]
    assert policy["frame-src"] == ["'none'", localstripe.url] or policy["frame-src"] == [
        localstripe.url
    ]
    assert f'<script nonce="{nonce}">' in response.content.decode()
    assert "no-store" in response["Cache-Control"]


def test_with_the_real_stripe_js_the_card_page_allows_stripes_documented_origins(settings):
    from django.http import HttpResponse

    from config.csp import stripe_js_allow

    settings.STRIPE_JS_URL = "https://js.stripe.com/v3/"
    response = stripe_js_allow(HttpResponse())
    assert response._csp_update["script-src"] == [
        "https://js.stripe.com",
        "https://*.js.stripe.com",
    ]
    assert "https://hooks.stripe.com" in response._csp_replace["frame-src"]
    assert response._csp_update["connect-src"] == ["https://api.stripe.com"]
