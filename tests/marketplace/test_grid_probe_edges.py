"""Demand-response calls probed from outside: a grid operator's system sending out of order, a
source whose secret is held by someone else, bodies at the size limit. Each answer is the
documented one and a refusal changes nothing (docs/grid.md#demand-response-calls)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import json
import threading
import time
from datetime import timedelta

import psycopg
import pytest
from django.db import close_old_connections, connection
from django.utils import timezone

from marketplace.models import (
    Curtailment,
    CurtailmentVictim,
    DemandResponseEvent,
    DemandResponseNonce,
    DemandResponseSource,
    Reservation,
)
from marketplace.services.demand_response import demand_response_signature
from tests.clients import HttpsAPIClient
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    fresh_rate_limits,
    market,
    org,
    owner,
)
from tests.marketplace.test_curtailment_megawatts import fleet  # noqa: F401
from tests.marketplace.test_demand_response import (
    URL,
    _call,
    _nothing_written,
    _post,
    source,  # noqa: F401
)

pytestmark = pytest.mark.django_db


def _state():
    return (
        list(DemandResponseEvent.objects.values_list("pk", "modification_number", "status")),
        list(Curtailment.objects.values_list("pk", "called_off_at", "target_mw")),
        list(CurtailmentVictim.objects.values_list("pk", "withdrawn_at")),
        list(Reservation.objects.values_list("pk", "status", "preempt_at")),
        DemandResponseNonce.objects.count(),
    )


def _signed(raw: bytes, source, content_type: str):
    ts = str(int(time.time()))
    digest = demand_response_signature(secret=source.secret, timestamp=ts, body=raw)
    return HttpsAPIClient().post(
        URL, raw, content_type=content_type, HTTP_X_DR_SOURCE=source.name,
        HTTP_X_DR_TIMESTAMP=ts, HTTP_X_DR_SIGNATURE=f"sha256={digest}",
    )  # fmt: skip


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "application/xml"])
def test_a_signed_body_over_the_size_limit_is_413_whatever_its_type(
    fleet, source, settings, content_type
):
    # Read for its signature before its type is looked at: a text/plain one over the limit was
    # Django's bare 400 "bad_request" (and an ERROR log), not the 413 a JSON one gets.
    base = json.dumps(_call())
    raw = (base[:-1] + " " * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE - len(base) + 1) + "}").encode()
    assert len(raw) == settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1

    response = _signed(raw, source, content_type)

    assert response.status_code == 413, response.content
    assert response.json()["error"]["code"] == "request_too_large"
    _nothing_written()


def test_a_signed_body_just_under_the_size_limit_is_taken(fleet, source, settings):
    base = json.dumps(_call())
    raw = (base[:-1] + " " * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE - len(base)) + "}").encode()
    assert len(raw) == settings.DATA_UPLOAD_MAX_MEMORY_SIZE

    response = _signed(raw, source, "application/json")

    assert response.status_code == 201, response.content
    assert Curtailment.objects.count() == 1


def test_modifications_out_of_order_and_after_a_call_off_change_nothing(fleet, source):
    assert _post(_call(modification_number=3), source=source).status_code == 201
    older = _post(_call(modification_number=2, target_mw="0.004"), source=source)
    assert older.status_code == 409 and older.json()["error"]["code"] == "stale_modification"
    cancelled = _post(_call(modification_number=4, status="cancelled"), source=source)
    assert cancelled.status_code == 200 and cancelled.json()["result"] == "cancelled"
    state = _state()

    for body, code in (
        (_call(modification_number=5, target_mw="0.004"), "event_cancelled"),
        (_call(modification_number=3), "stale_modification"),  # the first call, late
        (_call(modification_number=4, target_mw="0.004"), "modification_number_reused"),
    ):
        refused = _post(body, source=source)
        assert refused.status_code == 409, refused.content
        assert refused.json()["error"]["code"] == code
    assert _state() == state
    assert not Reservation.objects.filter(preempt_at__isnull=False).exists()


def test_a_call_off_for_an_unknown_event_sheds_nothing_and_bars_its_late_call(fleet, source):
    off = _post(_call(modification_number=1, status="cancelled"), source=source)

    assert off.status_code == 200, off.content
    assert (off.json()["result"], off.json()["curtailments"]) == ("cancelled", [])
    late = _post(_call(modification_number=0), source=source)  # the call, after its call-off
    assert late.status_code == 409 and late.json()["error"]["code"] == "stale_modification"
    assert not Curtailment.objects.exists()
    assert not Reservation.objects.filter(preempt_at__isnull=False).exists()


def test_a_new_call_whose_window_has_passed_is_a_400_and_changes_nothing(fleet, source):
    start = timezone.now() - timedelta(hours=2)
    body = _call(start=start.isoformat(), end=(start + timedelta(hours=1)).isoformat())

    response = _post(body, source=source)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == "end"
    _nothing_written()


def test_the_same_event_id_from_two_sources_is_two_calls(fleet, source, market):
    site, _ = market
    other = DemandResponseSource.objects.create(name="aggregator", secret="drs_other_secret")
    other.sites.add(site)
    assert _post(_call(target_mw=None), source=source).status_code == 201

    response = _post(_call(target_mw=None), source=other)  # the same event id
    cancel = _post(_call(target_mw=None, modification_number=1, status="cancelled"), source=other)

    assert response.status_code == 201, response.content
    assert cancel.status_code == 200 and cancel.json()["result"] == "cancelled"
    mine = Curtailment.objects.get(demand_response_event__source=source)
    theirs = Curtailment.objects.get(demand_response_event__source=other)
    assert mine.called_off_at is None and theirs.called_off_at is not None
    assert DemandResponseEvent.objects.get(source=source).status == "active"


@pytest.mark.django_db(transaction=True)
def test_one_signed_request_sent_twice_at_once_is_applied_once_and_replayed_once(fleet, source):
    raw = json.dumps(_call()).encode()
    ts = str(int(time.time()))
    digest = demand_response_signature(secret=source.secret, timestamp=ts, body=raw)
    barrier, results = threading.Barrier(2), [None, None]

    def send(i):
        close_old_connections()
        try:
            barrier.wait()
            results[i] = HttpsAPIClient().post(
                URL, raw, content_type="application/json", HTTP_X_DR_SOURCE=source.name,
                HTTP_X_DR_TIMESTAMP=ts, HTTP_X_DR_SIGNATURE=f"sha256={digest}",
            )  # fmt: skip
        finally:
            connection.close()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    assert sorted(r.status_code for r in results) == [201, 409]
    refused = next(r for r in results if r.status_code == 409)
    assert refused.json()["error"]["code"] == "replayed"
    assert Curtailment.objects.count() == 1 and DemandResponseNonce.objects.count() == 1
    assert CurtailmentVictim.objects.filter(withdrawn_at__isnull=True).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_call_is_not_held_up_by_another_sources_call_in_progress(fleet, source):
    # Another source's call in progress has dropped its stale signatures and not committed
    # (its planning takes its time). Each source drops only its own: this call deleted the
    # other's rows too, so it waited for that call's commit (here, past the lock timeout).
    other = DemandResponseSource.objects.create(name="aggregator", secret="drs_other_secret")
    DemandResponseNonce.objects.create(
        source=other, signature="0" * 64, seen_at=timezone.now() - timedelta(hours=1)
    )
    db = connection.settings_dict
    with psycopg.connect(
        dbname=db["NAME"], host=db["HOST"], port=db["PORT"] or 5432, user=db["USER"]
    ) as in_progress:
        in_progress.execute(
            "DELETE FROM marketplace_demandresponsenonce WHERE source_id = %s", [other.pk]
        )
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")
        try:
            response = _post(_call(), source=source)
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")
            in_progress.rollback()

    assert response.status_code == 201, response.content
    assert DemandResponseNonce.objects.filter(source=other).count() == 1  # not this call's
