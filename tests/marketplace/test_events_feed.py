"""The forward event feed (GET /api/v1/events?order=oldest / ?after=evt_…): what a poller
follows. An event commits with its change, so one stamped earlier can become visible after a
later one; the feed holds events back while an older transaction is open, and misses none.

These tests commit for real (transaction=True): a test's own open transaction would hold
every event it wrote back from the feed, which is the point of the feed. So does any write
transaction open on the server, in any database (other tests running beside these): where a
test needs events to be settled, it polls until they are (_settled)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import threading
import time
from datetime import timedelta
from urllib.parse import parse_qsl, urlsplit

import pytest
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from config import replica
from config.errors import NotFound
from marketplace.models import Event, EventType
from marketplace.models.events import SnapshotXmin
from marketplace.selectors import events as event_selectors
from marketplace.services.api_keys import api_key_create, api_key_revoke
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    org,
    other_org,
    owner,
    owner_client,
)

pytestmark = pytest.mark.django_db(transaction=True)


def _key_event(org, name: str) -> Event:
    """An api_key.created event, written by the service in its own transaction (or the
    caller's)."""
    key, _ = api_key_create(organization=org, name=name, scopes=["read"], created_by=None)
    return Event.objects.get(organization=org, object_id=key.public_id)


def _poll(client, query: str) -> dict:
    response = client.get("/api/v1/events" + query)
    assert response.status_code == 200, response.content
    return response.json()


def _settled(*events: Event, timeout: float = 120.0) -> None:
    """Wait until the events are settled (every transaction older than theirs has ended):
    transactions open elsewhere on the server hold them back for a while, never for good."""
    deadline = time.monotonic() + timeout
    pks = [e.pk for e in events]
    while Event.objects.filter(pk__in=pks, txid__lt=SnapshotXmin()).count() < len(pks):
        assert time.monotonic() < deadline, "events not settled"
        time.sleep(0.1)


def _ids(body: dict) -> list[str]:
    return [e["id"] for e in body["results"]]


def _next_query(body: dict) -> str:
    return "?" + urlsplit(body["next"]).query


def _next_params(body: dict) -> dict:
    return dict(parse_qsl(urlsplit(body["next"]).query))


class OpenTransaction:
    """A thread with its own connection that writes an event (revoking `key`: creating one
    takes the organisation's row lock, which the other writer here would wait for) and keeps
    its transaction open until release() (then commits)."""

    def __init__(self, key):
        self.written = threading.Event()
        self._release = threading.Event()
        self.public_id: str | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(key,))

    def _run(self, key):
        try:
            with transaction.atomic():
                api_key_revoke(api_key=key)
                self.public_id = Event.objects.get(
                    object_id=key.public_id, type=EventType.API_KEY_REVOKED
                ).public_id
                self.written.set()
                assert self._release.wait(timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported by release()
            self.error = exc
            self.written.set()
        finally:
            connections.close_all()

    def start(self) -> "OpenTransaction":
        self._thread.start()
        assert self.written.wait(timeout=60)
        assert self.error is None, self.error
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join(timeout=60)
        assert self.error is None, self.error


def test_an_event_that_commits_late_is_delivered_after_a_later_one(org, owner_client):
    held, _ = api_key_create(organization=org, name="slow", scopes=["read"], created_by=None)
    before = _key_event(org, "before")
    _settled(before)
    seen = _ids(_poll(owner_client, "?order=oldest"))
    created = Event.objects.get(object_id=held.public_id, type=EventType.API_KEY_CREATED)
    assert seen == [created.public_id, before.public_id]
    position = seen[-1]

    slow = OpenTransaction(held).start()  # A: stamped first, still uncommitted
    try:
        quick = _key_event(org, "quick")  # B: stamped later, committed at once
        assert Event.objects.filter(public_id=slow.public_id).count() == 0  # A is invisible
        held = _poll(owner_client, f"?after={position}")
        # B's transaction began after A's: B waits until A has ended, never goes past it.
        assert _ids(held) == []
        assert held["has_more"] is False
        assert _next_params(held) == {"after": position}
        # The newest-first list shows B at once: browsing is not the feed.
        assert _ids(_poll(owner_client, ""))[0] == quick.public_id
    finally:
        slow.release()

    _settled(quick)
    caught_up = _poll(owner_client, _next_query(held))
    assert _ids(caught_up) == [slow.public_id, quick.public_id]
    assert caught_up["has_more"] is False
    assert _next_params(caught_up) == {"after": quick.public_id}
    assert _ids(_poll(owner_client, _next_query(caught_up))) == []


def test_the_feed_pages_oldest_first_by_transaction_and_respects_the_limit(org, owner_client):
    made = [_key_event(org, f"k{i}") for i in range(5)]
    # Stamped in the past but committed now: the feed places it by its transaction, last.
    made.append(_key_event(org, "backdated"))
    Event.objects.filter(pk=made[-1].pk).update(created_at=timezone.now() - timedelta(hours=1))
    expected = [e.public_id for e in made]
    _settled(*made)

    first = _poll(owner_client, "?order=oldest&limit=2")
    assert _ids(first) == expected[:2]
    assert first["has_more"] is True and first["previous"] is None
    assert _next_params(first) == {"limit": "2", "after": expected[1]}
    second = _poll(owner_client, _next_query(first))
    assert _ids(second) == expected[2:4] and second["has_more"] is True
    third = _poll(owner_client, _next_query(second))
    assert _ids(third) == expected[4:] and third["has_more"] is False
    again = _poll(owner_client, _next_query(third))
    assert _ids(again) == [] and again["has_more"] is False
    assert _next_params(again) == _next_params(third)  # polling on stays where it is

    everything = _poll(owner_client, "?order=oldest&limit=100")
    assert _ids(everything) == expected
    newest_first = _poll(owner_client, "?limit=100")
    assert _ids(newest_first)[-1] == expected[-1]  # the backdated one, by created_at
    assert "has_more" not in newest_first  # the browsing list is as it was


def test_events_of_one_transaction_come_in_the_order_they_were_written(org, owner_client):
    first = _key_event(org, "first")
    with transaction.atomic():
        one, two = _key_event(org, "one"), _key_event(org, "two")
    _settled(one, two)
    assert _ids(_poll(owner_client, f"?after={first.public_id}")) == [
        one.public_id,
        two.public_id,
    ]


def test_filters_narrow_the_feed_and_created_after_starts_it_later(org, owner_client):
    old = _key_event(org, "old")
    Event.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=1))
    since = (timezone.now() - timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    new = _key_event(org, "new")
    _settled(old, new)
    body = _poll(owner_client, f"?order=oldest&created_after={since}")
    assert _ids(body) == [new.public_id]
    assert _next_params(body) == {"created_after": since, "after": new.public_id}

    assert _ids(_poll(owner_client, "?order=oldest&type=reservation.created")) == []
    assert _ids(_poll(owner_client, f"?order=oldest&object_id={old.object_id}")) == [old.public_id]


def test_the_feed_shows_only_the_organisations_own_events(org, other_org, owner_client):
    mine = _key_event(org, "mine")
    theirs = _key_event(other_org, "theirs")
    _settled(mine, theirs)
    assert _ids(_poll(owner_client, "?order=oldest")) == [mine.public_id]
    response = owner_client.get(f"/api/v1/events?after={theirs.public_id}")
    assert_error(response, 404, "event_not_found", field="after")


def test_bad_feed_input_is_a_clear_400_or_404(org, owner_client):
    mine = _key_event(org, "mine")
    count = Event.objects.count()

    def refused(query, status, code, field):
        assert_error(owner_client.get("/api/v1/events" + query), status, code, field=field)

    refused("?after=garbage", 400, "invalid", "after")
    refused("?after=evt_", 400, "invalid", "after")
    refused("?after=evt_" + "a" * 40, 400, "invalid", "after")
    refused("?after=evt_doesNotExist1234", 404, "event_not_found", "after")
    refused("?order=sideways", 400, "invalid_choice", "order")
    refused(f"?order=newest&after={mine.public_id}", 400, "invalid_parameter_combination", "order")
    refused("?order=oldest&cursor=cD0x", 400, "invalid_parameter_combination", "cursor")
    refused(f"?after={mine.public_id}&after={mine.public_id}", 400, "repeated_parameter", "after")
    refused("?order=oldest&limit=0", 400, None, "limit")
    refused("?order=oldest&limit=101", 400, None, "limit")
    refused("?order=oldest&created_after=yesterday", 400, None, "created_after")
    assert Event.objects.count() == count


def test_the_settled_check_is_in_the_statement_that_reads_the_rows(org):
    """On a replica as on the primary: one statement, one snapshot, so no row can be read
    that the xmin it is compared with did not account for."""
    after = _key_event(org, "a")
    _settled(_key_event(org, "b"))
    with CaptureQueriesContext(connection) as queries:
        rows = list(event_selectors.event_feed_for_org(organization=org, after=after))
    assert len(rows) == 1
    (sql,) = [q["sql"] for q in queries.captured_queries]
    assert "pg_snapshot_xmin(pg_current_snapshot())" in sql
    assert 'FROM "marketplace_event"' in sql and 'ORDER BY "marketplace_event"."txid"' in sql


def test_a_position_the_replica_has_not_replayed_yet_is_found_on_the_primary(
    org, other_org, monkeypatch
):
    """A lagging replica is simulated: the lookup fails wherever it reads the replica."""
    mine = _key_event(org, "mine")
    theirs = _key_event(other_org, "theirs")
    monkeypatch.setattr(replica, "replica_configured", lambda: True)
    real_get = event_selectors.event_get_for_org
    reads = []

    def lagging_get(*, organization, public_id):
        alias = replica.read_alias(Event)
        reads.append(alias)
        if alias == replica.REPLICA:
            raise NotFound("not replayed yet", code="event_not_found")
        return real_get(organization=organization, public_id=public_id)

    monkeypatch.setattr(event_selectors, "event_get_for_org", lagging_get)
    with replica.stale_reads():
        found = event_selectors.event_feed_position(organization=org, public_id=mine.public_id)
        assert found.pk == mine.pk and found.txid is not None
        assert reads == [replica.REPLICA, "default"]
        with pytest.raises(NotFound):  # another organisation's: not on the primary either
            event_selectors.event_feed_position(organization=org, public_id=theirs.public_id)
    reads.clear()
    with pytest.raises(NotFound):  # read on the primary and not there: no second look
        event_selectors.event_feed_position(organization=org, public_id="evt_nothing")
    assert reads == ["default"]


def test_every_event_gets_its_writing_transaction_id_whatever_the_insert_says(org):
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute("SELECT pg_current_xact_id()::text")
            (current,) = cur.fetchone()
        made = Event.objects.create(
            organization=org, type="api_key.created", object_type="api_key", object_id="k",
            data={}, txid=1,
        )  # fmt: skip
    made.refresh_from_db()
    assert made.txid == int(current)
