"""Probes of the events forward feed (GET /api/v1/events?order=oldest / ?after=evt_…) from
outside: paging with filters, a type filter that hides the `after` event, an `after` deleted by
retention, bad input, the OpenAPI description, and every way an event row can be written
getting its writing transaction's id (the trigger of migration 0037).

Events are committed for real (transaction=True): the feed holds back what an open
transaction, the test's own included, may still be writing."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import io
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator

from marketplace.models import Event
from marketplace.services.api_keys import api_key_revoke
from marketplace.services.events import events_prune
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    org,
    other_org,
    owner,
    owner_client,
)
from tests.marketplace.test_events_feed import (
    _ids,
    _key_event,
    _next_params,
    _next_query,
    _poll,
    _settled,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_type_filter_that_hides_the_after_event_still_continues_after_it(org, owner_client):
    from marketplace.models import ApiKey

    created = _key_event(org, "one")
    api_key_revoke(api_key=ApiKey.objects.get(public_id=created.object_id))
    revoked = Event.objects.get(organization=org, type="api_key.revoked")
    later = _key_event(org, "two")
    _settled(created, revoked, later)

    body = _poll(owner_client, f"?after={created.public_id}&type=api_key.revoked")

    assert _ids(body) == [revoked.public_id]
    # Caught up: the position moves on to the feed's head, past the event the filter skipped.
    assert _next_params(body) == {"after": later.public_id, "type": "api_key.revoked"}
    body = _poll(owner_client, f"?after={revoked.public_id}&type=api_key.created&limit=1")
    assert _ids(body) == [later.public_id] and body["has_more"] is False


def test_paging_a_filtered_feed_keeps_the_filters_and_the_limit_on_every_link(org, owner_client):
    made = [_key_event(org, f"k{i}") for i in range(4)]
    _settled(*made)
    query = "?order=oldest&type=api_key.created&type=member.added&limit=3&object_id="
    first = _poll(owner_client, query + made[1].object_id)
    assert _ids(first) == [made[1].public_id]

    pages, body = [], _poll(owner_client, "?order=oldest&type=api_key.created&limit=3")
    pages.append(_ids(body))
    while body["has_more"]:
        body = _poll(owner_client, _next_query(body))
        pages.append(_ids(body))
    assert pages == [[e.public_id for e in made[:3]], [made[3].public_id]]
    params = _next_params(body)
    assert (params["type"], params["limit"], params["after"]) == (
        "api_key.created",
        "3",
        made[3].public_id,
    )
    assert "order" not in params  # after implies it


def test_an_after_event_deleted_by_retention_is_404_and_the_feed_can_start_again(org, owner_client):
    old = _key_event(org, "old")
    new = _key_event(org, "new")
    Event.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=31))
    _settled(old, new)
    assert events_prune() == 1

    response = owner_client.get(f"/api/v1/events?after={old.public_id}")

    assert_error(response, 404, "event_not_found", field="after")
    assert _ids(_poll(owner_client, "?order=oldest")) == [new.public_id]


def test_a_quiet_organisations_poller_keeps_its_place_through_retention(org, owner_client):
    """Nothing happened for 31 days: the event a continuous poller stands on is the
    organisation's newest, which retention keeps."""
    first = _key_event(org, "first")
    last = _key_event(org, "last")
    month_ago = timezone.now() - timedelta(days=31)
    Event.objects.filter(pk__in=[first.pk, last.pk]).update(created_at=month_ago)
    _settled(first, last)

    assert events_prune() == 1  # the older one; the newest stays, however old
    body = _poll(owner_client, f"?after={last.public_id}")

    assert (_ids(body), body["has_more"]) == ([], False)
    assert _next_params(body) == {"after": last.public_id}


def test_a_filtered_poller_moves_past_what_its_filter_skips_and_survives_retention(
    org, owner_client
):
    """A tail of one type in a busy organisation: caught up, its position is the feed's head,
    not its last match, which retention deletes after 30 days without that type."""
    from marketplace.models import ApiKey

    created = _key_event(org, "watched")
    _settled(created)
    body = _poll(owner_client, "?order=oldest&type=api_key.revoked")
    assert _next_params(body) == {"after": created.public_id, "type": "api_key.revoked"}
    api_key_revoke(api_key=ApiKey.objects.get(public_id=created.object_id))
    busy = [_key_event(org, f"busy{i}") for i in range(3)]  # none of the watched type
    revoked = Event.objects.get(organization=org, type="api_key.revoked")
    _settled(revoked, *busy)

    body = _poll(owner_client, _next_query(body))
    assert _ids(body) == [revoked.public_id]
    assert _next_params(body) == {"after": busy[-1].public_id, "type": "api_key.revoked"}
    Event.objects.filter(organization=org).update(created_at=timezone.now() - timedelta(days=31))
    assert events_prune() == 4  # everything but the newest
    body = _poll(owner_client, _next_query(body))
    assert (_ids(body), body["has_more"]) == ([], False)


def test_a_feed_page_reads_its_head_and_its_rows_in_one_snapshot(org, owner_client):
    """Read apart, an event settling between the head and the page could pass both."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    _settled(_key_event(org, "one"))
    with CaptureQueriesContext(connection) as queries:
        assert owner_client.get("/api/v1/events?order=oldest").status_code == 200
    sqls = [q["sql"] for q in queries.captured_queries]
    begin = next(i for i, q in enumerate(sqls) if "REPEATABLE READ" in q)
    reads = [i for i, q in enumerate(sqls) if "pg_snapshot_xmin" in q]
    assert len(reads) == 2 and all(i > begin for i in reads), sqls
    # Nothing between the isolation level and the reads ends the transaction.
    assert not any("COMMIT" in q.upper() for q in sqls[begin : reads[-1]])


@pytest.mark.parametrize(
    "query,status,field",
    [
        ("?after=evt_abc%0A", 404, "after"),  # trimmed, as every text parameter: unknown
        ("?after=evt_%EF%BD%81%EF%BD%82", 400, "after"),  # full-width letters
        ("?after=evt_abc%00", 400, "after"),
        ("?after=", 400, "after"),  # not read as absent (the newest-first list)
        ("?after=%20", 400, "after"),
        ("?order=oldest&limit=99999999999999999999999999", 400, "limit"),
        ("?order=oldest&limit=%EF%BC%95", 400, "limit"),  # a full-width 5
        ("?order=oldest&limit=-1", 400, "limit"),
        ("?order=oldest&type=api_key.exploded", 400, "type"),
        ("?order=oldest&object_id=" + "r" * 65, 400, "object_id"),
        ("?order=oldest&created_after=9999-01-01T00:00:00Z", 400, "created_after"),
        ("?order=oldest&order=oldest", 400, "order"),
        ("?order=OLDEST", 400, "order"),
        ("?order=oldest&ORDER=oldest", 400, "ORDER"),
        ("?after=evt_" + "a" * 5000, 400, "after"),
    ],
)
def test_bad_feed_input_is_a_clean_4xx(org, owner_client, query, status, field):
    count = Event.objects.count()
    response = owner_client.get("/api/v1/events" + query)
    assert_error(response, status, field=field)
    assert Event.objects.count() == count


def test_the_schema_describes_the_feeds_parameters_and_answer():
    schema = SchemaGenerator().get_schema(request=None, public=True)
    operation = schema["paths"]["/api/v1/events"]["get"]
    params = {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}

    assert params["order"]["schema"]["enum"] == ["newest", "oldest"]
    assert params["after"]["schema"]["pattern"] == r"^evt_[A-Za-z0-9]{1,28}$"
    assert params["type"]["schema"]["type"] == "array" and params["type"]["explode"] is True
    assert {"401", "403", "404", "429", "400"} <= set(operation["responses"])
    page = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    body = schema["components"]["schemas"][page.rsplit("/", 1)[1]]
    assert body["properties"]["has_more"]["type"] == "boolean"


# --- the writing transaction's id, however the row is written ---------------------------------


def _current_txid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_xact_id()::text")
        return int(cursor.fetchone()[0])


def _row(org, object_id: str) -> tuple:
    return (org.pk, "api_key.created", "api_key", object_id, "{}", timezone.now())


def test_raw_sql_copy_and_bulk_create_all_get_the_writing_transaction(org):
    with transaction.atomic():
        current = _current_txid()
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO marketplace_event (public_id, organization_id, type, object_type,"
                " object_id, data, created_at, txid) VALUES ('evt_raw1', %s, %s, %s, %s, %s, %s,"
                " '1')",
                _row(org, "raw"),
            )
            cursor.execute(
                "INSERT INTO marketplace_event (public_id, organization_id, type, object_type,"
                " object_id, data, created_at) SELECT 'evt_sel1', %s, %s, %s, %s, %s, %s",
                _row(org, "select"),
            )
            copied = io.StringIO(f"evt_copy1\t{org.pk}\tapi_key.created\tapi_key\tcopy\t{{}}\t"
                                 f"{timezone.now().isoformat()}\t2\n")  # fmt: skip
            with cursor.copy(
                "COPY marketplace_event (public_id, organization_id, type, object_type,"
                " object_id, data, created_at, txid) FROM STDIN"
            ) as copy:
                copy.write(copied.getvalue())
        Event.objects.bulk_create(
            [
                Event(
                    organization=org,
                    type="api_key.created",
                    object_type="api_key",
                    object_id="bulk",
                    data={},
                    txid=3,
                )
            ]  # fmt: skip
        )
    txids = dict(
        Event.objects.filter(object_id__in=["raw", "select", "copy", "bulk"]).values_list(
            "object_id", "txid"
        )
    )
    assert txids == {"raw": current, "select": current, "copy": current, "bulk": current}
