"""Catalogue, quotes and reservations through the API, end to end on real PostgreSQL."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import base64
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from config.errors import InvalidTransition
from marketplace.models import Allocation, Event, Quote, Reservation
from marketplace.services.reservations import reservation_extend
from marketplace.services.retention import history_prune
from marketplace.services.transitions import reservation_transition
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    client_key,
    fresh_rate_limits,
    make_reservation,
    market,
    org,
    other_org,
    owner,
    owner_client,
    reservation_body,
    session_client,
    tomorrow,
)

pytestmark = pytest.mark.django_db


def iso(dt) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def test_it_lists_gpu_models_and_sites_with_public_facts(client_key, market):
    site, gpu_model = market
    models = client_key.get("/api/v1/gpu-models").json()
    assert models["results"] == [
        {
            "id": "h100-sxm-80gb",
            "name": gpu_model.name,
            "vendor": "NVIDIA",
            "memory_gb": 80,
            "tdp_watts": 700,
            "interconnect": "NVLink 900 GB/s",
        }
    ]
    sites = client_key.get("/api/v1/sites").json()["results"]
    assert sites == [
        {
            "id": "abilene-1",
            "name": site.name,
            "status": "active",
            "region": "us-central",
            "country": "US",
            "grid_operator": "ERCOT",
            "price_zone": None,
            "power_capacity_kw": "25000.0",
            "pue": "1.15",
            "renewable_share": "0.420",
            "cooling": "immersion",
            "uplink_gbps": 100,
            "former_use": "bitcoin mining",
            "reliability_30d": None,  # computed hourly; none yet
            "capacity": {
                "nodes": 2,
                "gpus": 16,
                "gpu_models": [
                    {"gpu_model": "h100-sxm-80gb", "nodes": 2, "gpus": 16, "available_nodes": 2}
                ],
            },
        }
    ]
    assert "energy_price_per_mwh" not in sites[0]


def test_availability_search_returns_priced_offers(client_key, market):
    start = tomorrow()
    end = start + timedelta(hours=10)
    response = client_key.get(
        "/api/v1/availability",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 4, "start": iso(start), "end": iso(end)},
    )
    assert response.status_code == 200, response.content
    (offer,) = response.json()["results"]
    assert offer["site"] == {
        "id": "abilene-1",
        "name": market[0].name,
        "region": "us-central",
        "country": "US",
    }
    assert offer["gpu_count"] == 4
    assert offer["placement"] == "single_node"
    assert offer["currency"] == "usd"
    assert offer["price_per_gpu_hour"] == "2.0000"
    assert offer["total"] == "80.00"
    assert offer["breakdown"]["total"] == "80.00"

    too_cheap = client_key.get(
        "/api/v1/availability",
        {"gpu_count": 4, "start": iso(start), "end": iso(end), "max_price": "1.99"},
    )
    assert too_cheap.json() == {"results": []}


@pytest.mark.parametrize(
    "start_offset, code",
    [(timedelta(days=-2), "starts_in_past"), (timedelta(days=400), "starts_too_far_ahead")],
)
def test_availability_refuses_a_period_no_reservation_could_have(
    client_key, market, start_offset, code
):
    # Exactness: an offer is something that can be reserved now, so a period that reserving
    # would refuse gets the same 400, not offers nobody can book.
    start = tomorrow() + start_offset
    response = client_key.get(
        "/api/v1/availability",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "start": iso(start),
         "end": iso(start + timedelta(hours=2))},
    )  # fmt: skip
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["field"] == "start"  # the parameter sent, not starts_at


@pytest.mark.parametrize("count", ["1_0", "\u0661", "2.5e0"])
def test_availability_reads_a_whole_number_as_ascii_digits_only(client_key, market, count):
    start = tomorrow()
    response = client_key.get(
        "/api/v1/availability",
        {"gpu_count": count, "start": start.isoformat(),
         "end": (start + timedelta(hours=1)).isoformat()},
    )  # fmt: skip
    assert response.status_code == 400, response.content
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (
        "invalid", "gpu_count"
    )  # fmt: skip


@pytest.mark.parametrize("length", [timedelta(milliseconds=500), timedelta(seconds=59)])
def test_availability_refuses_a_window_under_a_minute(client_key, market, length):
    # Under a second was priced over zero seconds (a 500); under a minute is nothing a
    # reservation may be (RESERVATION_MIN_SECONDS, 60).
    start = tomorrow()
    response = client_key.get(
        "/api/v1/availability",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "start": start.isoformat(),
         "end": (start + length).isoformat()},
    )  # fmt: skip
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "period_too_short"
    # The search is asked with start and end: the error names the parameter sent.
    assert response.json()["error"]["field"] == "end"


def test_a_site_availability_window_under_a_minute_names_end(client_key, market):
    start = tomorrow()
    response = client_key.get(
        "/api/v1/sites/abilene-1/availability",
        {"start": iso(start), "end": iso(start + timedelta(seconds=30))},
    )
    assert_error(response, 400, "period_too_short", "end")  # not ends_at, never sent


def test_a_reserved_term_longer_than_the_window_names_end(client_key, market):
    start = tomorrow()
    response = client_key.get(
        "/api/v1/availability",
        {"tier": "reserved", "term": "1w", "start": iso(start),
         "end": iso(start + timedelta(days=1))},
    )  # fmt: skip
    assert_error(response, 400, "period_shorter_than_term", "end")


def test_site_availability_counts_free_gpus(client_key, owner_client, market):
    make_reservation(owner_client, gpu_count=3)
    start = tomorrow()
    response = client_key.get(
        "/api/v1/sites/abilene-1/availability",
        {"start": iso(start), "end": iso(start + timedelta(hours=1))},
    )
    assert response.status_code == 200, response.content
    assert response.json()["results"] == [
        {
            "gpu_model": "h100-sxm-80gb",
            "nodes": 2,
            "healthy_gpus": 16,
            "free_gpus": 13,
            "largest_free_on_one_node": 8,
            "whole_free_nodes": 1,
        }
    ]
    assert_error(
        client_key.get("/api/v1/sites/nowhere/availability", {"end": iso(start)}),
        404,
        "site_not_found",
    )


def test_a_quote_becomes_a_reservation_at_its_price(owner_client, market, owner):
    start = tomorrow()
    response = owner_client.post(
        "/api/v1/quotes",
        {
            "gpu_model": "h100-sxm-80gb",
            "gpu_count": 8,
            "starts_at": iso(start),
            "ends_at": iso(start + timedelta(hours=2)),
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    quote = response.json()
    assert quote["id"].startswith("quo_")
    assert (quote["total"], quote["currency"], quote["expired"]) == ("32.00", "usd", False)
    assert quote["reservation"] is None

    response = owner_client.post(
        "/api/v1/reservations",
        {"quote": quote["id"], "workload": {"image": "ghcr.io/acme/train:1.0", "ports": [8888]}},
        format="json",
    )
    assert response.status_code == 201, response.content
    reservation = response.json()
    assert reservation["id"].startswith("res_")
    assert reservation["quote"] == quote["id"]
    assert reservation["status"] == "pending"
    assert reservation["total"] == "32.00"
    assert reservation["starts_at"] == iso(start)
    assert reservation["allowed_actions"] == ["cancel", "extend"]
    assert reservation["allocations"]["gpu_count"] == 8
    assert reservation["allocations"]["node_count"] == 1
    assert reservation["workload"] == {
        "image": "ghcr.io/acme/train:1.0",
        "ssh_public_keys": [],
        "env_names": [],
        "ports": [8888],
    }
    assert reservation["connection"] is None
    assert [t["to_status"] for t in reservation["transitions"]] == ["pending"]
    assert (
        owner_client.get(f"/api/v1/quotes/{quote['id']}").json()["reservation"]
        == (reservation["id"])
    )

    again = owner_client.post("/api/v1/reservations", {"quote": quote["id"]}, format="json")
    assert_error(again, 409, "quote_used")
    assert Reservation.objects.count() == 1


def _quote(client, start):
    response = client.post(
        "/api/v1/quotes",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "starts_at": iso(start),
         "ends_at": iso(start + timedelta(hours=1))},
        format="json",
    )  # fmt: skip
    assert response.status_code == 201, response.content
    return response.json()


def test_a_quote_retention_deleted_answers_410_quote_expired_not_404(
    owner_client, market, settings
):
    settings.QUOTE_TTL = timedelta(0)  # expired as soon as it is made
    quote = _quote(owner_client, tomorrow())
    history_prune(now=timezone.now() + timedelta(days=2))
    assert not Quote.objects.exists()

    gone = assert_error(owner_client.get(f"/api/v1/quotes/{quote['id']}"), 410, "quote_expired")
    assert gone["field"] == "quote"
    booked = owner_client.post("/api/v1/reservations", {"quote": quote["id"]}, format="json")
    assert_error(booked, 410, "quote_expired", field="quote")
    assert Reservation.objects.count() == 0


def test_an_id_we_did_not_issue_or_a_quote_not_yet_expired_elsewhere_stays_404(
    owner_client, market, settings, other_org
):
    quote = _quote(owner_client, tomorrow())
    forged = quote["id"][:-1] + ("A" if quote["id"][-1] != "A" else "B")
    other = session_client(other_org.memberships.get())
    for client, quote_id in ((owner_client, forged), (other, quote["id"])):
        assert_error(client.get(f"/api/v1/quotes/{quote_id}"), 404, "quote_not_found")
    assert_error(owner_client.get("/api/v1/quotes/quo_nope"), 404, "quote_not_found")


def test_an_expired_quote_is_refused(owner_client, market):
    start = tomorrow()
    quote = owner_client.post(
        "/api/v1/quotes",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "starts_at": iso(start),
         "ends_at": iso(start + timedelta(hours=1))},
        format="json",
    ).json()  # fmt: skip
    Quote.objects.filter(public_id=quote["id"]).update(expires_at=timezone.now())
    response = owner_client.post("/api/v1/reservations", {"quote": quote["id"]}, format="json")
    assert_error(response, 409, "quote_expired", field="quote")
    assert Reservation.objects.count() == 0
    assert Allocation.objects.count() == 0


def test_a_reservation_shows_connection_details_only_when_active(owner_client, market):
    created = make_reservation(owner_client, starts_at=iso(timezone.now()))
    reservation = Reservation.objects.get(public_id=created["id"])
    assert created["status"] == "scheduled"
    Reservation.objects.filter(pk=reservation.pk).update(
        connection={"host": "n1.example", "ssh_port": 22}
    )
    url = f"/api/v1/reservations/{created['id']}"
    assert owner_client.get(url).json()["connection"] is None
    for status in ("provisioning", "active"):
        reservation_transition(
            reservation=reservation, to_status=status, cause="test", actor_label="test"
        )
    body = owner_client.get(url).json()
    assert body["status"] == "active"
    assert body["connection"] == {
        "host": "n1.example",
        "ssh_port": 22,
        "ports": {},
        "simulated": False,
    }
    assert body["activated_at"] is not None


def test_cancellation_terms_are_shown_then_applied(owner_client, market):
    created = make_reservation(owner_client)
    url = f"/api/v1/reservations/{created['id']}"
    terms = owner_client.get(f"{url}/cancellation-terms").json()
    assert terms["action"] == "cancel"
    # On-demand is charged only as used: nothing to refund, nothing kept.
    assert (terms["refund_amount"], terms["fee_amount"], terms["currency"]) == (
        "0.00",
        "0.00",
        "usd",
    )
    assert (terms["unused_amount"], terms["refund_fraction"]) == ("0.00", "1.00")
    response = owner_client.post(f"{url}/cancel", {"reason": "plans changed"}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "cancelled"
    assert body["allowed_actions"] == []
    assert body["cancellation"]["refund_amount"] == "0.00"
    assert body["cancellation"]["refund_fraction"] == terms["refund_fraction"] == "1.00"
    assert owner_client.get(url).json()["cancellation"] == body["cancellation"]
    assert body["cancellation"]["reason"] == "plans changed"
    assert [t["to_status"] for t in body["transitions"]] == ["pending", "cancelled"]
    assert Allocation.objects.filter(is_live=True).count() == 0


def test_a_cancel_naming_the_refund_it_was_shown_is_refused_if_it_shrank(owner_client, market):
    start = tomorrow() + timedelta(days=2)
    created = make_reservation(owner_client, tier="reserved", term="1w", starts_at=iso(start),
                               ends_at=iso(start + timedelta(days=7)))  # fmt: skip
    url = f"/api/v1/reservations/{created['id']}"
    terms = owner_client.get(f"{url}/cancellation-terms").json()
    assert terms["refund_fraction"] == "0.50"  # days' notice, under a week: half

    # As if the terms were read when a full refund was due (a boundary passed since).
    refused = owner_client.post(f"{url}/cancel", {"expected_refund_fraction": "1"}, format="json")
    assert assert_error(refused, 409, "refund_changed")
    assert owner_client.get(url).json()["status"] == "pending"
    bad = owner_client.post(f"{url}/cancel", {"expected_refund_fraction": "2"}, format="json")
    assert_error(bad, 400, field="expected_refund_fraction")

    done = owner_client.post(f"{url}/cancel", {"expected_refund_fraction": "0.5"}, format="json")
    assert done.status_code == 200, done.content
    # Applied as stated, and written as cancellation-terms wrote it (stored as "0.5").
    assert done.json()["cancellation"]["refund_fraction"] == terms["refund_fraction"] == "0.50"


def test_applied_terms_stored_as_printed_show_their_fraction_with_two_places(owner_client, market):
    """Rows hold the service's Decimal printed ("1", "0.5"); the API writes a fraction as
    cancellation-terms does. A stored value that is not a number is shown as it is."""
    created = make_reservation(owner_client)
    url = f"/api/v1/reservations/{created['id']}"
    for stored, shown in (("1", "1.00"), ("0.5", "0.50"), ("0", "0.00"), ("oops", "oops")):
        Reservation.objects.filter(public_id=created["id"]).update(
            cancellation={"refund_fraction": stored, "refund_amount": "0.00", "rule": "r"}
        )
        body = owner_client.get(url).json()
        assert body["cancellation"] == {"refund_fraction": shown, "refund_amount": "0.00",
                                        "rule": "r"}  # fmt: skip
    # Reservation events (and so webhooks) carry no terms: no third way of writing it.
    owner_client.post(f"{url}/cancel", format="json")
    cancelled = Event.objects.get(object_id=created["id"], type="reservation.cancelled")
    assert "cancellation" not in cancelled.data


def test_an_action_not_allowed_gets_409_with_the_reason(owner_client, market):
    created = make_reservation(owner_client)
    url = f"/api/v1/reservations/{created['id']}"
    owner_client.post(f"{url}/cancel", {}, format="json")
    error = assert_error(owner_client.post(f"{url}/cancel", {}, format="json"), 409)
    assert error["code"] == "cancel_not_allowed"
    assert "cancelled" in error["message"]
    new_end = iso(tomorrow(hours=10))
    error = assert_error(
        owner_client.post(f"{url}/extend", {"ends_at": new_end}, format="json"), 409
    )
    assert error["code"] == "extend_not_allowed"
    assert_error(owner_client.get(f"{url}/cancellation-terms"), 409, "cancel_not_allowed")


def test_extend_moves_the_end_and_the_total(owner_client, market):
    created = make_reservation(owner_client)
    new_end = tomorrow(hours=5)
    response = owner_client.post(
        f"/api/v1/reservations/{created['id']}/extend", {"ends_at": iso(new_end)}, format="json"
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["ends_at"] == iso(new_end)
    assert Decimal(body["total"]) == Decimal("20.00")  # 2 GPUs × 5 h × 2.00
    extension = body["transitions"][-1]
    assert (extension["from_status"], extension["to_status"]) == (body["status"], body["status"])
    assert extension["cause"].startswith("extended: end ")
    assert extension["actor"].startswith("user:")


def test_work_under_an_interruption_notice_cannot_be_extended_by_any_caller(owner_client, market):
    """The refusal is the service's: the API (terms and extend) and the service itself."""
    created = make_reservation(owner_client)
    url = f"/api/v1/reservations/{created['id']}"
    notice = timezone.now() + timedelta(hours=2)
    Reservation.objects.filter(public_id=created["id"]).update(
        tier="interruptible", preempt_at=notice, preempt_reason="Grid curtailment"
    )
    new_end = iso(tomorrow(hours=5))

    assert owner_client.get(url).json()["allowed_actions"] == ["cancel"]
    for response in (
        owner_client.get(f"{url}/extension-terms", {"ends_at": new_end}),
        owner_client.post(f"{url}/extend", {"ends_at": new_end}, format="json"),
    ):
        error = assert_error(response, 409, "interruption_announced")
        assert "interruption is announced" in error["message"]
    after = Reservation.objects.get(public_id=created["id"])
    assert (iso(after.ends_at), str(after.total_amount)) == (created["ends_at"], created["total"])
    assert after.transitions.count() == len(created["transitions"])
    with pytest.raises(InvalidTransition) as refused:
        reservation_extend(
            reservation=after, new_ends_at=tomorrow(hours=5), actor_label="staff: someone"
        )
    assert refused.value.code == "interruption_announced"

    # The notice withdrawn, the same extension goes through.
    Reservation.objects.filter(pk=after.pk).update(preempt_at=None, preempt_reason="")
    response = owner_client.post(f"{url}/extend", {"ends_at": new_end}, format="json")
    assert response.status_code == 200, response.content


def test_extension_terms_state_the_extra_cost_and_change_nothing(owner_client, market):
    created = make_reservation(owner_client)  # 2 GPUs, 3 h at 2.00: 12.00
    url = f"/api/v1/reservations/{created['id']}"

    response = owner_client.get(f"{url}/extension-terms", {"ends_at": iso(tomorrow(hours=5))})

    assert response.status_code == 200, response.content
    terms = response.json()
    assert (terms["extra_amount"], terms["new_total"], terms["charged_now"]) == (
        "8.00",
        "20.00",
        "0.00",
    )
    assert terms["new_ends_at"] == iso(tomorrow(hours=5))
    after = owner_client.get(url).json()
    assert (after["ends_at"], after["total"]) == (created["ends_at"], created["total"])
    assert len(after["transitions"]) == len(created["transitions"])
    error = assert_error(
        owner_client.get(f"{url}/extension-terms", {"ends_at": iso(tomorrow(hours=1))}), 400
    )
    assert (error["code"], error["field"]) == ("not_later", "ends_at")
    assert_error(owner_client.get(f"{url}/extension-terms"), 400, "required")


def test_list_filters_by_status_tier_site_and_created_range(owner_client, market):
    first = make_reservation(owner_client)
    second = make_reservation(owner_client, gpu_count=1)
    owner_client.post(f"/api/v1/reservations/{first['id']}/cancel", {}, format="json")

    def ids(**params):
        response = owner_client.get("/api/v1/reservations", params)
        assert response.status_code == 200, response.content
        return [r["id"] for r in response.json()["results"]]

    assert ids() == [second["id"], first["id"]]
    assert ids(status="cancelled") == [first["id"]]
    assert ids(status=["pending", "cancelled"]) == [second["id"], first["id"]]
    assert ids(tier="reserved") == []
    assert ids(site="abilene-1") == [second["id"], first["id"]]
    assert ids(site="elsewhere") == []
    assert ids(created_after=iso(timezone.now() + timedelta(minutes=1))) == []
    assert ids(created_before=iso(timezone.now() + timedelta(minutes=1))) == [
        second["id"],
        first["id"],
    ]
    assert_error(owner_client.get("/api/v1/reservations", {"status": "bogus"}), 400, field="status")


def test_updated_after_lists_what_changed_since_a_sync(owner_client, market):
    first = make_reservation(owner_client)
    second = make_reservation(owner_client, gpu_count=1)
    synced_at = timezone.now()
    owner_client.post(f"/api/v1/reservations/{first['id']}/cancel", {}, format="json")

    def ids(**params):
        response = owner_client.get("/api/v1/reservations", params)
        assert response.status_code == 200, response.content
        return [r["id"] for r in response.json()["results"]]

    assert ids(updated_after=iso(synced_at)) == [first["id"]]
    assert ids(updated_after=iso(synced_at - timedelta(minutes=5))) == [second["id"], first["id"]]
    assert_error(
        owner_client.get("/api/v1/reservations", {"updated_after": "yesterday"}),
        400,
        field="updated_after",
    )


def test_cursor_pagination_walks_every_reservation_once(owner_client, market):
    made = [make_reservation(owner_client, gpu_count=1)["id"] for _ in range(5)]
    seen, url = [], "/api/v1/reservations?limit=2"
    pages = 0
    while url:
        body = owner_client.get(url).json()
        assert len(body["results"]) <= 2
        seen += [r["id"] for r in body["results"]]
        url = body["next"]
        pages += 1
    assert pages == 3
    assert seen == list(reversed(made))
    assert_error(
        owner_client.get("/api/v1/reservations?cursor=garbage"), 400, "invalid_cursor", "cursor"
    )
    # One that decodes, with a position that is no time (a forged cursor), is as invalid.
    forged = base64.b64encode(b"p=garbage").decode()
    for url in (f"/api/v1/reservations?cursor={forged}", f"/api/v1/api-keys?cursor={forged}"):
        assert_error(owner_client.get(url), 400, "invalid_cursor", "cursor")


@pytest.mark.parametrize("limit", ["abc", "null", "0", "-1", "101", "2.5", "", "1_0", " 5"])
@pytest.mark.parametrize("url", ["/api/v1/reservations", "/api/v1/gpu-models", "/api/v1/api-keys"])
def test_a_limit_outside_1_to_100_is_refused_not_quietly_replaced(owner_client, market, url, limit):
    assert_error(owner_client.get(url, {"limit": limit}), 400, "invalid_limit", "limit")


def test_the_largest_limit_is_applied(owner_client, market):
    for _ in range(3):
        make_reservation(owner_client, gpu_count=1)
    body = owner_client.get("/api/v1/reservations", {"limit": "100"}).json()
    assert len(body["results"]) == 3 and body["next"] is None


def test_a_billing_member_can_read_but_not_reserve(market, org, owner):
    from marketplace.models import Role
    from tests.factories import MembershipFactory
    from tests.marketplace.api_fixtures import session_client

    billing = session_client(MembershipFactory(organization=org, role=Role.BILLING))
    assert billing.get("/api/v1/reservations").status_code == 200
    assert_error(
        billing.post("/api/v1/reservations", reservation_body(), format="json"),
        403,
        "insufficient_role",
    )
    assert_error(billing.post("/api/v1/quotes", reservation_body(), format="json"), 403)
    assert Reservation.objects.count() == 0
