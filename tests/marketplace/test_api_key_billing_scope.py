"""Money needs a person or a billing key; the organisation's keys and invitations need a person.

A leaked integration key (read, write) must not be able to save, choose or remove cards, top
up or change billing settings; only a key an owner gave the billing scope can. Listing the
organisation's API keys and open invitations is for signed-in owners and admins.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from billing.models import BillingAccount, OutboxMessage, TopUp
from billing.services.accounts import billing_account_get_or_create
from marketplace.models import ApiKey, ApiKeyScope, Role
from marketplace.services.api_keys import api_key_create
from tests.clients import HttpsClient
from tests.factories import MembershipFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    key_client,
    org,
    owner,
    owner_client,
    session_client,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_rate_limits")]

MONEY_CALLS = [
    ("patch", "/api/v1/billing/settings", {"monthly_spend_limit": "1.00"}),
    ("patch", "/api/v1/billing/settings", {"auto_recharge_enabled": True,
                                           "recharge_amount": "100000.00"}),
    ("post", "/api/v1/billing/top-ups", {"amount": "100000.00"}),
    ("post", "/api/v1/billing/payment-methods/setup-intent", None),
    ("post", "/api/v1/billing/payment-methods", {"payment_method": "pm_card_visa"}),
    ("post", "/api/v1/billing/payment-methods/pm_123/default", None),
    ("delete", "/api/v1/billing/payment-methods/pm_123", None),
]  # fmt: skip


def _account_state(org):
    account = BillingAccount.objects.get(organization=org)
    return (
        account.auto_recharge_enabled,
        account.recharge_amount_minor,
        account.monthly_spend_limit_minor,
        account.default_payment_method_id,
        TopUp.objects.count(),
        OutboxMessage.objects.count(),
    )


@pytest.mark.parametrize(("method", "path", "body"), MONEY_CALLS)
def test_a_write_key_cannot_move_money(org, method, path, body):
    billing_account_get_or_create(organization=org)
    before = _account_state(org)
    client = key_client(org, scopes=[ApiKeyScope.READ, ApiKeyScope.WRITE])

    response = getattr(client, method)(path, body, format="json")

    error = assert_error(response, 403, "insufficient_scope")
    assert "billing scope" in error["message"]
    assert _account_state(org) == before


def test_a_billing_key_from_an_owner_can_change_billing_settings(org, owner):
    billing_account_get_or_create(organization=org)
    _, secret = api_key_create(
        organization=org,
        name="finance",
        scopes=[ApiKeyScope.READ, ApiKeyScope.BILLING],
        created_by=owner.user,
    )
    client = HttpsClient(HTTP_AUTHORIZATION=f"Bearer {secret}")

    response = client.patch(
        "/api/v1/billing/settings",
        {"monthly_spend_limit": "250.00"},
        content_type="application/json",
    )

    assert response.status_code == 200
    assert response.json()["monthly_spend_limit"] == "250.00"
    assert BillingAccount.objects.get(organization=org).monthly_spend_limit_minor == 25000
    # Billing does not include write: it cannot book.
    assert_error(client.post("/api/v1/quotes", {}, content_type="application/json"), 403,
                 "insufficient_scope")  # fmt: skip


def test_keys_get_read_and_write_by_default_and_only_an_owner_grants_billing(org, owner):
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    owner_session, admin_session = session_client(owner), session_client(admin)

    default = owner_session.post("/api/v1/api-keys", {"name": "ci"}, format="json")
    assert default.status_code == 201
    assert default.json()["scopes"] == ["read", "write"]

    refused = admin_session.post(
        "/api/v1/api-keys", {"name": "finance", "scopes": ["read", "billing"]}, format="json"
    )
    error = assert_error(refused, 403, "insufficient_role")
    assert error["field"] == "scopes"
    assert list(ApiKey.objects.values_list("name", flat=True)) == ["ci"]

    granted = owner_session.post(
        "/api/v1/api-keys", {"name": "finance", "scopes": ["read", "billing"]}, format="json"
    )
    assert granted.status_code == 201
    assert granted.json()["scopes"] == ["billing", "read"]
    listed = {
        k["name"]: k["scopes"] for k in admin_session.get("/api/v1/api-keys").json()["results"]
    }
    assert listed == {"ci": ["read", "write"], "finance": ["billing", "read"]}


@pytest.mark.parametrize("path", ["/api/v1/api-keys", "/api/v1/organization/invitations"])
@pytest.mark.parametrize(
    "scopes",
    [[ApiKeyScope.READ], [ApiKeyScope.READ, ApiKeyScope.WRITE], list(ApiKeyScope.values)],
)
def test_no_key_lists_the_organisations_keys_or_invitations(org, owner_client, path, scopes):
    assert owner_client.get(path).status_code == 200
    response = key_client(org, scopes=scopes).get(path)
    assert_error(response, 403, "session_required")
    assert "results" not in response.json()


def test_the_keys_page_offers_billing_to_owners_only(org, owner):
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    pages = {}
    for membership in (owner, admin):
        client = HttpsClient()
        client.force_login(membership.user)
        pages[membership.role] = client.get("/api-keys").content.decode()
    assert 'value="billing"' in pages[Role.OWNER]
    assert 'value="billing"' not in pages[Role.ADMIN]

    client = HttpsClient()
    client.force_login(admin.user)
    page = client.get("/api-keys").content.decode()
    once = page.split('name="once" value="', 1)[1].split('"', 1)[0]
    response = client.post(
        "/api-keys", {"name": "sneaky", "scopes": ["read", "billing"], "once": once}
    )
    assert response.status_code == 400
    assert not ApiKey.objects.filter(name="sneaky").exists()


def test_the_schema_names_the_scope_each_operation_needs(owner_client):
    schema = owner_client.get("/api/schema/?format=json").json()
    ops = {
        op["operationId"]: op
        for item in schema["paths"].values()
        for op in item.values()
        if isinstance(op, dict) and "operationId" in op
    }
    assert ops["billing_top_up_create"]["x-api-key-scope"] == "billing"
    assert ops["billing_settings_update"]["x-api-key-scope"] == "billing"
    assert ops["billing_balance"]["x-api-key-scope"] == "read"
    assert ops["api_keys_list"]["x-api-key-scope"] == "none"
    assert "API keys cannot call this" in ops["api_keys_list"]["description"]
    scheme = schema["components"]["securitySchemes"]["ApiKeyAuth"]["description"]
    assert "billing (saving, removing and choosing cards" in scheme
    enum = schema["components"]["schemas"]["ScopesEnum"]["enum"]
    assert enum == ["read", "write", "billing", "grid"]
