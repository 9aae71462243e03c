"""The create response is built from the rows just written; it must equal what GET shows."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta
from datetime import timezone as dt_timezone

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    client_key,
    fresh_rate_limits,
    market,
    org,
    owner,
    owner_client,
    reservation_body,
    tomorrow,
)

pytestmark = pytest.mark.django_db


def _create_then_get(client, body: dict) -> tuple[dict, dict, list[str]]:
    with CaptureQueriesContext(connection) as queries:
        response = client.post("/api/v1/reservations", body, format="json")
    assert response.status_code == 201, response.content
    created = response.json()
    shown = client.get(f"/api/v1/reservations/{created['id']}")
    assert shown.status_code == 200, shown.content
    return created, shown.json(), [q["sql"] for q in queries.captured_queries]


@pytest.mark.parametrize("site", ["abilene-1", None], ids=["naming_the_site", "cheapest_site"])
def test_the_create_response_equals_the_detail_read_back(client_key, market, site):
    # 12 GPUs span both 8-GPU nodes, so the allocation summary lists two nodes in order.
    body = reservation_body(gpu_count=12, workload={"image": "img:1", "env": {"A": "secret"}})
    if site:
        body["site"] = site
    created, shown, sql = _create_then_get(client_key, body)
    assert created == shown
    assert created["allocations"]["gpu_count"] == 12
    assert [n["gpus"] for n in created["allocations"]["nodes"]] == [8, 4]
    assert created["workload"]["env_names"] == ["A"]
    assert [t["to_status"] for t in created["transitions"]] == ["pending"]
    # Nothing was read back: no read of transitions or outages during the create.
    assert not [
        q for q in sql if "marketplace_reservationtransition" in q and q.startswith("SELECT")
    ]
    assert not [q for q in sql if "marketplace_reservationoutage" in q]


def test_a_start_given_in_another_offset_is_shown_in_utc_as_on_read(client_key, market):
    start = tomorrow().astimezone(dt_timezone(timedelta(hours=2)))
    body = reservation_body(
        site="abilene-1",
        starts_at=start.isoformat(),
        ends_at=(start + timedelta(hours=3)).isoformat(),
    )
    created, shown, _ = _create_then_get(client_key, body)
    assert created == shown
    assert created["starts_at"].endswith("Z")


def test_a_reservation_from_a_quote_shows_the_same_on_create_and_read(owner_client, market):
    start = tomorrow()
    quote = owner_client.post(
        "/api/v1/quotes",
        {
            "gpu_model": "h100-sxm-80gb",
            "gpu_count": 8,
            "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=2)).isoformat(),
        },
        format="json",
    ).json()
    created, shown, _ = _create_then_get(owner_client, {"quote": quote["id"]})
    assert created == shown
    assert created["quote"] == quote["id"]
    assert created["transitions"][0]["cause"] == f"created from quote {quote['id']}"


def test_the_create_serialises_the_reservation_once_for_its_event_and_response(
    client_key, market, monkeypatch
):
    # The reservation.created event and the 201 show the same ReservationOutput fields; they
    # come from one pass (the charge is a field of that part: asked for once per create).
    from marketplace import serializers
    from marketplace.apis.reservations import ReservationDetailOutput
    from marketplace.models import Event
    from marketplace.serializers import ReservationOutput

    calls = []
    charged = serializers.reservation_charged
    monkeypatch.setattr(serializers, "reservation_charged", lambda r: calls.append(r) or charged(r))
    response = client_key.post(
        "/api/v1/reservations", reservation_body(site="abilene-1", gpu_count=2), format="json"
    )
    assert response.status_code == 201, response.content
    assert len(calls) == 1
    created = response.json()
    assert list(created) == list(ReservationDetailOutput().fields)  # the detail's order
    event = Event.objects.get(type="reservation.created", object_id=created["id"])
    assert set(event.data) == set(ReservationOutput().fields)
    assert event.data == {name: created[name] for name in event.data}
