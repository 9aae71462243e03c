"""The Python SDK against a live server: every operation covered, iterators, errors, retries."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import hashlib
import json
import re
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from switchyard import OPERATIONS, Client
from switchyard.errors import (
    APIConnectionError,
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    NotFoundError,
)

from marketplace.models import IdempotencyRecord, Reservation
from tests.client.conftest import world  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)


def _client(w, **kwargs) -> Client:
    client = Client(api_key=w.secret, base_url=w.url, backoff=0.05, **kwargs)
    w.clients.append(client)
    return client


def _period(hours_ahead=24, length=3):
    start = (datetime.now(UTC) + timedelta(hours=hours_ahead)).replace(minute=0, second=0,
                                                                       microsecond=0)  # fmt: skip
    return start.isoformat(), (start + timedelta(hours=length)).isoformat()


def test_the_sdk_covers_every_operation_in_the_openapi_schema(world):
    schema = httpx.get(world.url + "/api/schema/?format=json").json()
    operations = {
        op["operationId"]
        for item in schema["paths"].values()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
        and any("ApiKeyAuth" in s for s in op.get("security", []))
    }
    assert len(operations) > 50
    assert sorted(operations - set(OPERATIONS)) == [], "operations the SDK lacks"
    assert sorted(set(OPERATIONS) - operations) == [], "SDK methods for operations that are gone"
    client = _client(world)
    for operation_id, dotted in OPERATIONS.items():
        resource, method = dotted.split(".")
        assert callable(getattr(getattr(client, resource), method)), operation_id


# Each typed object of the SDK and the schema component of the response it wraps.
MODEL_COMPONENTS = {
    "GpuModel": "GpuModelOutput",
    "Site": "SiteOutput",
    "Offer": "OfferOutput",
    "Quote": "QuoteOutput",
    "Reservation": "ReservationDetailOutput",
    "Event": "EventOutput",
    "WebhookEndpoint": "WebhookEndpointSecretOutput",
    "WebhookDelivery": "WebhookDeliveryOutput",
    "ApiKey": "ApiKeyCreatedOutput",
    "SshKey": "SshKeyOutput",
    "AuditEntry": "AuditEntryOutput",
}


def test_the_fields_the_sdks_objects_name_are_the_apis(world):
    """An editor offers what a class names: a name the API does not send (a site's `slug`, sent
    as `id`) would autocomplete, then raise AttributeError."""
    from switchyard import models

    components = httpx.get(world.url + "/api/schema/?format=json").json()["components"]
    typed = [name for name in models.__all__ if name not in ("ApiObject", "wrap")]
    assert sorted(typed) == sorted(MODEL_COMPONENTS)
    for name, component in MODEL_COMPONENTS.items():
        sent = set(components["schemas"][component]["properties"])
        named = set(getattr(models, name).__annotations__)
        assert named - sent == set(), name


def test_a_site_and_a_model_are_read_by_id_and_a_secret_not_sent_reads_as_none(world):
    sy = _client(world)
    assert [site.id for site in sy.sites.list()] == ["abilene-1"]
    assert [model.id for model in sy.gpu_models.list()] == [world.gpu_model.slug]
    created = sy.webhook_endpoints.create(url="http://127.0.0.1:9/hook")
    assert created.secret.startswith("whsec_")
    (listed,) = sy.webhook_endpoints.list()
    assert listed.id == created.id and listed.secret is None
    with pytest.raises(AttributeError):
        listed.no_such_field  # noqa: B018 - a name neither sent nor named is still an error


def test_search_quote_reserve_extend_cancel_and_the_events_they_make(world):
    sy = _client(world)
    start, end = _period()
    (offer, *_) = list(sy.availability.search(gpu_model="h100-sxm-80gb", gpu_count=2,
                                              start=start, end=end))  # fmt: skip
    assert offer.site.id == "abilene-1"
    quote = sy.quotes.create(gpu_model="h100-sxm-80gb", gpu_count=2, starts_at=start, ends_at=end)
    reservation = sy.reservations.create(quote=quote.id)
    assert (reservation.status, reservation.gpu_count, reservation.total) == ("pending", 2, "12.00")

    later = (datetime.fromisoformat(end) + timedelta(hours=1)).isoformat()
    assert sy.reservations.extend(reservation.id, ends_at=later).total == "16.00"
    assert sy.reservations.cancel(reservation.id, reason="sdk test").status == "cancelled"
    assert sy.reservations.retrieve(reservation.id).allowed_actions == []

    types = [e.type for e in sy.events.list(object_id=reservation.id)]
    assert types == ["reservation.cancelled", "reservation.extended", "reservation.created"]
    audit = [e.action for e in sy.audit_log.list(object_id=reservation.id)]
    assert audit == ["reservation.cancel", "reservation.extend", "reservation.create"]


def test_lists_iterate_across_cursor_pages(world):
    sy = _client(world)
    made = []
    for hours in (24, 30, 36):
        start, end = _period(hours)
        made.append(sy.reservations.create(gpu_model="h100-sxm-80gb", gpu_count=1,
                                           starts_at=start, ends_at=end).id)  # fmt: skip
    listed = [r.id for r in sy.reservations.list(limit=1)]  # three pages of one
    assert listed == list(reversed(made))


def _settled(org, timeout: float = 120.0) -> None:
    """Wait until every event of org is settled: a write transaction open anywhere on the
    server (another test's) holds the feed back for a while."""
    from marketplace.models import Event
    from marketplace.models.events import SnapshotXmin

    deadline = time.monotonic() + timeout
    while Event.objects.filter(organization=org, txid__gte=SnapshotXmin()).exists():
        assert time.monotonic() < deadline, "events not settled"
        time.sleep(0.1)


def test_events_poll_walks_the_feed_oldest_first_and_continues_after_the_last(world):
    from marketplace.models import Event, EventType
    from marketplace.services.events import member_event_record

    sy = _client(world)
    for _ in range(3):  # events a key sees (not its own api_key.created: keys cannot list keys)
        member_event_record(membership=world.owner, type=EventType.MEMBER_ADDED)
    _settled(world.org)
    shown = Event.objects.filter(organization=world.org).exclude(type__startswith="api_key.")
    expected = [e.public_id for e in shown.order_by("txid", "id")]
    assert len(expected) == 3

    polled = [e.id for e in sy.events.poll(limit=1)]  # a page per event, until caught up
    assert polled == expected
    assert list(sy.events.poll(after=polled[-1])) == []  # caught up: the walk ends

    member_event_record(membership=world.owner, type=EventType.MEMBER_REMOVED)
    member_event_record(membership=world.owner, type=EventType.MEMBER_ADDED)
    _settled(world.org)
    removed, new = sy.events.poll(after=polled[-1])
    assert [(e.type, e.object_id) for e in (removed, new)] == [
        ("member.removed", world.owner.public_id),
        ("member.added", world.owner.public_id),
    ]
    assert [e.id for e in sy.events.poll(after=polled[0], type="member.added", limit=2)] == [
        *expected[1:],
        new.id,
    ]
    # A filtered walk moves on to the feed's head, past what its filter skipped: the next
    # poll does not stand on its last match (deleted by retention in time).
    feed = sy.events.poll(after=polled[0], type="member.removed")
    assert [e.id for e in feed] == [removed.id] and feed.position == new.id
    assert list(sy.events.poll(after=feed.position)) == []
    with pytest.raises(NotFoundError) as unknown:
        list(sy.events.poll(after="evt_doesNotExist1234"))
    assert (unknown.value.code, unknown.value.field) == ("event_not_found", "after")
    with pytest.raises(InvalidRequestError) as malformed:
        list(sy.events.poll(after="res_x"))
    assert malformed.value.field == "after"


def test_a_feed_page_that_is_caught_up_ends_the_walk_and_one_that_stands_still_stops_it():
    from switchyard.errors import APIError

    seen = []

    def feed(request):
        seen.append(dict(request.url.params))
        after = request.url.params.get("after")
        if after is None:
            nxt = "https://h/api/v1/events?after=evt_1&limit=1"
            return httpx.Response(200, json={"results": [{"id": "evt_1"}], "next": nxt,
                                             "has_more": True})  # fmt: skip
        if after == "evt_1":
            nxt = "https://h/api/v1/events?after=evt_2&limit=1"
            return httpx.Response(200, json={"results": [{"id": "evt_2"}], "next": nxt,
                                             "has_more": False})  # fmt: skip
        # A server that says there is more but gives nothing and does not move on.
        nxt = "https://h/api/v1/events?after=evt_9"
        return httpx.Response(200, json={"results": [], "next": nxt, "has_more": True})

    sy = Client(api_key="k", transport=httpx.MockTransport(feed))
    assert [e.id for e in sy.events.poll(limit=1)] == ["evt_1", "evt_2"]
    assert seen == [
        {"order": "oldest", "limit": "1"},
        {"order": "oldest", "after": "evt_1", "limit": "1"},
    ]
    with pytest.raises(APIError, match="without a cursor or a new position"):
        list(sy.events.poll(after="evt_9"))


def test_a_feeds_position_is_the_last_event_given_then_the_head_once_caught_up():
    def feed(request):
        if request.url.params.get("after") is None:  # a full page: more to come
            nxt = "https://h/api/v1/events?after=evt_2&type=a"
            return httpx.Response(200, json={"results": [{"id": "evt_1"}, {"id": "evt_2"}],
                                             "next": nxt, "has_more": True})  # fmt: skip
        # Caught up; the filter skipped evt_4 and evt_5, the head.
        nxt = "https://h/api/v1/events?after=evt_5&type=a"
        return httpx.Response(200, json={"results": [{"id": "evt_3"}], "next": nxt,
                                         "has_more": False})  # fmt: skip

    sy = Client(api_key="k", transport=httpx.MockTransport(feed))
    walk = sy.events.poll(type="a")
    assert walk.position is None
    positions = [(event.id, walk.position) for event in walk]
    assert positions == [("evt_1", "evt_1"), ("evt_2", "evt_2"), ("evt_3", "evt_3")]
    assert walk.position == "evt_5"
    stopped = sy.events.poll(type="a")
    next(iter(stopped))  # a walk left part-way stands on the last event it gave
    assert stopped.position == "evt_1"


def test_errors_are_raised_by_their_type(world):
    sy = _client(world)
    with pytest.raises(NotFoundError) as missing:
        sy.reservations.retrieve("res_doesnotexist")
    assert (missing.value.status, missing.value.type) == (404, "not_found_error")
    with pytest.raises(InvalidRequestError) as bad:
        sy.reservations.create(gpu_model="h100-sxm-80gb", gpu_count=0, ends_at="2030-01-01T00:00Z")
    assert (bad.value.status, bad.value.field) == (400, "gpu_count")
    start, end = _period()
    reservation = sy.reservations.create(gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=start,
                                         ends_at=end)  # fmt: skip
    sy.reservations.cancel(reservation.id)
    with pytest.raises(ConflictError):
        sy.reservations.cancel(reservation.id)
    with Client(api_key="sy_live_nope_x", base_url=world.url) as stranger:
        with pytest.raises(AuthenticationError):
            stranger.organization.retrieve()


def test_a_retried_post_is_done_once_thanks_to_its_idempotency_key(world):
    sy = _client(world)
    start, end = _period()
    body = {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "starts_at": start, "ends_at": end}
    first = sy.reservations.create(idempotency_key="retry-me", **body)
    again = sy.reservations.create(idempotency_key="retry-me", **body)
    assert first.id == again.id
    assert Reservation.objects.filter(organization=world.org).count() == 1


def test_it_waits_and_retries_while_the_same_request_is_still_in_flight(world):
    """409 idempotency_key_in_use: the first request is still running; the SDK retries until it
    has finished, and then gets its response."""
    sy = _client(world)
    start, end = _period()
    reservation = sy.reservations.create(gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=start,
                                         ends_at=end)  # fmt: skip
    path = f"/api/v1/reservations/{reservation.id}/cancel"
    payload = {"reason": ""}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256()
    for part in (b"POST", path.encode(), canonical):
        digest.update(part)
        digest.update(b"\x00")
    record = IdempotencyRecord.objects.create(  # "in flight": no response yet
        organization=world.org, principal=f"key:{world.key.pk}", key="in-flight",
        request_hash=digest.hexdigest(),
    )  # fmt: skip
    stored = {"id": reservation.id, "status": "cancelled", "replayed": True}
    statuses, refused = [], threading.Event()

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request):
            response = super().handle_request(request)
            statuses.append(response.status_code)
            if response.status_code == 409:
                refused.set()
            return response

    def finish():  # once the SDK has been told the request is in flight
        refused.wait(10)
        IdempotencyRecord.objects.filter(pk=record.pk).update(
            response_status=200, response_body=json.dumps(stored)
        )

    thread = threading.Thread(target=finish)
    thread.start()
    result = _client(world, max_retries=8, transport=Recording()).reservations.cancel(
        reservation.id, idempotency_key="in-flight"
    )
    thread.join()
    assert statuses[0] == 409 and statuses[-1] == 200  # refused, retried, then its response
    assert result.to_dict() == stored
    assert Reservation.objects.get(public_id=reservation.id).status == "pending"  # not run twice


def test_it_retries_after_a_429_as_retry_after_says(world, settings):
    settings.API_THROTTLE_RATE = "3/s"
    sy = _client(world)
    started = time.monotonic()
    for _ in range(7):
        assert sy.organization.retrieve()
    assert time.monotonic() - started >= 1.0  # it had to wait for a new window at least once


def test_an_unreachable_api_is_a_connection_error_after_the_retries():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sy = Client(api_key="k", base_url=f"http://127.0.0.1:{port}", max_retries=2, backoff=0.01)
    with pytest.raises(APIConnectionError, match="Could not reach"):
        sy.organization.retrieve()


def test_the_usage_export_streams_csv(world):
    sy = _client(world)
    text = b"".join(sy.billing.usage_csv(since="2026-01-01")).decode()
    assert (
        text.splitlines()[0]
        == "day,reservation,gpu_model,site,gpu_seconds,amount,currency,kwh,kg_co2e"
    )
    with pytest.raises(InvalidRequestError):
        b"".join(sy.billing.usage_csv(since="nope"))


def test_a_csv_export_from_an_unreachable_api_is_a_connection_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sy = Client(api_key="k", base_url=f"http://127.0.0.1:{port}", max_retries=1, backoff=0.01)
    with pytest.raises(APIConnectionError, match="Could not reach"):
        b"".join(sy.billing.usage_csv(since="2026-01-01"))


def test_a_csv_export_is_retried_after_a_503_like_any_request():
    """A proxy's 503 before the download starts: retried, then the whole file. (A mock
    transport: the test server cannot be made to answer 503 once.)"""
    answers = [
        httpx.Response(503, text="<html>upstream unavailable</html>"),
        httpx.Response(200, text="day,reservation\n2026-12-01,res_1\n"),
    ]
    sy = Client(api_key="k", transport=httpx.MockTransport(lambda request: answers.pop(0)),
                backoff=0.01)  # fmt: skip
    assert b"".join(sy.billing.usage_csv()) == b"day,reservation\n2026-12-01,res_1\n"
    assert answers == []


def test_an_api_error_carries_the_request_id_to_quote(world):
    sy = _client(world)
    with pytest.raises(NotFoundError) as missing:
        sy.reservations.retrieve("res_doesnotexist")
    assert missing.value.request_id.startswith("req_")
    with pytest.raises(InvalidRequestError) as export:
        b"".join(sy.billing.usage_csv(since="nope"))
    assert export.value.request_id.startswith("req_")


def test_the_integrators_guide_sdk_example_runs_as_written(world, capsys):
    """The Python example of docs/integrators.md, copied as an integrator would: only the key
    and the address are theirs."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "integrators.md").read_text()
    (example,) = [
        block for block in re.findall(r"```python\n(.*?)```", guide, re.S)
        if "from switchyard import Client" in block
    ]  # fmt: skip
    assert 'api_key="sy_live_…", base_url="https://switchyard.example"' in example
    example = example.replace('api_key="sy_live_…", base_url="https://switchyard.example"',
                              f"api_key={world.secret!r}, base_url={world.url!r}")  # fmt: skip
    namespace: dict = {}
    exec(compile(example, "docs/integrators.md", "exec"), namespace)
    namespace["sy"].close()
    reservation = Reservation.objects.get(organization=world.org)
    assert (reservation.gpu_count, reservation.status) == (8, "cancelled")
    assert capsys.readouterr().out.split()[1::2] == ["reservation.created"]


def test_a_proxys_429_is_a_rate_limit_error_with_the_headers_retry_after():
    from switchyard.errors import RateLimitError

    sy = Client(api_key="k", max_retries=0, transport=httpx.MockTransport(
        lambda request: httpx.Response(429, text="slow down", headers={"Retry-After": "7"})
    ))  # fmt: skip
    with pytest.raises(RateLimitError) as limited:
        sy.reservations.retrieve("res_1")
    assert limited.value.retry_after == 7.0


def test_a_delete_retried_after_its_answer_was_lost_is_done_when_the_thing_is_gone():
    """The first try arrived and deleted it, its answer was lost (a 502 from the proxy): the
    retry's 404 means done, not an error."""
    answers = [
        httpx.Response(502, text="bad gateway"),
        httpx.Response(
            404,
            json={
                "error": {"type": "not_found_error", "code": "not_found", "message": "Not found."}
            },
        ),
    ]
    sy = Client(api_key="k", backoff=0.01,
                transport=httpx.MockTransport(lambda request: answers.pop(0)))  # fmt: skip
    assert sy.ssh_keys.delete("ssh_1") is None
    assert answers == []
    with pytest.raises(NotFoundError):  # a first try's 404 is still an error
        Client(api_key="k", transport=httpx.MockTransport(lambda request: httpx.Response(
            404, json={"error": {"type": "not_found_error", "message": "Not found."}}))
        ).ssh_keys.delete("ssh_2")  # fmt: skip


def test_cancel_sends_the_refund_it_was_shown():
    body = {}

    def capture(request):
        body.update(json.loads(request.content))
        return httpx.Response(
            409,
            json={"error": {"type": "conflict_error", "code": "refund_changed", "message": "x"}},
        )

    mocked = Client(api_key="k", transport=httpx.MockTransport(capture))
    with pytest.raises(ConflictError) as changed:
        mocked.reservations.cancel("res_1", reason="r", expected_refund_fraction="0.5")
    assert changed.value.code == "refund_changed"
    assert body == {"reason": "r", "expected_refund_fraction": "0.5"}


def test_a_next_link_is_followed_as_given_and_one_without_a_cursor_stops_the_walk():
    from switchyard.errors import APIError

    seen = []

    def pages(request):
        seen.append(dict(request.url.params))
        if "cursor" not in request.url.params:
            nxt = "https://h/api/v1/reservations?cursor=c2&limit=2&status=active"
            return httpx.Response(200, json={"results": [{"id": "res_1"}], "next": nxt})
        if request.url.params["cursor"] == "c2":
            return httpx.Response(200, json={"results": [{"id": "res_2"}], "next": "https://h/x"})
        raise AssertionError(request.url)

    sy = Client(api_key="k", transport=httpx.MockTransport(pages))
    walked = []
    with pytest.raises(APIError, match="without a cursor"):
        for item in sy.reservations.list(status="active"):
            walked.append(item.id)
    assert walked == ["res_1", "res_2"]
    assert seen == [{"status": "active"}, {"status": "active", "cursor": "c2", "limit": "2"}]


def test_a_filter_given_twice_holds_on_every_page():
    """?type=a&type=b is one filter: the second page must ask for both types, not the first."""
    seen = []

    def pages(request):
        seen.append(request.url.params.get_list("type"))
        if "cursor" not in request.url.params:
            nxt = "https://h/api/v1/events?cursor=c2&type=member.added&type=member.removed"
            return httpx.Response(200, json={"results": [{"id": "evt_1"}], "next": nxt})
        return httpx.Response(200, json={"results": [{"id": "evt_2"}], "next": None})

    sy = Client(api_key="k", transport=httpx.MockTransport(pages))
    found = [e.id for e in sy.events.list(type=["member.added", "member.removed"])]
    assert found == ["evt_1", "evt_2"]
    assert seen == [["member.added", "member.removed"]] * 2


def test_a_redirect_is_an_error_that_says_where_it_points_and_is_not_followed():
    """An http:// base URL behind a proxy that redirects to https://: not followed (the key
    would go along, a POST would become a GET), and not a JSON parse crash."""
    from switchyard.errors import APIError

    sent = []

    def redirect(request):
        sent.append(request)
        return httpx.Response(301, headers={"Location": "https://sy.example/api/v1/reservations"})

    sy = Client(api_key="k", base_url="http://sy.example", transport=httpx.MockTransport(redirect))
    with pytest.raises(APIError, match="HTTP 301, a redirect to https://sy.example/") as exc:
        list(sy.reservations.list())
    assert exc.value.status == 301
    with pytest.raises(APIError, match="a redirect"):
        list(sy.billing.usage_csv(since="2026-11-01"))
    assert [r.url.host for r in sent] == ["sy.example", "sy.example"]  # nothing followed


def test_a_2xx_that_is_not_json_is_an_api_error_that_names_the_base_url():
    from switchyard.errors import APIError

    page = httpx.Response(200, text="<html>Welcome</html>", headers={"Content-Type": "text/html"})
    sy = Client(api_key="k", base_url="https://www.example.com",
                transport=httpx.MockTransport(lambda request: page))  # fmt: skip
    with pytest.raises(APIError, match=r"not JSON \(text/html, HTTP 200\): is https://www") as exc:
        sy.organization.retrieve()
    assert exc.value.status == 200 and "Welcome" in exc.value.body


def test_a_malformed_key_or_base_url_is_refused_before_anything_is_sent():
    sent = []
    transport = httpx.MockTransport(lambda request: sent.append(request) or httpx.Response(200))
    for key in ("sy_live_ké", "sy_live_a b", "sy_live_a\nX-Injected: 1"):
        with pytest.raises(AuthenticationError, match="malformed") as exc:
            Client(api_key=key, transport=transport)
        assert key not in str(exc.value)  # never echoed
    for url in ("api.switchyard.example", "ftp://x", "http://[::1"):
        with pytest.raises(ValueError, match="base URL"):
            Client(api_key="k", base_url=url, transport=transport)
    assert sent == []


def test_wait_returns_once_active_and_stops_on_an_end_that_is_not_active(monkeypatch):
    """Each poll is a GET; a reservation that stops before it was active (releasing) ends the
    wait at once, with the last reservation seen."""
    from switchyard.errors import ReservationEndedError

    answers = iter(["scheduled", "scheduled", "provisioning", "active"])
    polls = []

    def answer(request):
        polls.append((request.method, request.url.path))
        status = next(answers)
        return httpx.Response(200, json={"id": "res_1", "status": status, "status_reason": ""})

    monkeypatch.setattr("switchyard.client.time.sleep", lambda seconds: None)
    sy = Client(api_key="k", transport=httpx.MockTransport(answer))
    seen = []
    waited = sy.reservations.wait("res_1", on_status=lambda r: seen.append(r.status))
    assert waited.status == "active"
    assert seen == ["scheduled", "provisioning", "active"]  # each change once
    assert polls == [("GET", "/api/v1/reservations/res_1")] * 4

    answers = iter(["provisioning", "releasing"])
    with pytest.raises(ReservationEndedError) as ended:
        sy.reservations.wait("res_1")
    assert isinstance(ended.value, ConflictError) and ended.value.reservation.status == "releasing"
    with pytest.raises(ValueError, match="until must be one of active, ended"):
        sy.reservations.wait("res_1", until="running")
