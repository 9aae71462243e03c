"""Outgoing webhook deliveries against hostile or odd receivers: a NUL in an answer, an answer
trickled a byte at a time, a resend to a disabled endpoint, a URL with a "/" in its query.

Real HTTP servers on 127.0.0.1 (tests/webhook_receiver.py), real PostgreSQL; the threaded
tests race real senders on their own connections.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import socket
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.utils import timezone

from config.errors import Conflict, ValidationFailed
from marketplace.models import (
    AuditEntry,
    DeliveryStatus,
    Role,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from marketplace.services import webhook_sending
from marketplace.services.api_keys import api_key_create
from marketplace.services.webhook_sending import SEND_BUDGET, Outcome, webhook_endpoint_send
from marketplace.services.webhooks import (
    webhook_delivery_resend,
    webhook_endpoint_create,
    webhook_endpoint_update,
)
from tests.factories import OrganizationFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    org,
    owner,
    owner_client,
)
from tests.marketplace.market_helpers import member_client
from tests.webhook_receiver import receiver, trickle_receiver  # noqa: F401

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def insecure_allowed(settings):
    settings.WEBHOOK_ALLOW_INSECURE = True
    settings.WEBHOOK_TIMEOUT = 2
    return settings


def _endpoint(org, url):
    endpoint, _ = webhook_endpoint_create(organization=org, url=url, event_types=[])
    return endpoint


def _key_event(org, name="ci"):
    api_key_create(organization=org, name=name, scopes=["read"], created_by=None)


def _send(endpoint):
    return webhook_endpoint_send(endpoint_id=endpoint.pk)


def _in_thread(target) -> threading.Thread:
    def run():
        try:
            target()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_for_requests(trickle_receiver, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(trickle_receiver.requests) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(trickle_receiver.requests) == n


# --- a NUL in the receiver's answer ----------------------------------------------------------


@pytest.mark.parametrize(
    "status, body, excerpt, result",
    [
        (500, b"bad\x00answer", "bad\ufffdanswer", {"sent": 0, "failed": 1, "more": False}),
        (200, b"ok\x00", "ok\ufffd", {"sent": 1, "failed": 0, "more": False}),
    ],
)
def test_an_answer_with_a_nul_byte_is_recorded_and_not_sent_again_at_once(
    org, receiver, status, body, excerpt, result
):
    endpoint = _endpoint(org, receiver.url + "/hook")
    _key_event(org)
    receiver.answer(status, body)

    assert _send(endpoint) == result

    (attempt,) = WebhookAttempt.objects.all()
    assert (attempt.response_status, attempt.response_excerpt) == (status, excerpt)
    delivery = WebhookDelivery.objects.get()
    assert delivery.attempts == 1
    if status == 500:
        assert delivery.status == DeliveryStatus.PENDING
        assert delivery.next_attempt_at > timezone.now() + timedelta(seconds=20)  # backed off
    else:
        assert delivery.status == DeliveryStatus.SUCCEEDED
    # Nothing is due: the next pass sends nothing, the lease is released.
    assert _send(endpoint) == {"sent": 0, "failed": 0, "more": False}
    assert len(receiver.received) == 1
    endpoint.refresh_from_db()
    assert endpoint.sending_until is None


def test_a_try_whose_answer_the_database_refuses_is_still_recorded(org, receiver, monkeypatch):
    # As if the cleaning missed something PostgreSQL refuses: the try must count all the same.
    monkeypatch.setattr(webhook_sending, "_storable", lambda text: text)
    endpoint = _endpoint(org, receiver.url + "/hook")
    _key_event(org, "first")
    receiver.answer(500, b"bad\x00answer")

    assert _send(endpoint) == {"sent": 0, "failed": 1, "more": False}

    (attempt,) = WebhookAttempt.objects.all()
    assert (attempt.succeeded, attempt.response_status) == (False, 500)
    assert attempt.response_excerpt == "bad\\x00answer"
    assert attempt.error == "the answer could not be stored as sent: 'HTTP 500'"
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    assert delivery.next_attempt_at > timezone.now() + timedelta(seconds=20)
    # A later event is not held behind it.
    receiver.answer(200, b"ok")
    _key_event(org, "second")
    assert _send(endpoint) == {"sent": 1, "failed": 0, "more": False}
    assert len(receiver.received) == 2


# --- a receiver that trickles its answer -----------------------------------------------------


def test_a_trickled_answer_is_cut_off_at_the_deadline(org, trickle_receiver, settings):
    settings.WEBHOOK_TIMEOUT = 1
    endpoint = _endpoint(org, trickle_receiver.url + "/hook")
    _key_event(org)

    started = time.monotonic()
    assert _send(endpoint) == {"sent": 0, "failed": 1, "more": False}
    assert time.monotonic() - started < 1.8  # not the receiver's 5 s, one byte at a time

    attempt = WebhookAttempt.objects.get()
    assert attempt.error == "timed out: no complete answer within 1 s"
    assert 900 <= attempt.duration_ms < 1500
    assert WebhookDelivery.objects.get().status == DeliveryStatus.PENDING


def test_the_lease_follows_the_timeout_setting(org, receiver, settings, monkeypatch):
    settings.WEBHOOK_TIMEOUT = 300  # an operator's choice: the lease must still outlast a try
    endpoint = _endpoint(org, receiver.url + "/hook")
    _key_event(org)
    leases = []

    def post(**kwargs):
        leases.append(WebhookEndpoint.objects.get(pk=endpoint.pk).sending_until - timezone.now())
        return Outcome(True, 200, "ok", "", "127.0.0.1", 5)

    monkeypatch.setattr(webhook_sending, "webhook_post", post)
    assert _send(endpoint)["sent"] == 1
    (lease,) = leases
    assert lease > SEND_BUDGET + timedelta(seconds=300)


@pytest.mark.django_db(transaction=True)
def test_a_second_sender_never_sends_while_a_slow_try_is_in_flight(
    trickle_receiver, settings, monkeypatch
):
    # Small numbers to keep it fast (the lease is then 2 × (0.5 s + 1 s) = 3 s); the receiver
    # trickles for 5 s, longer than that lease.
    settings.WEBHOOK_TIMEOUT = 1
    monkeypatch.setattr(webhook_sending, "SEND_BUDGET", timedelta(seconds=0.5))
    org = OrganizationFactory()
    endpoint = _endpoint(org, trickle_receiver.url + "/hook")
    _key_event(org)
    first = _in_thread(lambda: _send(endpoint))
    _wait_for_requests(trickle_receiver, 1)
    others = []
    while first.is_alive():  # another worker, and the sweeper's kicks, all the while
        others.append(_send(endpoint))
        time.sleep(0.1)
    first.join()

    assert others and all(r == {"sent": 0, "failed": 0, "more": False} for r in others)
    assert len(trickle_receiver.requests) == 1
    attempt = WebhookAttempt.objects.get()
    assert attempt.duration_ms < 1500
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)


@pytest.mark.django_db(transaction=True)
def test_a_sender_releases_only_its_own_lease(trickle_receiver):
    org = OrganizationFactory()
    endpoint = _endpoint(org, trickle_receiver.url + "/hook")
    _key_event(org)
    first = _in_thread(lambda: _send(endpoint))
    _wait_for_requests(trickle_receiver, 1)
    # Its lease lapses mid-try (as it would had the try outlived it); a second sender claims.
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(
        sending_until=timezone.now() - timedelta(seconds=1)
    )
    time.sleep(1)
    second = _in_thread(lambda: _send(endpoint))
    _wait_for_requests(trickle_receiver, 2)
    first.join()  # 2 s after it started; the second has about a second to go

    assert second.is_alive()
    endpoint.refresh_from_db()
    assert endpoint.sending_until > timezone.now()  # still the second's
    assert _send(endpoint) == {"sent": 0, "failed": 0, "more": False}
    second.join()
    endpoint.refresh_from_db()
    assert endpoint.sending_until is None
    assert len(trickle_receiver.requests) == 2


# --- resend on a disabled endpoint -----------------------------------------------------------


def _failed_delivery_on_disabled_endpoint(org, receiver):
    endpoint = _endpoint(org, receiver.url + "/hook")
    _key_event(org)
    receiver.answer(500, b"down")
    _send(endpoint)
    webhook_endpoint_update(endpoint=endpoint, enabled=False)
    delivery = WebhookDelivery.objects.get()
    before = (delivery.status, delivery.retry_from, delivery.next_attempt_at, delivery.attempts)
    return endpoint, delivery, before


def _unchanged(delivery, before):
    delivery.refresh_from_db()
    after = (delivery.status, delivery.retry_from, delivery.next_attempt_at, delivery.attempts)
    assert after == before
    assert not AuditEntry.objects.filter(action="webhook_delivery.resend").exists()


def test_resend_to_a_disabled_endpoint_is_refused_and_changes_nothing(org, receiver):
    endpoint, delivery, before = _failed_delivery_on_disabled_endpoint(org, receiver)

    with pytest.raises(Conflict) as refused:
        webhook_delivery_resend(delivery=delivery)

    assert refused.value.code == "endpoint_disabled"
    assert "enable it first" in refused.value.message
    _unchanged(delivery, before)
    # Enabled again, the resend goes out.
    webhook_endpoint_update(endpoint=endpoint, enabled=True)
    receiver.answer(200)
    webhook_delivery_resend(delivery=delivery)
    assert _send(endpoint)["sent"] == 1


def test_the_api_refuses_a_resend_to_a_disabled_endpoint_with_409(org, owner_client, receiver):
    _, delivery, before = _failed_delivery_on_disabled_endpoint(org, receiver)

    response = owner_client.post(f"/api/v1/webhook-deliveries/{delivery.public_id}/resend")

    assert_error(response, 409, "endpoint_disabled")
    _unchanged(delivery, before)


def test_the_portal_says_a_resend_to_a_disabled_endpoint_is_refused(org, receiver):
    endpoint, delivery, before = _failed_delivery_on_disabled_endpoint(org, receiver)
    client = member_client(org, Role.OWNER)

    response = client.post(
        f"/webhooks/{endpoint.public_id}", {"action": "resend", "delivery": delivery.public_id}
    )

    assert response.status_code == 409
    assert "enable it first" in response.content.decode()
    _unchanged(delivery, before)


def test_the_admin_says_a_resend_to_a_disabled_endpoint_is_refused(org, receiver, client):
    _, delivery, before = _failed_delivery_on_disabled_endpoint(org, receiver)
    client.force_login(get_user_model().objects.create_superuser("staff", "s@example.com", "pw"))

    response = client.post(
        "/admin/marketplace/webhookdelivery/",
        {"action": "resend", "_selected_action": [delivery.pk]},
        follow=True,
    )

    assert response.status_code == 200
    page = response.content.decode()
    assert "enable it first" in page and "queued again" not in page
    _unchanged(delivery, before)


# --- the request target ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "suffix, target",
    [
        ("?x=/y", "/?x=/y"),
        ("/p/q?x=/y&z=1", "/p/q?x=/y&z=1"),
        ("/p?x=/y#frag/ment", "/p?x=/y"),
        ("#a/b", "/"),
    ],
)
def test_the_request_goes_to_the_urls_own_path_and_query(org, receiver, suffix, target):
    endpoint = _endpoint(org, receiver.url + suffix)
    _key_event(org)

    assert _send(endpoint)["sent"] == 1

    assert [r.path for r in receiver.received] == [target]


# --- a resolver that hangs -------------------------------------------------------------------


@pytest.fixture
def hung_resolver(monkeypatch):
    """socket.getaddrinfo for hooks.customer.example never answers (a dead name server) until
    the test ends; other names resolve as usual. Replaced because nothing here can make the
    system resolver hang on cue. Yields an event set once the name is asked for."""
    asked, release = threading.Event(), threading.Event()
    real = socket.getaddrinfo

    def fake(host, port, *args, **kwargs):
        if host == "hooks.customer.example":
            asked.set()
            release.wait(30)
            raise socket.gaierror("the resolver gave up")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    yield asked
    release.set()


def test_a_hung_resolver_does_not_hold_a_try_past_its_deadline(org, settings, hung_resolver):
    settings.WEBHOOK_TIMEOUT = 1
    endpoint = _endpoint(org, "http://127.0.0.1:9/hook")
    # Registered while the name resolved; its name server has since died.
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(url="https://hooks.customer.example/x")
    _key_event(org)

    started = time.monotonic()
    result = _send(endpoint)
    took = time.monotonic() - started

    assert result == {"sent": 0, "failed": 1, "more": False}
    assert took < 1.8  # the try's 1 s, not the resolver's 30
    attempt = WebhookAttempt.objects.get()
    assert attempt.error == "The host 'hooks.customer.example' did not resolve within 1 s."
    assert 900 <= attempt.duration_ms < 1500 and attempt.response_status is None
    delivery = WebhookDelivery.objects.get()
    assert (delivery.status, delivery.attempts) == (DeliveryStatus.PENDING, 1)
    endpoint.refresh_from_db()
    assert endpoint.sending_until is None  # released on time, well inside its lease


def test_registration_with_a_hung_resolver_is_refused_within_the_timeout(
    org, owner_client, settings, hung_resolver
):
    settings.WEBHOOK_TIMEOUT = 1
    settings.WEBHOOK_ALLOW_INSECURE = False
    started = time.monotonic()
    response = owner_client.post(
        "/api/v1/webhook-endpoints", {"url": "https://hooks.customer.example/x"}, format="json"
    )

    assert time.monotonic() - started < 1.8
    assert_error(response, 400, "webhook_url_unresolvable", "url")
    assert not WebhookEndpoint.objects.exists()


# --- an IPv6 literal in the URL --------------------------------------------------------------


def test_a_url_with_an_ipv6_literal_sends_a_valid_host_header(org):
    """Host: [::1]:port, as RFC 9110 writes an IPv6 literal; without brackets a receiver's
    server (nginx, any proxy) refuses the request as malformed."""
    server = ThreadingHTTPServer(("::1", 0), None, bind_and_activate=False)
    server.address_family = socket.AF_INET6
    server.socket = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    server.server_bind()
    server.server_activate()
    port = server.server_address[1]
    hosts = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the standard library's name
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            hosts.append(self.headers["Host"])
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server.RequestHandlerClass = Handler
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = _endpoint(org, f"http://[::1]:{port}/hook")
        _key_event(org)
        assert _send(endpoint) == {"sent": 1, "failed": 0, "more": False}
    finally:
        server.shutdown()
        server.server_close()

    assert hosts == [f"[::1]:{port}"]


@pytest.mark.django_db(transaction=True)
def test_a_slow_lookup_of_a_new_url_does_not_lock_the_endpoint(settings, hung_resolver):
    """The sender records its tries under the endpoint's row lock: a change of URL whose name
    server hangs must not hold that lock while it waits."""
    settings.WEBHOOK_TIMEOUT = 1
    org = OrganizationFactory()
    endpoint = _endpoint(org, "http://127.0.0.1:9/hook")
    refused = []

    def change():
        try:
            webhook_endpoint_update(endpoint=endpoint, url="https://hooks.customer.example/x")
        except ValidationFailed as exc:
            refused.append(exc.code)

    changing = _in_thread(change)
    assert hung_resolver.wait(10)  # inside the lookup (which gives up after a second)
    with transaction.atomic():
        WebhookEndpoint.objects.select_for_update(nowait=True).get(pk=endpoint.pk)
    assert changing.is_alive()  # the lock was free while the lookup was still going on
    changing.join()

    assert refused == ["webhook_url_unresolvable"]
    endpoint.refresh_from_db()
    assert endpoint.url == "http://127.0.0.1:9/hook"
