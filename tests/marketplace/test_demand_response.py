"""Demand-response calls taken automatically: signed, idempotent by (source, event id),
updated and cancelled, spread over a zone; every refusal a 4xx that changes nothing.

Draws as in test_curtailment_megawatts.py: 0.805 kW per H100 at abilene-1 (700 W × 1.15)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import json
import threading
import time
from datetime import timedelta
from decimal import Decimal

import psycopg
import pytest
from django.db import OperationalError, close_old_connections, connection
from django.utils import timezone

from inventory.models import PriceZone
from marketplace.apis import demand_response as grid_api
from marketplace.models import (
    Curtailment,
    CurtailmentVictim,
    DemandResponseEvent,
    DemandResponseNonce,
    DemandResponseSource,
    Reservation,
    ReservationStatus,
)
from marketplace.selectors.availability import AvailabilityQuery, availability_search
from marketplace.services.demand_response import demand_response_signature
from marketplace.services.reservations import reservation_create
from marketplace.tasks import reservations_dispatch_due
from tests.clients import HttpsAPIClient
from tests.factories import SiteFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    fresh_rate_limits,
    market,
    org,
    owner,
)
from tests.marketplace.market_helpers import make_nodes
from tests.marketplace.test_curtailment_megawatts import _book, fleet  # noqa: F401

pytestmark = pytest.mark.django_db
URL = "/api/v1/grid/demand-response"
S = ReservationStatus


@pytest.fixture
def source(market):
    site, _ = market
    source = DemandResponseSource.objects.create(name="ercot-qse", secret="drs_test_secret")
    source.sites.add(site)
    return source


def _post(body, *, source=None, name=None, ts=None, signature=None, client=None):
    raw = json.dumps(body, default=str).encode()
    headers = {}
    if source is not None:
        ts = str(int(time.time())) if ts is None else ts
        digest = demand_response_signature(secret=source.secret, timestamp=ts, body=raw)
        headers = {
            "HTTP_X_DR_SOURCE": name or source.name,
            "HTTP_X_DR_TIMESTAMP": ts,
            "HTTP_X_DR_SIGNATURE": signature or f"sha256={digest}",
        }
    client = client or HttpsAPIClient()
    return client.post(URL, raw, content_type="application/json", **headers)


def _call(**overrides):
    start = timezone.now() + timedelta(hours=1)
    body = {
        "event_id": "ercot-2026-12-06-17",
        "modification_number": 0,
        "site": "abilene-1",
        "start": start.isoformat(),
        "end": (start + timedelta(hours=2)).isoformat(),
        "target_mw": "0.002",
        "reason": "ERCOT EEA 1",
    }
    return {k: v for k, v in {**body, **overrides}.items() if v is not None or k == "target_mw"}


def _live_victims(curtailment) -> set[int]:
    return set(
        curtailment.victims.filter(withdrawn_at__isnull=True).values_list(
            "reservation_id", flat=True
        )
    )


def test_a_signed_call_becomes_a_curtailment_with_no_person(fleet, source):
    response = _post(_call(), source=source)

    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["result"], body["status"], body["target_mw"]) == ("created", "active", "0.002")
    (curtailment,) = Curtailment.objects.all()
    assert curtailment.demand_response_event.event_id == "ercot-2026-12-06-17"
    assert curtailment.announced_by is None
    assert curtailment.target_mw == Decimal("0.002")
    assert _live_victims(curtailment) == {fleet["r2"].pk}  # as computed by hand there
    assert body["shed_mw"] == "0.003220" and body["short_mw"] == "0.000000"
    assert body["curtailments"][0]["site"] == "abilene-1"
    assert "ERCOT EEA 1" in Reservation.objects.get(pk=fleet["r2"].pk).preempt_reason


def test_the_same_call_again_is_answered_and_changes_nothing(fleet, source):
    call = _call()
    assert _post(call, source=source).status_code == 201
    before = list(CurtailmentVictim.objects.values_list("pk", "withdrawn_at"))

    again = _post(call, source=source, ts=str(int(time.time()) + 1))  # a retry, signed anew

    assert again.status_code == 200 and again.json()["result"] == "unchanged"
    assert Curtailment.objects.count() == 1 and DemandResponseEvent.objects.count() == 1
    assert list(CurtailmentVictim.objects.values_list("pk", "withdrawn_at")) == before


def _nothing_written():
    assert not DemandResponseEvent.objects.exists()
    assert not Curtailment.objects.exists()
    assert not DemandResponseNonce.objects.exists()
    assert not Reservation.objects.filter(preempt_at__isnull=False).exists()


@pytest.mark.parametrize(
    ("how", "status", "code"),
    [
        ("unsigned", 401, "signature_missing"),
        ("bad_signature", 401, "signature_invalid"),
        ("stale", 401, "timestamp_stale"),
        ("future", 401, "timestamp_stale"),
        ("unknown_source", 401, "unknown_source"),
        ("inactive_source", 401, "unknown_source"),
        ("tampered_body", 401, "signature_invalid"),
        ("huge_timestamp", 401, "timestamp_invalid"),  # once a 500: too large for a float
        ("loose_timestamp", 401, "timestamp_invalid"),  # int() would read "1_7…" as a number
    ],
)
def test_a_call_that_is_not_properly_signed_is_refused_and_changes_nothing(
    fleet, source, how, status, code
):
    kwargs = {"source": source}
    if how == "unsigned":
        kwargs = {}
    elif how == "bad_signature":
        kwargs["signature"] = "sha256=" + "0" * 64
    elif how == "stale":
        kwargs["ts"] = str(int(time.time()) - 301)
    elif how == "future":
        # Well past the 5 minutes allowed: a loaded machine may take seconds to get there.
        kwargs["ts"] = str(int(time.time()) + 330)
    elif how == "huge_timestamp":
        kwargs["ts"] = "9" * 400
    elif how == "loose_timestamp":
        now = str(int(time.time()))
        kwargs["ts"] = now[0] + "_" + now[1:]
    elif how == "unknown_source":
        kwargs["name"] = "someone-else"
    elif how == "inactive_source":
        DemandResponseSource.objects.filter(pk=source.pk).update(is_active=False)
    if how == "tampered_body":
        raw = json.dumps(_call()).encode()
        ts = str(int(time.time()))
        digest = demand_response_signature(secret=source.secret, timestamp=ts, body=raw)
        response = HttpsAPIClient().post(
            URL, json.dumps(_call(target_mw="9")), content_type="application/json",
            HTTP_X_DR_SOURCE=source.name, HTTP_X_DR_TIMESTAMP=ts,
            HTTP_X_DR_SIGNATURE=f"sha256={digest}",
        )  # fmt: skip
    else:
        response = _post(_call(), **kwargs)

    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    _nothing_written()


def test_a_replayed_signed_request_is_refused_and_changes_nothing(fleet, source):
    ts, call = str(int(time.time())), _call()
    first = _post(call, source=source, ts=ts)
    assert first.status_code == 201
    state = list(CurtailmentVictim.objects.values_list("pk", "withdrawn_at"))

    replay = _post(call, source=source, ts=ts)  # the same bytes, the same signature

    assert replay.status_code == 409 and replay.json()["error"]["code"] == "replayed"
    assert DemandResponseNonce.objects.count() == 1
    assert list(CurtailmentVictim.objects.values_list("pk", "withdrawn_at")) == state


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"site": "elsewhere"}, 400, "unknown_site"),
        ({"site": None, "zone": None}, 400, "site_or_zone"),
        ({"end": "2020-01-01T00:00:00Z"}, 400, "invalid"),
        ({"target_mw": "-1"}, 400, "min_value"),
        ({"start": "soon"}, 400, "invalid"),
        # Past its column's range (a 500 before) and past datetime's arithmetic.
        ({"modification_number": 2**31}, 400, "max_value"),
        ({"modification_number": 10**20}, 400, "max_value"),
        ({"start": "9999-12-31T00:00:00Z"}, 400, "out_of_range"),
        # A mistyped year: further ahead than any reservation may start.
        (
            {
                "start": (timezone.now() + timedelta(days=366)).isoformat(),
                "end": (timezone.now() + timedelta(days=366, hours=2)).isoformat(),
            },
            400,
            "starts_too_far_ahead",
        ),
    ],
)
def test_bad_input_is_a_clear_400_and_changes_nothing(fleet, source, change, status, code):
    body = _call(**change)
    response = _post(body, source=source)
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    _nothing_written()


def test_a_site_the_source_may_not_curtail_is_refused(fleet, source):
    SiteFactory(slug="other-site")
    response = _post(_call(site="other-site"), source=source)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "site_not_allowed"
    _nothing_written()


def test_a_modified_call_is_planned_again_and_old_or_reused_numbers_are_refused(fleet, source):
    _post(_call(), source=source)

    raised = _post(_call(modification_number=1, target_mw="0.004"), source=source)

    assert raised.status_code == 200 and raised.json()["result"] == "updated"
    (curtailment,) = Curtailment.objects.all()
    assert _live_victims(curtailment) == {fleet["r4"].pk, fleet["r2"].pk}  # by hand, 4 kW
    assert raised.json()["shed_mw"] == "0.004830"
    state = list(CurtailmentVictim.objects.values_list("pk", "withdrawn_at"))
    for body, code in (
        (_call(modification_number=0, target_mw="0.001"), "stale_modification"),
        (_call(modification_number=1, target_mw="0.001"), "modification_number_reused"),
    ):
        refused = _post(body, source=source)
        assert refused.status_code == 409, refused.content
        assert refused.json()["error"]["code"] == code
    assert list(CurtailmentVictim.objects.values_list("pk", "withdrawn_at")) == state
    assert DemandResponseEvent.objects.get().target_mw == Decimal("0.004")


def test_a_call_repeated_after_its_window_ended_answers_for_the_new_window(fleet, source):
    """The event sent again with a new window once its last one has ended (a repeat) gets a new
    curtailment: the answer lists both, but its totals are the window in force, not the sum of
    what was shed before and what is asked now."""
    assert _post(_call(), source=source).status_code == 201
    ended = timezone.now() - timedelta(minutes=1)
    Curtailment.objects.update(
        shed_at=ended - timedelta(hours=2), preempt_at=ended - timedelta(hours=2), until=ended
    )
    start = timezone.now() + timedelta(days=2)  # after all of the fleet's work
    repeat = _call(
        modification_number=1,
        start=start.isoformat(),
        end=(start + timedelta(hours=1)).isoformat(),
    )

    response = _post(repeat, source=source)

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["result"] == "updated"
    assert [(c["shed_mw"], c["short_mw"]) for c in body["curtailments"]] == [
        ("0.003220", "0.000000"),  # the window that ended, as it was
        ("0.000000", "0.002000"),  # the new one: nothing runs then
    ]
    assert (body["shed_mw"], body["short_mw"]) == ("0.000000", "0.002000")


def test_a_modification_ending_the_window_in_the_past_ends_it_now(fleet, source):
    """The operator moved the end to a minute ago (the event ended early): it was refused 400
    "already ended", and the load stayed shed to the old end."""
    assert _post(_call(), source=source).status_code == 201
    began = timezone.now() - timedelta(hours=1)
    Curtailment.objects.update(shed_at=began, preempt_at=began, until=began + timedelta(hours=2))
    early = timezone.now() - timedelta(minutes=1)

    response = _post(
        _call(modification_number=1, start=began.isoformat(), end=early.isoformat()),
        source=source,
    )

    assert response.status_code == 200, response.content
    assert response.json()["result"] == "updated"
    curtailment = Curtailment.objects.get()  # ended now, the window so far on record
    assert began < curtailment.until <= timezone.now()
    event = DemandResponseEvent.objects.get()
    assert (event.modification_number, event.ends_at) == (1, early)


def test_cancelling_before_the_start_withdraws_the_notices_and_sells_the_window(fleet, source):
    call = _call(target_mw=None)  # all flexible load
    _post(call, source=source)
    start = timezone.now() + timedelta(hours=1, minutes=30)
    search = {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "tier": "on_demand",
              "starts_at": start, "ends_at": start + timedelta(minutes=30)}  # fmt: skip
    assert availability_search(AvailabilityQuery(**search)) == []

    cancelled = _post({**call, "modification_number": 1, "status": "cancelled"}, source=source)

    assert cancelled.status_code == 200 and cancelled.json()["result"] == "cancelled"
    curtailment = Curtailment.objects.get()
    assert curtailment.called_off_at is not None
    for name in ("r1", "r2", "r3"):
        assert Reservation.objects.get(pk=fleet[name].pk).preempt_at is None
    assert Reservation.objects.get(pk=fleet["r4"].pk).status == S.PREEMPTED  # never started
    assert [o.site.slug for o in availability_search(AvailabilityQuery(**search))] == ["abilene-1"]
    again = _post({**call, "modification_number": 2}, source=source)
    assert again.status_code == 409 and again.json()["error"]["code"] == "event_cancelled"


def test_a_call_is_followed_to_its_start_by_the_dispatcher_task(fleet, source, settings):
    start = timezone.now() + timedelta(seconds=1)
    body = _call(start=start.isoformat(), end=(start + timedelta(hours=1)).isoformat())
    response = _post(body, source=source)
    curtailment = Curtailment.objects.get()
    assert curtailment.short_notice  # 1 s, less than the 120 s minimum: the call's own time
    assert curtailment.preempt_at == start
    assert reservations_dispatch_due.apply().get()["preempted"] == 0
    time.sleep(1.1)

    counts = reservations_dispatch_due.apply().get()  # the Celery beat task, run eagerly

    assert response.status_code == 201 and counts["preempted"] == 1
    assert Reservation.objects.get(pk=fleet["r2"].pk).status == S.PREEMPTED
    assert Reservation.objects.get(pk=fleet["r1"].pk).status == S.ACTIVE  # not needed


def test_a_zone_call_is_spread_over_its_sites_by_their_flexible_load(market, org, owner, source):
    site, gpu_model = market
    zone = PriceZone.objects.create(code="ercot-west", name="ERCOT West", currency="usd")
    other = SiteFactory(slug="pecos-2", price_zone=zone)
    make_nodes(other, gpu_model, 1, gpus=8)
    type(site).objects.filter(pk=site.pk).update(price_zone=zone)
    source.zones.add(zone)
    now = timezone.now()
    # abilene-1: 4 GPUs flexible (3.22 kW); pecos-2: 2 GPUs (1.61 kW). 3 kW asked: 2 and 1.
    _book(org, gpus=4, start=now, active=True)
    reservation_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=2, starts_at=now,
        ends_at=now + timedelta(hours=8), tier="interruptible", site="pecos-2",
    )  # fmt: skip

    response = _post(_call(site=None, zone="ercot-west", target_mw="0.003"), source=source)

    assert response.status_code == 201, response.content
    shares = {c["site"]: c["target_mw"] for c in response.json()["curtailments"]}
    assert shares == {"abilene-1": "0.002", "pecos-2": "0.001"}
    assert response.json()["short_mw"] == "0.000000"
    assert Curtailment.objects.filter(demand_response_event__zone=zone).count() == 2


@pytest.mark.django_db(transaction=True)
def test_the_same_event_sent_twice_at_once_is_applied_once(fleet, source):
    barrier = threading.Barrier(2)
    results = [None, None]
    call = _call()

    def send(i):
        close_old_connections()
        try:
            barrier.wait()
            results[i] = _post(call, source=source, ts=str(int(time.time()) + i))
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert sorted(r.status_code for r in results) == [200, 201]
    assert sorted(r.json()["result"] for r in results) == ["created", "unchanged"]
    assert Curtailment.objects.count() == 1
    assert CurtailmentVictim.objects.filter(withdrawn_at__isnull=True).count() == 1


def test_a_call_chosen_as_a_deadlock_victim_is_taken_again(fleet, source, monkeypatch):
    # A real deadlock needs a provisioning worker caught between a reservation and a node
    # lock at that instant; the first attempt here fails as PostgreSQL reports one.
    real, attempts = grid_api.demand_response_apply, []

    def deadlocked_once(**kwargs):
        attempts.append(1)
        if len(attempts) == 1:
            real(**kwargs)  # its writes are rolled back with the attempt
            try:
                raise psycopg.errors.DeadlockDetected("deadlock detected")
            except psycopg.errors.DeadlockDetected as cause:
                raise OperationalError("deadlock detected") from cause
        return real(**kwargs)

    monkeypatch.setattr(grid_api, "demand_response_apply", deadlocked_once)

    response = _post(_call(), source=source)

    assert response.status_code == 201 and len(attempts) == 2
    assert Curtailment.objects.count() == 1 and DemandResponseNonce.objects.count() == 1
    assert _live_victims(Curtailment.objects.get()) == {fleet["r2"].pk}


def test_a_key_given_twice_in_a_signed_call_is_a_clear_400_and_changes_nothing(fleet, source):
    # Read as its last value, the first "target_mw" the sender's logs show would not be the
    # megawatts shed.
    raw = json.dumps(_call()).replace(
        '"target_mw": "0.002"', '"target_mw": "0.002", "target_mw": "9"'
    )
    ts = str(int(time.time()))
    digest = demand_response_signature(secret=source.secret, timestamp=ts, body=raw.encode())
    response = HttpsAPIClient().post(
        URL, raw, content_type="application/json", HTTP_X_DR_SOURCE=source.name,
        HTTP_X_DR_TIMESTAMP=ts, HTTP_X_DR_SIGNATURE=f"sha256={digest}",
    )  # fmt: skip
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "duplicate_field"
    assert response.json()["error"]["field"] == "target_mw"
    _nothing_written()


@pytest.mark.parametrize("method", ["get", "put", "delete"])
def test_a_method_the_endpoint_does_not_take_is_405_signed_or_not(fleet, source, method):
    # Not 401 for the missing signature: signing a GET would not make it right.
    response = getattr(HttpsAPIClient(), method)(URL)
    assert response.status_code == 405, response.content
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response["Allow"] == "POST, OPTIONS"
    _nothing_written()
