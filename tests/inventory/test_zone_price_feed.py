"""Zone prices coming in: CSV (admin action, command) and the API (grid key, node token).
Idempotent upserts, corrections, every bad row refused with nothing written, credentials
refused with nothing changed, and the feed's health in the admin."""

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import CommandError, call_command
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from inventory import grid_prices
from inventory.models import ZonePrice
from inventory.services import node_token_issue
from marketplace.models import ApiKeyScope
from tests.clients import HttpsAPIClient
from tests.factories import NodeFactory, PriceZoneFactory, SiteFactory
from tests.marketplace.api_fixtures import key_client

pytestmark = pytest.mark.django_db

T0 = datetime(2030, 3, 1, 0, 0, tzinfo=UTC)
H = timedelta(hours=1)


def snapshot(zone=None):
    rows = ZonePrice.objects.order_by("zone_id", "starts_at")
    if zone is not None:
        rows = rows.filter(zone=zone)
    return list(
        rows.values_list(
            "zone__code", "starts_at", "ends_at", "price_per_mwh", "source", "received_at"
        )  # fmt: skip
    )


def body(*prices, start=T0, step=H):
    return {
        "prices": [
            {
                "starts_at": (start + i * step).isoformat(),
                "ends_at": (start + (i + 1) * step).isoformat(),
                "price_per_mwh": p,
            }
            for i, p in enumerate(prices)
        ]
    }


def url(code):
    return f"/api/v1/agent/grid/zones/{code}/prices"


@pytest.fixture
def zone():
    return PriceZoneFactory(code="ercot-west", currency="usd")


@pytest.fixture
def grid_key(zone):
    from tests.factories import OrganizationFactory

    return key_client(OrganizationFactory(name="Switchyard Operations"), scopes=[ApiKeyScope.GRID])


# --- the API -----------------------------------------------------------------------------


def test_a_grid_key_pushes_prices_and_the_same_body_twice_changes_nothing(zone, grid_key):
    first = grid_key.post(url(zone.code), body("31.20", "28.05", "-4.10"), format="json")
    assert first.status_code == 200, first.json()
    assert first.json() | {"gaps": []} == {
        "zone": "ercot-west", "created": 3, "corrected": 0, "unchanged": 0, "replaced": 0,
        "gaps": [],
    }  # fmt: skip
    stored = snapshot()
    assert [r[3] for r in stored] == [Decimal("31.20"), Decimal("28.05"), Decimal("-4.10")]
    assert stored[0][4].startswith("api_key:sy_live_")

    again = grid_key.post(url(zone.code), body("31.20", "28.05", "-4.10"), format="json")

    assert again.status_code == 200
    assert (again.json()["unchanged"], again.json()["created"]) == (3, 0)
    assert snapshot() == stored  # not even received_at moved


def test_a_correction_replaces_the_price_of_its_interval(zone, grid_key):
    grid_key.post(url(zone.code), body("31.20", "28.05"), format="json")
    response = grid_key.post(url(zone.code), body("31.20", "99.99"), format="json")
    assert (response.json()["corrected"], response.json()["unchanged"]) == (1, 1)
    assert [r[3] for r in snapshot()] == [Decimal("31.20"), Decimal("99.99")]


def test_quarter_hours_across_an_hour_replace_what_they_cover_and_keep_the_rest(zone, grid_key):
    grid_key.post(url(zone.code), body("40.00", "50.00"), format="json")
    response = grid_key.post(
        url(zone.code), body("10.00", "20.00", start=T0 + H / 2, step=H / 4), format="json"
    )
    assert (response.json()["replaced"], response.json()["created"]) == (1, 2), response.json()
    assert [(r[1], r[2], r[3]) for r in snapshot()] == [
        (T0, T0 + H / 2, Decimal("40.00")),  # the uncovered half keeps its price
        (T0 + H / 2, T0 + 3 * H / 4, Decimal("10.00")),
        (T0 + 3 * H / 4, T0 + H, Decimal("20.00")),
        (T0 + H, T0 + 2 * H, Decimal("50.00")),
    ]


def test_gaps_between_the_rows_sent_are_reported(zone, grid_key):
    payload = body("40.00")
    payload["prices"] += body("41.00", start=T0 + 3 * H)["prices"]
    response = grid_key.post(url(zone.code), payload, format="json")
    assert response.json()["gaps"] == [
        {
            "zone": "ercot-west",
            "starts_at": "2030-03-01T01:00:00Z",
            "ends_at": "2030-03-01T03:00:00Z",
        }
    ]


BAD_ROWS = [
    ({"starts_at": "2030-03-01T00:00:00", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "30"}, "starts_at", "has no UTC offset"),
    ({"starts_at": "2030-03-01T01:00:00Z", "ends_at": "2030-03-01T00:00:00Z",
      "price_per_mwh": "30"}, "ends_at", "must be after"),
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-03T00:00:00Z",
      "price_per_mwh": "30"}, "ends_at", "at most one day"),
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "9000"}, "price_per_mwh", "outside the accepted range"),
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "-900"}, "price_per_mwh", "outside the accepted range"),
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "30.123"}, "price_per_mwh", "2 decimal places"),
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "NaN"}, "price_per_mwh", "not a number"),
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "30", "currency": "eur"}, "currency", "priced in usd"),
    ({"starts_at": "soon", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "30"}, "starts_at", "not an ISO 8601 time"),
    # Decimal() reads these too; a price is ASCII digits.
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "3e1"}, "price_per_mwh", "not a number"),
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "\u0665"}, "price_per_mwh", "not a number"),
    # Published until 9999 otherwise.
    ({"starts_at": "9999-12-31T22:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "30"}, "starts_at", "from 2000 to 2099"),
    # More digits than a Decimal rounds to cents (a feed's garbage, a unit slip): absurd, not
    # a 500 from the rounding.
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "1" + "0" * 27}, "price_per_mwh", "outside the accepted range"),
    ({"starts_at": "2030-03-01T00:00:00Z", "ends_at": "2030-03-01T01:00:00Z",
      "price_per_mwh": "-" + "9" * 40 + ".5"}, "price_per_mwh", "outside the accepted range"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "field", "words"), BAD_ROWS)
def test_one_bad_row_refuses_the_whole_body(zone, grid_key, row, field, words):
    grid_key.post(url(zone.code), body("40.00", start=T0 - H), format="json")
    before = snapshot()
    payload = body("30.00", start=T0 + 5 * H)
    payload["prices"].append(row)

    response = grid_key.post(url(zone.code), payload, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "prices_refused" and error["field"] == f"prices[1].{field}"
    assert [(p["where"], p["field"]) for p in error["problems"]] == [("prices[1]", field)]
    assert words in error["problems"][0]["message"]
    assert snapshot() == before


def test_overlapping_rows_in_one_body_are_refused(zone, grid_key):
    payload = body("30.00", "31.00")
    payload["prices"][1]["starts_at"] = (T0 + H / 2).isoformat()
    response = grid_key.post(url(zone.code), payload, format="json")
    assert response.status_code == 400 and "Overlaps" in response.json()["error"]["message"]
    assert snapshot() == []


@pytest.mark.parametrize(
    ("scopes", "code"),
    [
        ([ApiKeyScope.READ, ApiKeyScope.WRITE], "insufficient_scope"),
        ([ApiKeyScope.READ, ApiKeyScope.WRITE, ApiKeyScope.BILLING], "insufficient_scope"),
    ],
)
def test_a_customer_key_cannot_push_prices(zone, scopes, code):
    from tests.factories import OrganizationFactory

    client = key_client(OrganizationFactory(), scopes=scopes)
    response = client.post(url(zone.code), body("4000.00"), format="json")
    assert response.status_code == 403 and response.json()["error"]["code"] == code
    assert snapshot() == []


def test_no_credentials_or_a_bad_key_is_401_and_changes_nothing(zone):
    anonymous = HttpsAPIClient().post(url(zone.code), body("30.00"), format="json")
    bad = HttpsAPIClient(HTTP_AUTHORIZATION="Bearer sy_live_nope_nope").post(
        url(zone.code), body("30.00"), format="json"
    )
    bad_node = HttpsAPIClient(HTTP_AUTHORIZATION="Bearer nt_nope").post(
        url(zone.code), body("30.00"), format="json"
    )
    assert [anonymous.status_code, bad.status_code, bad_node.status_code] == [401, 401, 401]
    assert snapshot() == []


def test_a_revoked_grid_key_is_refused(zone):
    from marketplace.models import ApiKey
    from tests.factories import OrganizationFactory

    client = key_client(OrganizationFactory(), scopes=[ApiKeyScope.GRID])
    ApiKey.objects.update(revoked_at=timezone.now())
    assert client.post(url(zone.code), body("30.00"), format="json").status_code == 401
    assert snapshot() == []


def test_a_signed_in_session_cannot_push_prices(zone, admin_user):
    client = HttpsAPIClient()
    client.force_authenticate(admin_user)
    response = client.post(url(zone.code), body("30.00"), format="json")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "grid_credentials_required"
    assert snapshot() == []


def test_a_node_token_pushes_its_own_sites_zone_only(zone):
    other = PriceZoneFactory(code="pacificorp-east")
    node = NodeFactory(site=SiteFactory(price_zone=zone), gpus=1)
    _, secret = node_token_issue(node=node)
    agent = HttpsAPIClient(HTTP_AUTHORIZATION=f"Bearer {secret}")

    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    own = agent.post(url(zone.code), body("30.00", start=hour), format="json")
    foreign = agent.post(url(other.code), body("30.00", start=hour), format="json")

    assert own.status_code == 200 and snapshot(zone)[0][4] == f"node:{node.hostname}"
    assert foreign.status_code == 403 and foreign.json()["error"]["code"] == "wrong_zone"
    assert snapshot(other) == []


def test_a_node_prices_around_now_only_and_nobody_prices_slivers(zone, grid_key):
    """One node's token cannot rewrite its zone's history or fill its future, and no feed
    stores intervals shorter than five minutes (a price nobody pays, rows without end)."""
    node = NodeFactory(site=SiteFactory(price_zone=zone), gpus=1)
    _, secret = node_token_issue(node=node)
    agent = HttpsAPIClient(HTTP_AUTHORIZATION=f"Bearer {secret}")
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)

    past = agent.post(url(zone.code), body("1.00", start=hour - 3 * 24 * H), format="json")
    ahead = agent.post(url(zone.code), body("1.00", start=hour + 30 * 24 * H), format="json")
    sliver = grid_key.post(
        url(zone.code), body("1.00", start=T0, step=timedelta(milliseconds=1)), format="json"
    )
    for response in (past, ahead, sliver):
        assert response.status_code == 400 and response.json()["error"]["code"] == "prices_refused"
    assert snapshot(zone) == []
    # A grid feed's key still prices any time (its history included).
    assert grid_key.post(url(zone.code), body("2.00", start=T0), format="json").status_code == 200


def test_an_unknown_zone_is_404(grid_key):
    response = grid_key.post(url("atlantis"), body("30.00"), format="json")
    assert response.status_code == 404


def test_a_read_of_a_window_out_of_range_is_a_400_not_an_overflow(zone):
    from tests.factories import OrganizationFactory

    reader = key_client(OrganizationFactory(), scopes=[ApiKeyScope.READ])
    response = reader.get(
        f"/api/v1/grid/zones/{zone.code}/prices",
        {"start": "9999-12-30T00:00:00Z", "end": "9999-12-30T01:00:00Z"},
    )
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (
        "out_of_range", "start"
    )  # fmt: skip


def test_anyone_signed_in_reads_a_zones_prices(zone, grid_key):
    grid_key.post(url(zone.code), body("30.00", "31.00", "32.00"), format="json")
    from tests.factories import OrganizationFactory

    reader = key_client(OrganizationFactory(), scopes=[ApiKeyScope.READ])
    response = reader.get(
        f"/api/v1/grid/zones/{zone.code}/prices",
        {"start": (T0 + H).isoformat(), "end": (T0 + 3 * H).isoformat()},
    )
    assert response.status_code == 200
    assert response.json()["zone"]["currency"] == "usd"
    assert [p["price_per_mwh"] for p in response.json()["prices"]] == ["31.00", "32.00"]


# --- CSV: command and admin action -------------------------------------------------------

GOOD_CSV = (
    "zone,starts_at,ends_at,price_per_mwh,currency\n"
    "ercot-west,2030-03-01T00:00:00Z,2030-03-01T01:00:00Z,31.20,usd\n"
    "ercot-west,2030-03-01T01:00:00Z,2030-03-01T02:00:00Z,28.05,\n"
)
BAD_CSV = (
    "zone,starts_at,ends_at,price_per_mwh,currency\n"
    "ercot-west,2030-03-01T00:00:00Z,2030-03-01T01:00:00Z,31.20,usd\n"
    "atlantis,2030-03-01T01:00:00Z,2030-03-01T02:00:00Z,28.05,usd\n"
    "ercot-west,2030-03-01T02:00:00Z,2030-03-01T03:00:00Z,1000000000,usd\n"
)


def test_the_command_loads_a_csv_and_again_changes_nothing(zone, tmp_path, capsys):
    path = tmp_path / "prices.csv"
    path.write_text(GOOD_CSV)
    call_command("load_zone_prices", str(path))
    stored = snapshot()
    call_command("load_zone_prices", str(path))
    out = capsys.readouterr().out
    assert "2 new" in out and "2 unchanged" in out
    assert [r[3] for r in stored] == [Decimal("31.20"), Decimal("28.05")]
    assert snapshot() == stored and stored[0][4] == "csv:prices.csv"


def test_the_command_lists_every_bad_line_and_writes_nothing(zone, tmp_path):
    path = tmp_path / "prices.csv"
    path.write_text(BAD_CSV)
    with pytest.raises(CommandError) as exc:
        call_command("load_zone_prices", str(path))
    message = str(exc.value)
    assert "2 problem(s)" in message and "nothing was written" in message
    assert "line 3: Unknown price zone 'atlantis'" in message
    assert "line 4: " in message and "outside the accepted range" in message
    assert snapshot() == []


def test_a_csv_without_the_columns_is_refused(zone, tmp_path):
    path = tmp_path / "prices.csv"
    path.write_text("when,price\n2030-03-01,3\n")
    with pytest.raises(CommandError, match="header lacks zone, starts_at, ends_at"):
        call_command("load_zone_prices", str(path))


def _upload(admin_client, zones, text, **extra):
    return admin_client.post(
        reverse("admin:inventory_pricezone_changelist"),
        {
            "action": "load_prices_csv",
            "_selected_action": [z.pk for z in zones],
            "apply": "1",
            "file": SimpleUploadedFile("day-ahead.csv", text.encode(), "text/csv"),
            **extra,
        },
    )


def test_staff_load_a_csv_from_the_zone_list(admin_client, zone):
    form = admin_client.post(
        reverse("admin:inventory_pricezone_changelist"),
        {"action": "load_prices_csv", "_selected_action": [zone.pk]},
    )
    assert form.status_code == 200 and b'enctype="multipart/form-data"' in form.content

    response = _upload(admin_client, [zone], GOOD_CSV)

    assert response.status_code == 302
    assert [r[4] for r in snapshot()] == ["csv:admin", "csv:admin"]


def test_a_bad_csv_in_the_admin_lists_its_problems_and_writes_nothing(admin_client, zone):
    response = _upload(admin_client, [zone], BAD_CSV)
    assert response.status_code == 400
    page = response.content.decode()
    assert "line 3" in page and "atlantis" in page and "line 4" in page
    assert snapshot() == []


def test_a_csv_naming_a_zone_not_selected_is_refused(admin_client, zone):
    other = PriceZoneFactory(code="nordpool-no4", currency="eur")
    text = GOOD_CSV.replace("ercot-west", "nordpool-no4").replace(",usd", ",eur")
    response = _upload(admin_client, [zone], text)
    assert response.status_code == 400 and "not among the zones chosen" in response.content.decode()
    assert snapshot(other) == []


def test_a_dry_run_writes_nothing(admin_client, zone):
    response = _upload(admin_client, [zone], GOOD_CSV, dry_run="on")
    assert response.status_code == 302 and snapshot() == []


def test_the_zone_list_shows_each_feeds_health(admin_client, settings):
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    settings.GRID_PRICE_MAX_AGE = timedelta(hours=6)
    fresh, stale, holed, empty = (PriceZoneFactory(code=c) for c in
                                  ("fresh", "stale", "holed", "empty"))  # fmt: skip

    def put(z, start, hours, price="30.00", received=None):
        ZonePrice.objects.bulk_create(
            ZonePrice(
                zone=z,
                starts_at=start + i * H,
                ends_at=start + (i + 1) * H,
                price_per_mwh=Decimal(price),
                currency="usd",
                source="t",
                received_at=received or timezone.now(),
            )  # fmt: skip
            for i in range(hours)
        )

    put(fresh, now - 2 * H, 24)
    put(stale, now - 2 * H, 24, received=timezone.now() - timedelta(hours=7))
    put(holed, now - 2 * H, 2)
    put(holed, now + 3 * H, 2, price="9999.00")  # a gap for now, and absurd values

    response = admin_client.get(reverse("admin:inventory_pricezone_changelist"))

    health = grid_prices.zone_feed_health(zone_ids=[fresh.pk, stale.pk, holed.pk, empty.pk])
    assert health[fresh.pk].problems == []
    assert health[fresh.pk].current_price == Decimal("30.00")
    assert health[stale.pk].problems == ["stale"]
    assert health[holed.pk].problems == ["no price for now", "1 gap(s)", "2 absurd value(s)"]
    assert health[empty.pk].problems == ["no prices"]
    page = response.content.decode()
    assert "no price for now, 1 gap(s), 2 absurd value(s)" in page and "no prices" in page


# --- concurrency ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_two_feeds_writing_one_zone_at_once_take_turns():
    zone = PriceZoneFactory(code="race")
    hourly = grid_prices.zone_price_rows_parse(
        [(f"r{i}", {"zone": "race", **p}) for i, p in enumerate(body(*["40.00"] * 6)["prices"])]
    )
    quarters = grid_prices.zone_price_rows_parse(
        [
            (f"q{i}", {"zone": "race", **p})
            for i, p in enumerate(body(*["10.00"] * 8, start=T0 + H, step=H / 4)["prices"])
        ]
    )
    barrier, errors = threading.Barrier(2), []

    def run(rows, source):
        try:
            barrier.wait()
            grid_prices.zone_prices_upsert(rows=rows, source=source)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=run, args=(hourly, "a")),
        threading.Thread(target=run, args=(quarters, "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    rows = list(ZonePrice.objects.filter(zone=zone).order_by("starts_at"))
    # Whichever went second, the series is whole and never overlaps: 6 hours covered.
    assert rows[0].starts_at == T0 and rows[-1].ends_at == T0 + 6 * H
    assert all(a.ends_at == b.starts_at for a, b in zip(rows, rows[1:], strict=False))
    assert sum((r.ends_at - r.starts_at for r in rows), timedelta()) == 6 * H


def test_only_staff_grant_the_grid_scope(zone):
    from marketplace.models import ApiKey, Membership
    from tests.factories import MembershipFactory

    owner = MembershipFactory(role="owner")
    member_client = HttpsAPIClient()
    member_client.force_authenticate(owner.user)
    refused = member_client.post(
        "/api/v1/api-keys", {"name": "feed", "scopes": ["grid"]}, format="json"
    )
    assert refused.status_code == 403
    assert refused.json()["error"] | {"message": ""} == {
        "type": "permission_error", "code": "insufficient_role", "field": "scopes", "message": "",
    }  # fmt: skip
    assert not ApiKey.objects.exists()

    owner.user.is_staff = True
    owner.user.save(update_fields=["is_staff"])
    granted = member_client.post(
        "/api/v1/api-keys", {"name": "feed", "scopes": ["grid"]}, format="json"
    )
    assert granted.status_code == 201 and granted.json()["scopes"] == ["grid"]
    feed = HttpsAPIClient(HTTP_AUTHORIZATION=f"Bearer {granted.json()['secret']}")
    assert feed.post(url(zone.code), body("30.00"), format="json").status_code == 200
    # The grid scope reads nothing of the organisation's.
    assert feed.get("/api/v1/reservations").status_code == 403
    assert Membership.objects.count() == 1


# --- a zone's local day across clock changes ------------------------------------------------

LOCAL_DAYS = [
    # (zone time zone, the day's start, its end: a day of 25 or 23 hours in the zone's time)
    ("Europe/Oslo", "2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00", 25),
    ("America/Chicago", "2026-11-01T00:00:00-05:00", "2026-11-02T00:00:00-06:00", 25),
    ("Europe/Oslo", "2026-03-29T00:00:00+01:00", "2026-03-30T00:00:00+02:00", 23),
    ("America/Chicago", "2027-03-14T00:00:00-06:00", "2027-03-15T00:00:00-05:00", 23),
]


@pytest.mark.parametrize(("tz", "starts_at", "ends_at", "hours"), LOCAL_DAYS)
def test_a_price_for_a_zones_whole_local_day_is_one_interval_across_a_clock_change(
    grid_key, tz, starts_at, ends_at, hours
):
    zone = PriceZoneFactory(code="local-day", currency="usd", timezone=tz)
    payload = {"prices": [{"starts_at": starts_at, "ends_at": ends_at, "price_per_mwh": "41.50"}]}

    response = grid_key.post(url(zone.code), payload, format="json")

    assert response.status_code == 200, response.json()
    assert response.json()["created"] == 1
    [(_, start, end, price, _, _)] = snapshot(zone)
    assert (end - start, price) == (timedelta(hours=hours), Decimal("41.50"))


@pytest.mark.parametrize(
    ("tz", "starts_at", "ends_at"),
    [
        # 25 hours on a day whose clocks do not change, or in a zone whose clocks never do.
        ("Europe/Oslo", "2026-10-24T00:00:00+02:00", "2026-10-25T01:00:00+02:00"),
        ("UTC", "2026-10-25T00:00:00+02:00", "2026-10-26T00:00:00+01:00"),
        # A day and an hour from the start of the long day is still too long.
        ("America/Chicago", "2026-11-01T00:00:00-05:00", "2026-11-02T01:00:00-06:00"),
    ],
)
def test_more_than_the_zones_local_day_is_refused_and_changes_nothing(
    grid_key, tz, starts_at, ends_at
):
    zone = PriceZoneFactory(code="local-day", currency="usd", timezone=tz)
    payload = {"prices": [{"starts_at": starts_at, "ends_at": ends_at, "price_per_mwh": "41.50"}]}

    response = grid_key.post(url(zone.code), payload, format="json")

    assert response.status_code == 400
    [problem] = response.json()["error"]["problems"]
    assert problem["field"] == "ends_at" and "at most one day" in problem["message"]
    assert snapshot(zone) == []


def test_a_staff_csv_takes_a_zones_25_hour_day_in_local_offsets(tmp_path):
    zone = PriceZoneFactory(code="no4", currency="nok", timezone="Europe/Oslo")
    path = tmp_path / "prices.csv"
    path.write_text(
        "zone,starts_at,ends_at,price_per_mwh,currency\n"
        "no4,2026-10-24T00:00:00+02:00,2026-10-25T00:00:00+02:00,310.00,\n"
        "no4,2026-10-25T00:00:00+02:00,2026-10-26T00:00:00+01:00,295.50,\n"
        "no4,2026-10-26T00:00:00+01:00,2026-10-27T00:00:00+01:00,300.00,nok\n"
    )

    call_command("load_zone_prices", str(path))

    assert [(r[2] - r[1], r[3]) for r in snapshot(zone)] == [
        (timedelta(hours=24), Decimal("310.00")),
        (timedelta(hours=25), Decimal("295.50")),
        (timedelta(hours=24), Decimal("300.00")),
    ]
