"""Webhooks against a real HTTP server on 127.0.0.1: signature, order, retries, disabling, SSRF.

DNS is the one thing replaced (socket.getaddrinfo, in the rebinding tests): no name here
resolves to a public address, and the test needs one that changes its answer.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import json
import socket
import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone
from switchyard.webhooks import SignatureError, verify_signature

from config.errors import Conflict
from marketplace.models import (
    ApiKeyScope,
    DeliveryStatus,
    Event,
    Role,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from marketplace.services.api_keys import api_key_create, api_key_revoke
from marketplace.services.webhook_sending import (
    EXCERPT_BYTES,
    webhook_backoff,
    webhook_endpoint_send,
    webhook_endpoints_due,
)
from marketplace.services.webhooks import (
    PREVIOUS_SECRETS_MAX,
    webhook_delivery_resend,
    webhook_endpoint_create,
    webhook_endpoint_rotate_secret,
    webhook_endpoint_secrets,
    webhook_endpoint_update,
)
from tests.factories import MembershipFactory, OrganizationFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    key_client,
    org,
    other_org,
    owner,
    owner_client,
    session_client,
)
from tests.webhook_receiver import receiver  # noqa: F401

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def insecure_allowed(settings):
    settings.WEBHOOK_ALLOW_INSECURE = True
    settings.WEBHOOK_TIMEOUT = 2
    return settings


def _endpoint(org, receiver, path="/hook", event_types=()):
    endpoint, secret = webhook_endpoint_create(
        organization=org, url=receiver.url + path, event_types=list(event_types)
    )
    return endpoint, secret


def _key_event(org, name="ci"):
    key, _ = api_key_create(organization=org, name=name, scopes=["read"], created_by=None)
    return key


def _send(endpoint):
    return webhook_endpoint_send(endpoint_id=endpoint.pk)


def _due_now(endpoint):
    WebhookDelivery.objects.filter(endpoint=endpoint, status="pending").update(
        next_attempt_at=timezone.now()
    )


# --- signature and body ----------------------------------------------------------------------


def test_a_delivery_is_the_event_signed_with_the_endpoints_secret(org, receiver):
    endpoint, secret = _endpoint(org, receiver)
    key = _key_event(org)

    assert _send(endpoint) == {"sent": 1, "failed": 0, "more": False}

    (request,) = receiver.received
    event = Event.objects.get(organization=org)
    body = json.loads(request.body)
    assert body["id"] == event.public_id
    assert body["type"] == "api_key.created"
    assert body["data"]["object"]["id"] == key.public_id
    assert request.headers["Host"] == f"127.0.0.1:{receiver.port}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Switchyard-Event-Id"] == event.public_id
    assert (
        verify_signature(
            payload=request.body, header=request.headers["Switchyard-Signature"], secret=secret
        )
        == body
    )
    header = request.headers["Switchyard-Signature"]
    assert abs(int(header.split(",")[0][2:]) - time.time()) < 5
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_response_status) == (
        DeliveryStatus.SUCCEEDED, 1, 200,
    )  # fmt: skip
    (attempt,) = WebhookAttempt.objects.all()
    assert (attempt.succeeded, attempt.response_status, attempt.response_excerpt) == (
        True, 200, "ok",
    )  # fmt: skip
    assert attempt.address == "127.0.0.1"


def test_a_tampered_body_another_secret_or_an_old_signature_is_refused(org, receiver):
    endpoint, secret = _endpoint(org, receiver)
    _key_event(org)
    _send(endpoint)
    (request,) = receiver.received
    header = request.headers["Switchyard-Signature"]

    with pytest.raises(SignatureError, match="No signature matches"):
        verify_signature(payload=request.body + b" ", header=header, secret=secret)
    with pytest.raises(SignatureError, match="No signature matches"):
        verify_signature(payload=request.body, header=header, secret="whsec_other")
    with pytest.raises(SignatureError, match="tolerance 300"):  # a replay ten minutes later
        verify_signature(payload=request.body, header=header, secret=secret,
                         now=time.time() + 600)  # fmt: skip
    with pytest.raises(SignatureError, match="No t="):
        verify_signature(payload=request.body, header="v1=abc", secret=secret)


def test_after_a_rotation_both_secrets_sign_until_the_overlap_ends(org, receiver, settings):
    settings.WEBHOOK_SECRET_OVERLAP = timedelta(hours=24)
    endpoint, old = _endpoint(org, receiver)
    endpoint, new = webhook_endpoint_rotate_secret(endpoint=endpoint)
    assert new != old and new.startswith("whsec_")
    _key_event(org, "one")
    _send(endpoint)
    header = receiver.received[-1].headers["Switchyard-Signature"]
    assert header.count("v1=") == 2
    for secret in (old, new):
        verify_signature(payload=receiver.received[-1].body, header=header, secret=secret)

    endpoint.refresh_from_db()
    endpoint.previous_secrets[0]["expires_at"] = (timezone.now() - timedelta(seconds=1)).isoformat()
    endpoint.save(update_fields=["previous_secrets"])
    _key_event(org, "two")
    _send(endpoint)
    header = receiver.received[-1].headers["Switchyard-Signature"]
    assert header.count("v1=") == 1
    verify_signature(payload=receiver.received[-1].body, header=header, secret=new)
    with pytest.raises(SignatureError):
        verify_signature(payload=receiver.received[-1].body, header=header, secret=old)


# --- who gets what ---------------------------------------------------------------------------


def test_deliveries_go_to_enabled_subscribed_endpoints_of_the_organisation_only(
    org, other_org, receiver
):
    everything, _ = _endpoint(org, receiver, "/all")
    revoked_only, _ = _endpoint(org, receiver, "/revoked", ["api_key.revoked"])
    disabled, _ = _endpoint(org, receiver, "/off")
    WebhookEndpoint.objects.filter(pk=disabled.pk).update(enabled=False)
    theirs, _ = _endpoint(other_org, receiver, "/theirs")

    api_key_revoke(api_key=_key_event(org))
    for endpoint in (everything, revoked_only, disabled, theirs):
        _send(endpoint)

    assert [json.loads(r.body)["type"] for r in receiver.on("/all")] == [
        "api_key.created",
        "api_key.revoked",
    ]
    assert [json.loads(r.body)["type"] for r in receiver.on("/revoked")] == ["api_key.revoked"]
    assert receiver.on("/off") == [] and receiver.on("/theirs") == []
    assert not WebhookDelivery.objects.filter(endpoint__in=[disabled, theirs]).exists()


def test_an_endpoints_deliveries_go_out_in_the_order_of_their_events(org, receiver):
    endpoint, _ = _endpoint(org, receiver)
    for name in ("a", "b", "c", "d"):
        _key_event(org, name)
    # Written in another order than created (ids say nothing): the sender goes by `created`.
    events = list(Event.objects.filter(organization=org).order_by("id"))
    base = timezone.now() - timedelta(minutes=1)
    for event, offset in zip(events, (3, 1, 0, 2), strict=True):
        Event.objects.filter(pk=event.pk).update(created_at=base + timedelta(seconds=offset))
        WebhookDelivery.objects.filter(event=event).update(
            event_created_at=base + timedelta(seconds=offset)
        )

    assert _send(endpoint)["sent"] == 4

    got = [json.loads(r.body)["created"] for r in receiver.received]
    assert got == sorted(got)
    assert [json.loads(r.body)["data"]["object"]["name"] for r in receiver.received] == [
        "c", "b", "d", "a",
    ]  # fmt: skip


# --- failures, retries, disabling ------------------------------------------------------------


def test_a_failed_delivery_is_retried_with_backoff_and_then_succeeds(org, receiver):
    endpoint, _ = _endpoint(org, receiver)
    _key_event(org)
    receiver.answer(500, b"x" * 5000)

    before = timezone.now()
    assert _send(endpoint) == {"sent": 0, "failed": 1, "more": False}
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts, delivery.last_response_status) == (
        DeliveryStatus.PENDING, 1, 500,
    )  # fmt: skip
    assert (
        before + timedelta(seconds=29) < delivery.next_attempt_at < before + timedelta(seconds=35)
    )
    attempt = WebhookAttempt.objects.get()
    assert len(attempt.response_excerpt) == EXCERPT_BYTES == 1000
    assert attempt.error == "HTTP 500"
    # Not due yet: nothing is sent.
    assert _send(endpoint)["failed"] == 0 and len(receiver.received) == 1
    assert webhook_endpoints_due() == []

    receiver.answer(204, b"")
    _due_now(endpoint)
    assert webhook_endpoints_due() == [endpoint.pk]
    assert _send(endpoint) == {"sent": 1, "failed": 0, "more": False}
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.SUCCEEDED, 2)
    assert [a.response_status for a in WebhookAttempt.objects.order_by("id")] == [500, 204]
    endpoint.refresh_from_db()
    assert endpoint.failing_since is None and endpoint.last_success_at is not None


def test_the_backoff_doubles_to_six_hours_and_retries_span_three_days():
    assert [webhook_backoff(n).total_seconds() for n in (1, 2, 3, 4)] == [30, 60, 120, 240]
    assert webhook_backoff(30) == timedelta(hours=6)
    total, n = timedelta(0), 0
    while total < timedelta(hours=72):
        n += 1
        total += webhook_backoff(n)
    assert 20 <= n <= 25  # about 22 tries in three days


def test_a_redirect_is_not_followed(org, receiver):
    endpoint, _ = _endpoint(org, receiver)
    _key_event(org)
    receiver.answer(302, b"", {"Location": receiver.url + "/elsewhere"})

    assert _send(endpoint)["failed"] == 1
    assert [r.path for r in receiver.received] == ["/hook"]
    assert WebhookAttempt.objects.get().error == "HTTP 302 (redirects are not followed)"


def test_a_slow_endpoint_times_out_quickly(org, receiver, settings):
    settings.WEBHOOK_TIMEOUT = 1
    endpoint, _ = _endpoint(org, receiver)
    _key_event(org)
    receiver.answer(200, b"late", delay=3)

    started = time.monotonic()
    assert _send(endpoint)["failed"] == 1
    assert time.monotonic() - started < 2.5
    attempt = WebhookAttempt.objects.get()
    assert "timed out" in attempt.error and 900 <= attempt.duration_ms < 2500


def test_a_dead_endpoint_is_a_failed_attempt_not_an_error(org, settings):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    endpoint, _ = webhook_endpoint_create(
        organization=org, url=f"http://127.0.0.1:{port}/", event_types=[]
    )
    _key_event(org)
    assert _send(endpoint)["failed"] == 1
    assert "could not connect" in WebhookAttempt.objects.get().error


def test_an_endpoint_failing_for_three_days_is_disabled_and_its_managers_emailed(
    org, owner, receiver, mailoutbox, django_capture_on_commit_callbacks, settings
):
    settings.WEBHOOK_RETRY_FOR = timedelta(hours=72)
    settings.SITE_URL = "https://example.com/switchyard/"
    MembershipFactory(organization=org, role=Role.MEMBER)  # not e-mailed
    # Nor an owner whose account was deactivated (it has lost its access).
    MembershipFactory(organization=org, role=Role.OWNER, user__is_active=False)
    # A URL may carry a secret (as chat services' webhook URLs do): the mail, which passes
    # through the broker, names the endpoint by its id and origin only.
    endpoint, _ = _endpoint(org, receiver, path="/hook/T0123/s3cr3t-path-token")
    _key_event(org, "old")
    receiver.answer(503, b"down")
    _send(endpoint)
    # Three days on: its first delivery's last try falls due, and fails too.
    three_days_ago = timezone.now() - timedelta(hours=72)
    WebhookDelivery.objects.update(retry_from=three_days_ago, next_attempt_at=timezone.now())
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(failing_since=three_days_ago)
    _key_event(org, "new")  # a younger delivery, still pending

    with django_capture_on_commit_callbacks(execute=True):
        result = _send(endpoint)

    assert result == {"sent": 0, "failed": 1, "more": False}
    endpoint.refresh_from_db()
    assert endpoint.enabled is False
    assert "for 72 hours" in endpoint.disabled_reason
    statuses = dict(WebhookDelivery.objects.values_list("event__data__name", "status"))
    assert statuses == {"old": DeliveryStatus.FAILED, "new": DeliveryStatus.FAILED}
    (mail,) = mailoutbox
    assert mail.to == [owner.user.email]
    assert endpoint.public_id in mail.body
    assert f"{receiver.url} ({endpoint.public_id})" in mail.body
    assert "s3cr3t-path-token" not in mail.body
    # With a link to the endpoint's page in the portal, on SITE_URL (its path included).
    assert f"https://example.com/switchyard/webhooks/{endpoint.public_id}\n" in mail.body
    # Disabled: new events make no deliveries, and the sender does not touch it.
    _key_event(org, "later")
    assert WebhookDelivery.objects.count() == 2
    assert _send(endpoint) == {"sent": 0, "failed": 0, "more": False}


def test_one_failing_delivery_does_not_disable_an_endpoint_that_succeeds(org, receiver):
    endpoint, _ = _endpoint(org, receiver)
    _key_event(org, "a")
    receiver.answer(500, b"no")
    _send(endpoint)
    receiver.answer(200, b"ok")
    _key_event(org, "b")
    _send(endpoint)  # only b is due; it succeeds
    endpoint.refresh_from_db()
    assert endpoint.enabled and endpoint.failing_since is None


def test_resend_sends_a_delivered_event_again(org, receiver):
    endpoint, _ = _endpoint(org, receiver)
    _key_event(org)
    _send(endpoint)
    delivery = WebhookDelivery.objects.get()

    webhook_delivery_resend(delivery=delivery)
    assert _send(endpoint)["sent"] == 1

    assert len(receiver.received) == 2
    assert receiver.received[0].body == receiver.received[1].body
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.SUCCEEDED, 2)


@pytest.mark.django_db(transaction=True)
def test_a_slow_endpoint_does_not_hold_up_another_organisations(receiver, settings):
    settings.WEBHOOK_TIMEOUT = 5
    slow_org, fast_org = OrganizationFactory(), OrganizationFactory()
    slow, _ = _endpoint(slow_org, receiver, "/slow")
    fast, _ = _endpoint(fast_org, receiver, "/fast")
    receiver.answer(200, b"", delay=2, path="/slow")
    _key_event(slow_org)
    _key_event(fast_org)

    def send_slow():
        from django.db import connection

        _send(slow)
        connection.close()

    thread = threading.Thread(target=send_slow)
    thread.start()
    receiver.wait_for("/slow")  # the slow endpoint's sender is waiting on it now
    started = time.monotonic()
    assert _send(fast)["sent"] == 1
    assert time.monotonic() - started < 1
    assert thread.is_alive()
    # Its own endpoint is leased meanwhile: a second sender does not pile on.
    assert _send(slow) == {"sent": 0, "failed": 0, "more": False}
    thread.join()
    assert [r.path for r in receiver.received] == ["/slow", "/fast"]


# --- SSRF ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, code",
    [
        ("http://hooks.example.com/x", "webhook_url_scheme"),
        ("ftp://93.184.216.34/x", "webhook_url_scheme"),
        ("https://127.0.0.1/x", "webhook_url_unsafe"),
        ("https://[::1]/x", "webhook_url_unsafe"),
        ("https://localhost/x", "webhook_url_unsafe"),
        ("https://10.1.2.3/x", "webhook_url_unsafe"),
        ("https://172.16.0.9/x", "webhook_url_unsafe"),
        ("https://192.168.1.1/x", "webhook_url_unsafe"),
        ("https://169.254.169.254/latest/meta-data", "webhook_url_unsafe"),
        ("https://100.64.0.1/x", "webhook_url_unsafe"),
        ("https://0.0.0.0/x", "webhook_url_unsafe"),
        ("https://[::ffff:127.0.0.1]/x", "webhook_url_unsafe"),
        ("https://[fd00:ec2::254]/x", "webhook_url_unsafe"),
        # 127.0.0.1 inside an IPv6 address a translator or relay would reach it by.
        ("https://[64:ff9b::7f00:1]/x", "webhook_url_unsafe"),  # NAT64
        ("https://[2002:7f00:1::]/x", "webhook_url_unsafe"),  # 6to4
        ("https://[64:ff9b:1::a00:1]/x", "webhook_url_unsafe"),  # local-use NAT64
        ("https://192.0.0.8/x", "webhook_url_unsafe"),  # IETF protocol assignments
        ("https://[::7f00:1]/x", "webhook_url_unsafe"),  # IPv4-compatible (reserved ::/8)
        ("https://[fec0::1]/x", "webhook_url_unsafe"),  # site-local
        ("https://user:pw@93.184.216.34/x", "webhook_url_invalid"),
        ("https://no-such-host.invalid/x", "webhook_url_unresolvable"),
    ],
)
def test_registration_refuses_unsafe_urls_in_production(org, owner_client, settings, url, code):
    settings.WEBHOOK_ALLOW_INSECURE = False
    response = owner_client.post("/api/v1/webhook-endpoints", {"url": url}, format="json")
    assert_error(response, 400, code, "url")
    assert not WebhookEndpoint.objects.exists()


def test_a_public_https_url_is_accepted_in_production(org, owner_client, settings):
    settings.WEBHOOK_ALLOW_INSECURE = False
    response = owner_client.post(
        "/api/v1/webhook-endpoints", {"url": "https://93.184.216.34/hooks"}, format="json"
    )
    assert response.status_code == 201, response.content


def _dns(monkeypatch, answers: dict[str, list[str]]):
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host in answers:
            return [
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))
                for address in answers[host]
            ]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_a_name_that_resolves_to_any_private_address_is_refused(
    org, owner_client, settings, monkeypatch
):
    settings.WEBHOOK_ALLOW_INSECURE = False
    _dns(monkeypatch, {"hooks.customer.example": ["93.184.216.34", "10.0.0.5"]})
    response = owner_client.post(
        "/api/v1/webhook-endpoints", {"url": "https://hooks.customer.example/x"}, format="json"
    )
    assert_error(response, 400, "webhook_url_unsafe", "url")


def test_dns_rebinding_after_registration_is_caught_at_delivery(
    org, receiver, settings, monkeypatch
):
    """Registered while the name pointed at a public address; at delivery time it points at
    the loopback address where something listens: no request leaves."""
    settings.WEBHOOK_ALLOW_INSECURE = False
    _dns(monkeypatch, {"hooks.customer.example": ["93.184.216.34"]})
    endpoint, _ = webhook_endpoint_create(
        organization=org, url=f"https://hooks.customer.example:{receiver.port}/x", event_types=[]
    )
    _key_event(org)
    _dns(monkeypatch, {"hooks.customer.example": ["127.0.0.1"]})

    assert _send(endpoint)["failed"] == 1

    assert receiver.received == []
    attempt = WebhookAttempt.objects.get()
    assert "127.0.0.1 is not" in attempt.error and attempt.response_status is None


# --- the API ---------------------------------------------------------------------------------


def test_the_api_registers_an_endpoint_and_shows_its_secret_once(org, owner_client, receiver):
    response = owner_client.post(
        "/api/v1/webhook-endpoints",
        {"url": receiver.url + "/hook", "event_types": ["reservation.active"],
         "description": "prod"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="create-1",
    )  # fmt: skip
    assert response.status_code == 201, response.content
    created = response.json()
    assert created["secret"].startswith("whsec_")
    assert created["event_types"] == ["reservation.active"]
    assert created["enabled"] is True
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.secret == created["secret"]

    listed = owner_client.get("/api/v1/webhook-endpoints").json()["results"]
    assert [e["id"] for e in listed] == [created["id"]] and "secret" not in listed[0]
    replay = owner_client.post(
        "/api/v1/webhook-endpoints",
        {"url": receiver.url + "/hook", "event_types": ["reservation.active"],
         "description": "prod"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="create-1",
    )  # fmt: skip
    assert replay.json()["secret"] is None and WebhookEndpoint.objects.count() == 1

    rotated = owner_client.post(f"/api/v1/webhook-endpoints/{created['id']}/rotate-secret")
    assert rotated.status_code == 200
    assert rotated.json()["secret"] not in (None, created["secret"])
    assert rotated.json()["previous_secret_expires_at"] is not None


def test_each_replaced_secret_keeps_its_own_overlap(org, receiver, settings):
    """A second rotation within the overlap does not cut the first one's promise short."""
    settings.WEBHOOK_SECRET_OVERLAP = timedelta(hours=24)
    start = timezone.now()
    endpoint, first = _endpoint(org, receiver)
    endpoint, second = webhook_endpoint_rotate_secret(endpoint=endpoint, now=start)
    endpoint, third = webhook_endpoint_rotate_secret(
        endpoint=endpoint, now=start + timedelta(hours=2)
    )
    assert endpoint.previous_secret_expiries == [
        start + timedelta(hours=24),
        start + timedelta(hours=26),
    ]
    assert webhook_endpoint_secrets(endpoint, now=start + timedelta(hours=3)) == [
        third,
        first,
        second,
    ]
    # Past the first overlap, only the first secret has stopped.
    later = start + timedelta(hours=25)
    assert webhook_endpoint_secrets(endpoint, now=later) == [third, second]
    _key_event(org, "one")
    _send(endpoint)
    header = receiver.received[-1].headers["Switchyard-Signature"]
    assert header.count("v1=") == 3
    for secret in (first, second, third):
        verify_signature(payload=receiver.received[-1].body, header=header, secret=secret)


def test_rotations_in_flight_are_capped_and_expire_previous_ends_them(org, receiver, settings):
    settings.WEBHOOK_SECRET_OVERLAP = timedelta(hours=24)
    endpoint, first = _endpoint(org, receiver)
    for _ in range(PREVIOUS_SECRETS_MAX):
        endpoint, current = webhook_endpoint_rotate_secret(endpoint=endpoint)
    with pytest.raises(Conflict) as refused:
        webhook_endpoint_rotate_secret(endpoint=endpoint)
    assert refused.value.code == "too_many_signing_secrets"
    endpoint.refresh_from_db()
    assert endpoint.secret == current and len(endpoint.previous_secrets) == PREVIOUS_SECRETS_MAX

    # A leaked secret: the new one alone signs from now on.
    endpoint, fresh = webhook_endpoint_rotate_secret(endpoint=endpoint, expire_previous=True)
    assert webhook_endpoint_secrets(endpoint, now=timezone.now()) == [fresh]
    assert endpoint.previous_secret_expires_at is None
    # Expired ones are dropped at the next rotation, so the cap counts only those that sign.
    settings.WEBHOOK_SECRET_OVERLAP = timedelta(0)
    endpoint, newest = webhook_endpoint_rotate_secret(endpoint=endpoint)
    assert endpoint.previous_secrets == [] and newest != fresh


def test_the_api_rotates_with_expire_previous_and_refuses_bad_input(org, owner_client, receiver):
    endpoint, _ = _endpoint(org, receiver)
    url = f"/api/v1/webhook-endpoints/{endpoint.public_id}/rotate-secret"
    rotated = owner_client.post(url, {}, format="json").json()
    assert len(rotated["previous_secrets_expire_at"]) == 1
    assert rotated["previous_secret_expires_at"] == rotated["previous_secrets_expire_at"][0]
    bad = owner_client.post(url, {"expire_previous": "soon"}, format="json")
    assert bad.status_code == 400
    unknown = owner_client.post(url, {"expire_previus": True}, format="json")
    assert_error(unknown, 400, "unknown_field")
    endpoint.refresh_from_db()
    assert endpoint.secret == rotated["secret"]  # the refused requests changed nothing
    ended = owner_client.post(url, {"expire_previous": True}, format="json").json()
    assert ended["previous_secrets_expire_at"] == [] and ended["previous_secret_expires_at"] is None
    assert webhook_endpoint_secrets(WebhookEndpoint.objects.get(), now=timezone.now()) == [
        ended["secret"]
    ]


def test_the_api_changes_disables_and_deletes_an_endpoint(org, owner_client, receiver):
    endpoint, _ = _endpoint(org, receiver)
    url = f"/api/v1/webhook-endpoints/{endpoint.public_id}"

    response = owner_client.patch(
        url, {"enabled": False, "event_types": ["api_key.created"]}, format="json"
    )
    assert response.status_code == 200, response.content
    assert (response.json()["enabled"], response.json()["event_types"]) == (
        False, ["api_key.created"],
    )  # fmt: skip
    assert_error(
        owner_client.patch(url, {"event_types": ["nope"]}, format="json"),
        400,
        field="event_types.0",
    )
    assert WebhookEndpoint.objects.get().event_types == ["api_key.created"]
    assert owner_client.delete(url).status_code == 204
    assert_error(owner_client.get(url), 404, "webhook_endpoint_not_found")


def test_the_api_lists_deliveries_with_attempts_and_resends(org, owner_client, receiver):
    endpoint, _ = _endpoint(org, receiver)
    _key_event(org)
    receiver.answer(500, b"boom")
    _send(endpoint)

    body = owner_client.get(f"/api/v1/webhook-endpoints/{endpoint.public_id}/deliveries").json()
    (delivery,) = body["results"]
    assert delivery["status"] == "pending" and delivery["event_type"] == "api_key.created"
    (attempt,) = delivery["attempts"]
    assert (attempt["succeeded"], attempt["response_status"], attempt["response_excerpt"]) == (
        False, 500, "boom",
    )  # fmt: skip

    receiver.answer(200)
    response = owner_client.post(f"/api/v1/webhook-deliveries/{delivery['id']}/resend")
    assert response.status_code == 202
    _send(endpoint)
    assert WebhookDelivery.objects.get().status == DeliveryStatus.SUCCEEDED


def test_only_owners_and_admins_manage_webhooks_and_other_orgs_are_invisible(
    org, other_org, receiver
):
    member = session_client(MembershipFactory(organization=org, role=Role.MEMBER))
    assert_error(member.get("/api/v1/webhook-endpoints"), 403, "insufficient_role")
    theirs, _ = _endpoint(other_org, receiver)
    admin = session_client(MembershipFactory(organization=org, role=Role.ADMIN))
    assert_error(admin.get(f"/api/v1/webhook-endpoints/{theirs.public_id}"), 404)
    assert admin.get("/api/v1/webhook-endpoints").json()["results"] == []
    # A write key may manage them (the CLI does).
    key = key_client(org)
    response = key.post("/api/v1/webhook-endpoints", {"url": receiver.url + "/k"}, format="json")
    assert response.status_code == 201, response.content
    # A read-only key (dashboards, exports) sees neither the endpoints nor the receivers'
    # answers in their deliveries: as a member, it is not one who manages them.
    reader = key_client(org, scopes=[ApiKeyScope.READ])
    created = response.json()["id"]
    for path in ("/api/v1/webhook-endpoints", f"/api/v1/webhook-endpoints/{created}",
                 f"/api/v1/webhook-endpoints/{created}/deliveries"):  # fmt: skip
        assert_error(reader.get(path), 403, "insufficient_scope")


def test_the_audit_log_never_holds_a_webhook_urls_path_or_query(org, owner_client, receiver):
    """A URL may carry a secret (chat services' webhook URLs do); a read-only key, which may
    not read the endpoints, reads the audit log, which keeps every entry for ever."""
    secret_url = receiver.url + "/services/T0/B0/tok3n-in-path?sig=tok3n-in-query"
    created = owner_client.post(
        "/api/v1/webhook-endpoints", {"url": secret_url}, format="json"
    ).json()
    path = f"/api/v1/webhook-endpoints/{created['id']}"
    moved = receiver.url + "/services/T0/B0/other-tok3n"
    assert owner_client.patch(path, {"url": moved}, format="json").status_code == 200
    assert owner_client.delete(path).status_code == 204

    reader = key_client(org, scopes=[ApiKeyScope.READ])
    response = reader.get("/api/v1/audit-log", {"action": "webhook_endpoint."})
    assert response.status_code == 200
    entries = response.json()["results"]
    assert [e["action"] for e in entries] == [
        "webhook_endpoint.delete",
        "webhook_endpoint.update",
        "webhook_endpoint.create",
    ]
    assert "tok3n" not in json.dumps(entries)
    # A change of path alone is still seen as a change, and the origin is kept.
    update = entries[1]["changes"]
    assert update["before"]["url"] != update["after"]["url"]
    assert update["after"]["url"].startswith(receiver.url + "/… (sha256:")


def test_a_dead_address_among_several_does_not_fail_the_delivery(org, receiver, monkeypatch):
    """The name has two addresses; the first refuses connections (nothing listens on
    127.0.0.2), the second is the receiver: the try goes on to the second."""
    _dns(monkeypatch, {"hooks.customer.example": ["127.0.0.2", "127.0.0.1"]})
    endpoint, _ = webhook_endpoint_create(
        organization=org, url=f"http://hooks.customer.example:{receiver.port}/x", event_types=[]
    )
    _key_event(org)

    assert _send(endpoint) == {"sent": 1, "failed": 0, "more": False}

    assert len(receiver.received) == 1
    assert WebhookAttempt.objects.get().address == "127.0.0.1"


def test_when_every_address_is_dead_the_attempt_names_each(org, monkeypatch):
    _dns(monkeypatch, {"hooks.customer.example": ["127.0.0.2", "127.0.0.3"]})
    endpoint, _ = webhook_endpoint_create(
        organization=org, url="http://hooks.customer.example:9/x", event_types=[]
    )
    _key_event(org)

    assert _send(endpoint)["failed"] == 1

    error = WebhookAttempt.objects.get().error
    assert error.startswith("could not connect to 127.0.0.2: ")
    assert "; 127.0.0.3: " in error


def test_an_internationalised_host_name_is_sent_as_its_ascii_form(org, receiver, monkeypatch):
    """Host carries the name as DNS knows it (IDNA, xn--…): http.client cannot put a
    Cyrillic name in a header, and the sender crashed on every try, recording none."""
    _dns(monkeypatch, {"пример.рф": ["127.0.0.1"], "xn--e1afmkfd.xn--p1ai": ["127.0.0.1"]})
    endpoint, _ = webhook_endpoint_create(
        organization=org, url=f"http://пример.рф:{receiver.port}/x", event_types=[]
    )
    _key_event(org)

    assert _send(endpoint) == {"sent": 1, "failed": 0, "more": False}

    (received,) = receiver.received
    assert received.headers["Host"] == f"xn--e1afmkfd.xn--p1ai:{receiver.port}"


def test_a_resent_delivery_that_fails_is_retried_as_a_new_one_would_be(org, receiver):
    """The backoff counts the tries since the resend, not every try the delivery ever had: a
    delivery that failed for days and is resent is retried after 30 s, not after 6 hours."""
    endpoint, _ = _endpoint(org, receiver)
    _key_event(org)
    receiver.answer(500, b"down")
    _send(endpoint)
    WebhookDelivery.objects.update(attempts=20, status=DeliveryStatus.FAILED, next_attempt_at=None)
    delivery = WebhookDelivery.objects.get()

    webhook_delivery_resend(delivery=delivery)
    before = timezone.now()
    assert _send(endpoint) == {"sent": 0, "failed": 1, "more": False}

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 21)
    assert (
        before + timedelta(seconds=29) < delivery.next_attempt_at < before + timedelta(seconds=35)
    )
    # And doubling from there: the second try after the resend waits a minute.
    _due_now(endpoint)
    before = timezone.now()
    assert _send(endpoint)["failed"] == 1
    delivery.refresh_from_db()
    assert (
        before + timedelta(seconds=59) < delivery.next_attempt_at < before + timedelta(seconds=65)
    )


def test_enabling_again_retries_what_waited_from_now_not_from_its_event(org, receiver):
    """Switched off for days with a delivery waiting, then on: its first failure set the
    endpoint failing since the event's time, days ago, and disabled it again at once."""
    endpoint, _ = _endpoint(org, receiver)
    _key_event(org)
    long_ago = timezone.now() - timedelta(days=5)
    WebhookDelivery.objects.update(retry_from=long_ago)
    webhook_endpoint_update(endpoint=endpoint, enabled=False)
    webhook_endpoint_update(endpoint=endpoint, enabled=True)
    receiver.answer(500, b"down")
    _due_now(endpoint)

    before = timezone.now()
    assert _send(endpoint)["failed"] == 1

    endpoint.refresh_from_db()
    delivery = WebhookDelivery.objects.get()
    assert endpoint.enabled and endpoint.failing_since >= before - timedelta(seconds=5)
    assert delivery.status == DeliveryStatus.PENDING
    assert delivery.next_attempt_at < before + timedelta(seconds=35)
