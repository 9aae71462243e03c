"""Swagger UI in a real browser, under its own Content-Security-Policy: where people paste an
API key into Authorize, it loads from our own static files, runs no inline script and fetches
nothing from elsewhere. (Redoc's page has its own policy, which blocks the Redocly logo by
design: config/api_docs.py.)"""

import re

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.django_db(transaction=True)


def test_swagger_ui_renders_under_a_policy_with_no_inline_script(portal):
    response = portal.goto(portal.base + "/api/docs/")

    assert response.status == 200
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "'unsafe-inline'" not in policy.split("script-src", 1)[1].split(";", 1)[0]
    assert response.headers["cross-origin-opener-policy"] == "same-origin"
    expect(portal.locator(".swagger-ui .info .title")).to_contain_text("Switchyard")
    expect(portal.locator(".opblock").first).to_be_visible()
    # The Authorize dialog, where a key is typed, opens.
    portal.get_by_role("button", name=re.compile("Authorize")).first.click()
    expect(portal.locator(".modal-ux")).to_be_visible()
    # The portal fixture fails the test if the policy blocked anything.
