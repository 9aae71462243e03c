"""A webhook endpoint gets no more than the caller who set it up may see: an API key, which
may not list API keys nor read api_key.* events, cannot subscribe an endpoint to them by name
(403, as GET events?type= is), its "every type" leaves them out, and changing the URL or
rotating the secret of an owner's endpoint narrows it; nor does a key see such deliveries
(apis/events.py EVENT_FAMILY_LISTS is the one rule)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from marketplace.models import (
    ApiKeyScope,
    AuditEntry,
    DeliveryStatus,
    EventType,
    WebhookDelivery,
    WebhookEndpoint,
)
from marketplace.services.api_keys import api_key_create
from marketplace.services.events import member_event_record
from marketplace.services.webhooks import webhook_delivery_resend, webhook_endpoint_create
from tests.clients import HttpsAPIClient, HttpsClient
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    key_client,
    org,
    owner,
    owner_client,
)

pytestmark = pytest.mark.django_db

URL = "http://127.0.0.1:9/hook"
KEY_TYPES = [t for t in EventType.values if t.startswith("api_key.")]


@pytest.fixture(autouse=True)
def insecure_allowed(settings):
    settings.WEBHOOK_ALLOW_INSECURE = True


@pytest.fixture
def write_key(org):
    return key_client(org, scopes=[ApiKeyScope.WRITE])


def _register(client, **body) -> dict:
    response = client.post("/api/v1/webhook-endpoints", {"url": URL, **body}, format="json")
    assert response.status_code == 201, response.content
    return response.json()


def _events(org, owner) -> None:
    """An api_key.created and a member.added, each fanned out to the enabled endpoints."""
    api_key_create(organization=org, name="deploy", scopes=["read"], created_by=owner.user)
    member_event_record(membership=owner, type=EventType.MEMBER_ADDED)


def _delivered(endpoint_id: str) -> list[str]:
    deliveries = WebhookDelivery.objects.filter(endpoint__public_id=endpoint_id)
    return sorted(deliveries.values_list("event__type", flat=True))


def _pending_key_delivery(org, owner) -> tuple[WebhookEndpoint, WebhookDelivery]:
    """An owner's every-type endpoint with an api_key.created delivery still to send."""
    endpoint, _ = webhook_endpoint_create(
        organization=org, url=URL, event_types=[], created_by=owner.user
    )
    api_key_create(organization=org, name="deploy", scopes=["read"], created_by=owner.user)
    return endpoint, WebhookDelivery.objects.get(endpoint=endpoint)


@pytest.mark.parametrize(
    "asked", [["api_key.created"], ["member.added", "api_key.revoked"], KEY_TYPES]
)
def test_a_key_cannot_subscribe_an_endpoint_to_api_key_events_by_name(write_key, asked):
    response = write_key.post(
        "/api/v1/webhook-endpoints", {"url": URL, "event_types": asked}, format="json"
    )
    error = assert_error(response, 403, "session_required", field="event_types")
    assert error["message"].startswith("api_key.")
    assert not WebhookEndpoint.objects.exists()


def test_an_owner_may_subscribe_an_endpoint_to_api_key_events(org, owner, owner_client):
    created = _register(owner_client, event_types=["api_key.created"])
    assert (created["event_types"], created["withheld_event_types"]) == (["api_key.created"], [])
    _events(org, owner)
    assert _delivered(created["id"]) == ["api_key.created"]


def test_every_type_leaves_api_key_events_out_for_a_key_made_endpoint_only(
    org, owner, owner_client, write_key
):
    by_key = _register(write_key)
    by_owner = _register(owner_client)
    assert (by_key["event_types"], by_key["withheld_event_types"]) == ([], KEY_TYPES)
    assert (by_owner["event_types"], by_owner["withheld_event_types"]) == ([], [])

    _events(org, owner)

    assert _delivered(by_key["id"]) == ["member.added"]
    assert _delivered(by_owner["id"]) == ["api_key.created", "member.added"]
    # Listed as each caller may see it.
    shown = write_key.get(f"/api/v1/webhook-endpoints/{by_owner['id']}").json()
    assert shown["withheld_event_types"] == []


def test_a_read_key_is_still_refused_as_before(org):
    reader = key_client(org, scopes=[ApiKeyScope.READ])
    response = reader.post("/api/v1/webhook-endpoints", {"url": URL}, format="json")
    assert_error(response, 403, "insufficient_scope")


def test_a_key_changing_an_owners_endpoint_narrows_it_and_an_owner_widens_it_again(
    org, owner, owner_client, write_key
):
    endpoint, pending = _pending_key_delivery(org, owner)
    path = f"/api/v1/webhook-endpoints/{endpoint.public_id}"

    # Naming the family is refused, and nothing changes, the URL given with it included.
    refused = write_key.patch(
        path, {"url": URL + "/mine", "event_types": ["api_key.revoked"]}, format="json"
    )
    assert_error(refused, 403, "session_required", field="event_types")
    endpoint.refresh_from_db()
    assert (endpoint.url, endpoint.event_types, endpoint.withheld_event_families) == (URL, [], [])

    # Its description, or enabling it, does not change what it gets.
    for change in ({"description": "ops"}, {"enabled": True}):
        assert write_key.patch(path, change, format="json").status_code == 200
    assert WebhookEndpoint.objects.get().withheld_event_families == []

    # A new URL: from now on it gets what the key may see, and what was waiting for it of the
    # rest is not sent there.
    moved = write_key.patch(path, {"url": URL + "/mine"}, format="json")
    assert moved.status_code == 200, moved.content
    assert (moved.json()["event_types"], moved.json()["withheld_event_types"]) == ([], KEY_TYPES)
    pending.refresh_from_db()
    assert (pending.status, pending.next_attempt_at) == (DeliveryStatus.FAILED, None)
    update = AuditEntry.objects.filter(action="webhook_endpoint.update").latest("id")
    assert update.changes["after"]["withheld_event_families"] == ["api_key."]
    WebhookDelivery.objects.all().delete()
    _events(org, owner)
    assert _delivered(endpoint.public_id) == ["member.added"]

    # An owner changing only the URL back does not widen it; setting its types does.
    assert owner_client.patch(path, {"url": URL}, format="json").status_code == 200
    assert WebhookEndpoint.objects.get().withheld_event_families == ["api_key."]
    widened = owner_client.patch(path, {"event_types": []}, format="json").json()
    assert widened["withheld_event_types"] == []
    WebhookDelivery.objects.all().delete()
    _events(org, owner)
    assert _delivered(endpoint.public_id) == ["api_key.created", "member.added"]


def test_a_key_setting_the_types_of_an_owners_endpoint_narrows_it(org, owner, write_key):
    endpoint, pending = _pending_key_delivery(org, owner)
    response = write_key.patch(
        f"/api/v1/webhook-endpoints/{endpoint.public_id}", {"event_types": []}, format="json"
    )
    assert response.json()["withheld_event_types"] == KEY_TYPES
    pending.refresh_from_db()
    assert pending.status == DeliveryStatus.FAILED


def test_a_key_rotating_the_secret_narrows_the_endpoint(org, owner, owner_client, write_key):
    endpoint, pending = _pending_key_delivery(org, owner)
    path = f"/api/v1/webhook-endpoints/{endpoint.public_id}/rotate-secret"

    assert owner_client.post(path, {}, format="json").json()["withheld_event_types"] == []
    rotated = write_key.post(path, {}, format="json")
    assert rotated.status_code == 200, rotated.content
    assert rotated.json()["withheld_event_types"] == KEY_TYPES
    pending.refresh_from_db()
    assert pending.status == DeliveryStatus.FAILED
    rotation = AuditEntry.objects.filter(action="webhook_endpoint.rotate_secret").latest("id")
    assert rotation.changes["after"]["withheld_event_families"] == ["api_key."]
    WebhookDelivery.objects.all().delete()
    _events(org, owner)
    assert _delivered(endpoint.public_id) == ["member.added"]


def test_a_key_sees_no_api_key_deliveries_and_cannot_resend_them(
    org, owner, owner_client, write_key
):
    endpoint, delivery = _pending_key_delivery(org, owner)
    member_event_record(membership=owner, type=EventType.MEMBER_ADDED)
    path = f"/api/v1/webhook-endpoints/{endpoint.public_id}/deliveries"

    def types(client: HttpsAPIClient) -> list[str]:
        response = client.get(path)
        assert response.status_code == 200, response.content
        return [d["event_type"] for d in response.json()["results"]]

    assert types(owner_client) == ["member.added", "api_key.created"]
    assert types(write_key) == ["member.added"]
    resend = f"/api/v1/webhook-deliveries/{delivery.public_id}/resend"
    assert_error(write_key.post(resend), 404, "webhook_delivery_not_found")
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.PENDING and delivery.attempts == 0
    assert owner_client.post(resend).status_code == 202


def test_what_an_endpoint_withholds_is_not_resent_to_it(org, owner, owner_client, write_key):
    endpoint, delivery = _pending_key_delivery(org, owner)
    path = f"/api/v1/webhook-endpoints/{endpoint.public_id}"
    assert write_key.patch(path, {"url": URL + "/mine"}, format="json").status_code == 200

    resend = f"/api/v1/webhook-deliveries/{delivery.public_id}/resend"
    assert_error(owner_client.post(resend), 409, "event_type_withheld")
    delivery.refresh_from_db()
    assert (delivery.status, delivery.next_attempt_at) == (DeliveryStatus.FAILED, None)
    # Once an owner sets what it gets, it may be sent again.
    assert owner_client.patch(path, {"event_types": []}, format="json").status_code == 200
    assert webhook_delivery_resend(delivery=delivery).status == DeliveryStatus.PENDING


def test_the_schema_shows_what_an_endpoint_withholds_and_documents_the_refusal():
    response = HttpsAPIClient().get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    schema = response.json()
    output = schema["components"]["schemas"]["WebhookEndpointOutput"]
    assert "withheld_event_types" in output["required"]
    withheld = output["properties"]["withheld_event_types"]
    assert withheld["type"] == "array" and "api_key" in withheld["description"]
    secret_output = schema["components"]["schemas"]["WebhookEndpointSecretOutput"]
    assert "withheld_event_types" in secret_output["properties"]
    endpoints = "/api/v1/webhook-endpoints"
    for path, method in [
        (endpoints, "post"),
        (endpoints + "/{endpoint_id}", "patch"),
        (endpoints + "/{endpoint_id}/rotate-secret", "post"),
    ]:
        assert "403" in schema["paths"][path][method]["responses"], (path, method)
    create = schema["components"]["schemas"]["WebhookEndpointCreateInputRequest"]
    assert "api_key" in create["properties"]["event_types"]["description"]


def test_the_portal_says_what_a_key_made_endpoint_withholds(org, owner, write_key):
    made = _register(write_key)  # every type the key may see
    portal = HttpsClient()
    portal.force_login(owner.user)

    listed = portal.get("/webhooks").content.decode()
    shown = portal.get(f"/webhooks/{made['id']}").content.decode()

    for page in (listed, shown):
        assert "every event except api_key.* (set up with an API key)" in page


def test_the_migration_narrows_endpoints_keys_set_up_before_and_fails_their_pending_ones(
    org, owner
):
    """Marketplace migration 0043 replays each endpoint's audit history by the same rule:
    made by a key → withholds api_key.*; made by a key, then its types set by the owner →
    not; made by the owner, then its secret rotated by a key → withholds; the owner's own →
    not. The narrowed endpoints' api_key.* deliveries still to be sent are failed."""
    import importlib

    from django.apps import apps

    from marketplace import audit

    migration = importlib.import_module(
        "marketplace.migrations.0043_webhookendpoint_withheld_event_families"
    )

    def made(actor: str, *later: tuple[str, str, dict]) -> WebhookEndpoint:
        acting = audit._current.set(audit.AuditContext(actor=actor, ip_address=None,
                                                       user_agent=""))  # fmt: skip
        try:
            endpoint, _ = webhook_endpoint_create(organization=org, url=URL, event_types=[],
                                                  created_by=owner.user)  # fmt: skip
        finally:
            audit._current.reset(acting)
        for action, who, after in later:
            AuditEntry.objects.create(organization=org, actor=who, action=action,
                                      object_type="webhook_endpoint",
                                      object_id=endpoint.public_id, changes={"after": after})  # fmt: skip
        return endpoint

    key_made = made("api_key:sy_live_ab")
    reset_by_owner = made("api_key:sy_live_ab", ("webhook_endpoint.update", "user:ada",
                                                 {"event_types": []}))  # fmt: skip
    rotated_by_key = made("user:ada", ("webhook_endpoint.rotate_secret", "api_key:sy_live_ab",
                                       {"expire_previous": False}))  # fmt: skip
    described_by_key = made("user:ada", ("webhook_endpoint.update", "api_key:sy_live_ab",
                                         {"description": "ops"}))  # fmt: skip
    owners = made("user:ada")
    api_key_create(organization=org, name="deploy", scopes=["read"], created_by=owner.user)
    # As the table was before the migration: nothing withheld, every delivery pending.
    WebhookEndpoint.objects.update(withheld_event_families=[])
    assert WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING).count() == 5

    migration.withhold_what_keys_set_up(apps, None)

    withheld = dict(WebhookEndpoint.objects.values_list("public_id", "withheld_event_families"))
    assert withheld == {
        key_made.public_id: ["api_key."],
        reset_by_owner.public_id: [],
        rotated_by_key.public_id: ["api_key."],
        described_by_key.public_id: [],
        owners.public_id: [],
    }
    pending = set(
        WebhookDelivery.objects.filter(status=DeliveryStatus.PENDING).values_list(
            "endpoint__public_id", flat=True
        )
    )
    assert pending == {reset_by_owner.public_id, described_by_key.public_id, owners.public_id}
