"""Who sees which events: an event shows its object as the API does, so GET events (the list,
the forward feed, events/{id}) shows it only to a caller the object's list endpoint lets read
(marketplace.apis.events.EVENT_FAMILY_LISTS): api_key.* events to owners and admins signed
in, never to a member, the billing role or any API key."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import time

import pytest

from billing.apis import BalanceApi, InvoiceListApi, TopUpListApi
from config.api.context import OrgContext
from marketplace.apis.api_keys import ApiKeyListApi
from marketplace.apis.events import EventListApi, event_types_hidden
from marketplace.apis.organization import MemberListApi
from marketplace.apis.resale import ListingListApi
from marketplace.apis.reservations import ReservationListApi
from marketplace.models import (
    ApiKey,
    ApiKeyScope,
    Event,
    EventType,
    Membership,
    Role,
    WebhookDelivery,
)
from marketplace.models.events import SnapshotXmin
from marketplace.services.api_keys import api_key_create, api_key_revoke
from marketplace.services.events import member_event_record
from marketplace.services.webhooks import webhook_endpoint_create
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

pytestmark = pytest.mark.django_db

# Every event family → the endpoint that lists its objects (the rule the feed must follow).
FAMILY_LISTS = {
    "reservation.": ReservationListApi,
    "listing.": ListingListApi,
    "payment.": TopUpListApi,
    "top_up.": TopUpListApi,
    "balance.": BalanceApi,
    "funding.": BalanceApi,
    "invoice.": InvoiceListApi,
    "api_key.": ApiKeyListApi,
    "member.": MemberListApi,
}
SCOPE_SETS = [
    [ApiKeyScope.READ],
    [ApiKeyScope.WRITE],
    [ApiKeyScope.READ, ApiKeyScope.WRITE, ApiKeyScope.BILLING],
    [ApiKeyScope.BILLING],
    [ApiKeyScope.GRID],
]
KEY_EVENTS = {EventType.API_KEY_CREATED, EventType.API_KEY_REVOKED}


def _contexts():
    for role in Role.values:
        yield role, OrgContext(organization=None, membership=Membership(role=role), api_key=None)
    for scopes in SCOPE_SETS:
        key = ApiKey(scopes=scopes)
        yield f"key {scopes}", OrgContext(organization=None, membership=None, api_key=key)


def test_each_event_family_is_shown_to_whoever_its_list_endpoint_lets_read():
    assert {t for t in EventType.values if not t.startswith(tuple(FAMILY_LISTS))} == set()
    for who, context in _contexts():
        if EventListApi().access_refusal(method="GET", org_context=context) is not None:
            continue  # cannot read events at all (a key without read): nothing to hide
        hidden = event_types_hidden(context)
        for type in EventType.values:
            (list_view,) = [v for p, v in FAMILY_LISTS.items() if type.startswith(p)]
            may_list = list_view().access_refusal(method="GET", org_context=context) is None
            assert (type not in hidden) == may_list, (who, type)


@pytest.fixture
def history(org, owner):
    """A key made and revoked by the owner, and a member added: {type: event}."""
    key, _ = api_key_create(organization=org, name="deploy", scopes=["read"], created_by=owner.user)
    api_key_revoke(api_key=key)
    member_event_record(membership=owner, type=EventType.MEMBER_ADDED)
    return {e.type: e for e in Event.objects.filter(organization=org)}


def _types(client, query: str = "") -> list[str]:
    response = client.get("/api/v1/events" + query)
    assert response.status_code == 200, response.content
    return [e["type"] for e in response.json()["results"]]


@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN])
def test_owners_and_admins_see_api_key_events(org, history, role):
    client = session_client(MembershipFactory(organization=org, role=role))
    assert _types(client) == ["member.added", "api_key.revoked", "api_key.created"]
    assert _types(client, "?type=api_key.created") == ["api_key.created"]
    created = history[EventType.API_KEY_CREATED]
    shown = client.get(f"/api/v1/events/{created.public_id}").json()
    assert (shown["type"], shown["data"]["object"]["name"]) == ("api_key.created", "deploy")


CALLERS = {
    "member": (Role.MEMBER, None, "insufficient_role"),
    "billing role": (Role.BILLING, None, "insufficient_role"),
    "read key": (None, [ApiKeyScope.READ], "session_required"),
    "write key": (None, [ApiKeyScope.WRITE], "session_required"),
    "every scope key": (None, [s.value for s in ApiKeyScope], "session_required"),
}


@pytest.mark.parametrize("caller", CALLERS)
def test_who_may_not_list_api_keys_sees_none_of_their_events(org, history, caller):
    role, scopes, code = CALLERS[caller]
    if role:
        client = session_client(MembershipFactory(organization=org, role=role))
    else:
        client = key_client(org, scopes=scopes)  # its own api_key.created is hidden too
    assert _types(client) == ["member.added"]
    key_id = history[EventType.API_KEY_CREATED].object_id
    assert _types(client, f"?object_id={key_id}") == []
    for type in KEY_EVENTS:
        event = history[type]
        assert_error(client.get(f"/api/v1/events/{event.public_id}"), 404, "event_not_found")
    # Asked for by type: refused as listing API keys is, not an empty page to wait on.
    for query in ("?type=api_key.created", "?type=member.added&type=api_key.revoked"):
        error = assert_error(client.get("/api/v1/events" + query), 403, code, field="type")
        assert error["message"].startswith("api_key.")
    assert_error(client.get("/api/v1/events?order=oldest&type=api_key.revoked"), 403, code)
    # The list endpoint says the same.
    assert_error(client.get("/api/v1/api-keys"), 403, code)


def test_a_key_that_cannot_read_is_refused_the_events_as_before(org, history):
    client = key_client(org, scopes=[ApiKeyScope.BILLING])
    assert_error(client.get("/api/v1/events"), 403, "insufficient_scope")


def test_webhook_endpoints_keep_receiving_every_type_they_subscribe_to(org, owner, settings):
    """An endpoint an owner set up is not narrowed by who reads the feed (one a key set up is:
    test_webhook_event_visibility.py)."""
    settings.WEBHOOK_ALLOW_INSECURE = True
    endpoint, _ = webhook_endpoint_create(
        organization=org, url="http://127.0.0.1:9/hook", event_types=[], created_by=owner.user
    )
    key, _ = api_key_create(organization=org, name="ci", scopes=["read"], created_by=owner.user)
    delivered = WebhookDelivery.objects.filter(endpoint=endpoint).values_list("event__type")
    assert list(delivered) == [("api_key.created",)]


# --- the forward feed: committed for real, as a poller sees it -------------------------------


def _settled(org, timeout: float = 120.0) -> None:
    """Wait until every event of org is settled (another test's open transaction holds the
    feed back for a while, never for good)."""
    deadline = time.monotonic() + timeout
    while Event.objects.filter(organization=org, txid__gte=SnapshotXmin()).exists():
        assert time.monotonic() < deadline, "events not settled"
        time.sleep(0.1)


@pytest.mark.django_db(transaction=True)
def test_a_member_polling_the_feed_passes_api_key_events_without_seeing_them(org, owner):
    member = MembershipFactory(organization=org, role=Role.MEMBER)
    client = session_client(member)
    member_event_record(membership=member, type=EventType.MEMBER_ADDED)
    key, _ = api_key_create(organization=org, name="ci", scopes=["read"], created_by=owner.user)
    _settled(org)

    first = client.get("/api/v1/events?order=oldest").json()
    assert [e["type"] for e in first["results"]] == ["member.added"]
    assert first["has_more"] is False
    # Caught up: it stands on the organisation's newest event, an api_key one it cannot read,
    # and goes on from there (a position, not a 404); what follows is shown.
    head = Event.objects.get(object_id=key.public_id)
    assert f"after={head.public_id}" in first["next"]
    assert_error(client.get(f"/api/v1/events/{head.public_id}"), 404, "event_not_found")
    api_key_revoke(api_key=key)
    member_event_record(membership=owner, type=EventType.MEMBER_ADDED)
    _settled(org)
    then = client.get(first["next"])
    assert then.status_code == 200, then.content
    assert [e["type"] for e in then.json()["results"]] == ["member.added"]
    assert [e["object_id"] for e in then.json()["results"]] == [owner.public_id]
