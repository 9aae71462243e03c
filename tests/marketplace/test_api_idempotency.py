"""Idempotency-Key on every POST: replay, mismatch, in flight, expiry, no 5xx stored."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import json
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import connection, transaction
from django.utils import timezone

from config.api.idempotency import (
    IN_FLIGHT_TIMEOUT,
    KEY_TTL,
    idempotency_records_purge,
    request_fingerprint,
)
from inventory.models import Node
from marketplace.models import Allocation, ApiKey, IdempotencyRecord, Reservation
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    client_key,
    fresh_rate_limits,
    key_client,
    market,
    org,
    owner,
    owner_client,
    reservation_body,
)

pytestmark = pytest.mark.django_db


def post(client, body, key, url="/api/v1/reservations"):
    return client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY=key)


def test_a_retry_replays_the_first_response_and_reserves_once(client_key, market):
    body = reservation_body()
    first = post(client_key, body, "retry-1")
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first
    # Same body with keys in another order: still the same request.
    second = post(client_key, dict(reversed(list(body.items()))), "retry-1")
    assert second.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    # The same bytes, keys in the same order: a client comparing or hashing bodies, or
    # reading them with an order-keeping parser, cannot tell the replay from the original.
    assert second.content == first.content
    assert second["Content-Type"] == first["Content-Type"] == "application/json"
    assert Reservation.objects.count() == 1
    assert Allocation.objects.count() == 2


def test_the_same_key_with_another_body_is_refused(client_key, market):
    post(client_key, reservation_body(), "k")
    response = post(client_key, reservation_body(gpu_count=3), "k")
    error = assert_error(response, 422, "idempotency_key_mismatch", field="Idempotency-Key")
    assert error["type"] == "invalid_request_error"
    response = post(client_key, {}, "k", url="/api/v1/quotes")  # another path
    assert_error(response, 422, "idempotency_key_mismatch")
    assert Reservation.objects.count() == 1


def test_keys_are_scoped_to_the_caller(org, market):
    a, b = key_client(org), key_client(org)
    assert post(a, reservation_body(), "shared").status_code == 201
    response = post(b, reservation_body(gpu_count=1), "shared")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert Reservation.objects.count() == 2


def test_a_4xx_is_stored_and_replayed_without_running_again(client_key, market):
    body = reservation_body(gpu_count=99)
    first = post(client_key, body, "too-big")
    assert_error(first, 409, "not_available")
    replay = post(client_key, body, "too-big")
    assert replay.status_code == 409
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.content == first.content


def _fingerprint(body: dict, path: str = "/api/v1/reservations") -> str:
    fake = SimpleNamespace(
        method="POST", body=json.dumps(body).encode(), get_full_path=lambda: path
    )
    return request_fingerprint(fake)


def test_a_request_still_in_flight_gets_409_and_a_stale_claim_is_taken_over(
    client_key, market, org
):
    body = reservation_body()
    principal = f"key:{ApiKey.objects.get(organization=org).pk}"
    record = IdempotencyRecord.objects.create(
        organization=org, principal=principal, key="busy", request_hash=_fingerprint(body)
    )
    assert_error(post(client_key, body, "busy"), 409, "idempotency_key_in_use")
    assert Reservation.objects.count() == 0
    # The first request's process died: after IN_FLIGHT_TIMEOUT a retry runs it.
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        created_at=timezone.now() - IN_FLIGHT_TIMEOUT - timedelta(seconds=1)
    )
    assert post(client_key, body, "busy").status_code == 201
    assert Reservation.objects.count() == 1


def test_keys_expire_after_24_hours(client_key, market):
    body = reservation_body(gpu_count=1)
    assert post(client_key, body, "old").status_code == 201
    IdempotencyRecord.objects.filter(key="old").update(
        created_at=timezone.now() - KEY_TTL - timedelta(seconds=1)
    )
    again = post(client_key, body, "old")
    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again
    assert Reservation.objects.count() == 2


def test_an_invalid_key_is_refused(client_key, market):
    assert_error(post(client_key, reservation_body(), "x" * 256), 400, "idempotency_key_invalid")
    assert Reservation.objects.count() == 0


def test_an_api_key_secret_is_never_stored_for_replay(owner_client):
    first = owner_client.post(
        "/api/v1/api-keys", {"name": "ci"}, format="json", HTTP_IDEMPOTENCY_KEY="mint"
    )
    assert first.status_code == 201
    assert first.json()["secret"].startswith("sy_live_")
    record = IdempotencyRecord.objects.get(key="mint")
    assert json.loads(record.response_body)["secret"] is None
    replay = owner_client.post(
        "/api/v1/api-keys", {"name": "ci"}, format="json", HTTP_IDEMPOTENCY_KEY="mint"
    )
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json() == {**first.json(), "secret": None}
    assert ApiKey.objects.count() == 1


def test_a_server_error_is_not_stored(client_key, market, monkeypatch):
    """An unexpected exception is a 500; the key is freed so the retry runs for real.

    The service is replaced by one that crashes: the crash is what is under test here.
    """
    from marketplace.apis import reservations

    def crash(**kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(reservations, "reservation_create", crash)
    client_key.raise_request_exception = False
    response = post(client_key, reservation_body(), "crash")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert not IdempotencyRecord.objects.filter(key="crash").exists()
    monkeypatch.undo()
    assert post(client_key, reservation_body(), "crash").status_code == 201


@pytest.mark.django_db(transaction=True)
def test_a_concurrent_duplicate_gets_409_in_use_and_one_reservation(org, market):
    """Two requests with one key at once, on real connections: one reserves, one is told to wait.

    The main thread holds the nodes' row locks, so the first request (which has already
    claimed the key) waits inside its transaction while the duplicate arrives.
    """
    client = key_client(org)
    body = reservation_body()
    statuses = {}

    def send(name):
        try:
            response = post(client, body, "race")
            statuses[name] = (response.status_code, response.get("Idempotent-Replayed"))
        finally:
            connection.close()

    first = threading.Thread(target=send, args=("first",))
    with transaction.atomic():
        list(Node.objects.select_for_update().order_by("pk"))
        first.start()
        deadline = time.monotonic() + 20
        while not IdempotencyRecord.objects.filter(key="race").exists():
            assert time.monotonic() < deadline, "the first request never claimed the key"
            time.sleep(0.05)
        second = threading.Thread(target=send, args=("second",))
        second.start()
        second.join(timeout=20)
    first.join(timeout=20)
    assert statuses == {"first": (201, None), "second": (409, None)}
    assert Reservation.objects.count() == 1
    third = post(client, body, "race")
    assert (third.status_code, third["Idempotent-Replayed"]) == (201, "true")


def test_every_post_endpoint_of_the_public_api_goes_through_the_idempotent_base_view():
    from django.urls import URLPattern, URLResolver, get_resolver

    from config.api.views import ApiView

    def walk(patterns, prefix=""):
        for p in patterns:
            if isinstance(p, URLResolver):
                yield from walk(p.url_patterns, prefix + str(p.pattern))
            elif isinstance(p, URLPattern):
                yield prefix + str(p.pattern), p.callback

    posts = {
        route: getattr(callback, "view_class", None)
        for route, callback in walk(get_resolver().url_patterns)
        if route.startswith("api/v1/")
        and hasattr(getattr(callback, "view_class", None), "post")
        # Site agents (node tokens), Stripe's webhooks and grid operators' demand-response
        # calls (signatures; a call is idempotent by its event id) are not customer calls.
        and not route.startswith("api/v1/agent/")
        and "webhook" not in route
        and route != "api/v1/grid/demand-response"
    }
    assert "api/v1/reservations" in posts
    assert len(posts) >= 8
    assert {route for route, cls in posts.items() if not issubclass(cls, ApiView)} == set()


def test_purge_deletes_only_expired_records(org):
    fresh = IdempotencyRecord.objects.create(
        organization=org, principal="user:1", key="fresh", request_hash="a" * 64
    )
    old = IdempotencyRecord.objects.create(
        organization=org, principal="user:1", key="old", request_hash="a" * 64
    )
    IdempotencyRecord.objects.filter(pk=old.pk).update(
        created_at=timezone.now() - KEY_TTL - timedelta(seconds=1)
    )
    assert idempotency_records_purge() == 1
    assert list(IdempotencyRecord.objects.values_list("pk", flat=True)) == [fresh.pk]
