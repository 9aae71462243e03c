"""The resale API: list, withdraw, see sales; search shows listings; POST reservations buys one.
Scopes, roles, idempotency keys and bad input as everywhere else in the API."""

from datetime import timedelta

import pytest

from billing.services.usage import reservations_meter
from marketplace.models import ApiKeyScope, ResaleListing, Reservation
from tests.factories import MembershipFactory
from tests.marketplace.api_fixtures import fresh_rate_limits, key_client, session_client  # noqa: F401
from tests.marketplace.resale_helpers import live_rows, market

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)


def iso(t) -> str:
    return t.isoformat().replace("+00:00", "Z")


def body(m, **overrides):
    return {
        "reservation": m.term.public_id,
        "gpu_count": 4,
        "starts_at": iso(m.start + 24 * H),
        "ends_at": iso(m.start + 48 * H),
        "price_per_gpu_hour": "1.5000",
        **overrides,
    }


def test_a_key_lists_time_and_the_listing_is_shown_back():
    m = market()
    seller = key_client(m.seller)

    response = seller.post("/api/v1/resale/listings", body(m, tier="interruptible"), format="json")

    assert response.status_code == 201, response.json()
    data = response.json()
    assert data["id"].startswith("lst_") and data["status"] == "open" and data["for_sale"]
    assert (data["gpu_count"], data["tier"], data["price_per_gpu_hour"]) == (
        4,
        "interruptible",
        "1.5000",
    )
    assert data["reservation"] == m.term.public_id and data["node"] == m.node.hostname
    assert data["sale"] is None
    listed = seller.get("/api/v1/resale/listings").json()["results"]
    assert [r["id"] for r in listed] == [data["id"]]
    assert seller.get(f"/api/v1/resale/listings/{data['id']}").json() == data


@pytest.mark.parametrize(
    ("overrides", "status", "code", "field"),
    [
        ({"starts_at": "2020-01-01T00:00:00Z"}, 400, "window_outside_term", "starts_at"),
        ({"price_per_gpu_hour": "0.0371"}, 400, "price_below_floor", "price_per_gpu_hour"),
        ({"price_per_gpu_hour": 1.5}, 201, None, None),  # a JSON number is read as decimal
        ({"tier": "reserved"}, 400, "invalid_choice", "tier"),
        ({"gpu_count": 9}, 409, "not_enough_gpus", "gpu_count"),
        ({"reservation": "res_nope"}, 404, "not_found", "reservation"),
        ({"ends_at": None}, 400, "null", "ends_at"),
    ],
)
def test_bad_listings_get_a_clear_4xx_and_nothing_is_listed(overrides, status, code, field):
    m = market()
    response = key_client(m.seller).post(
        "/api/v1/resale/listings", body(m, **overrides), format="json"
    )
    assert response.status_code == status, response.json()
    if code:
        error = response.json()["error"]
        assert (error["code"], error["field"]) == (code, field)
        assert not ResaleListing.objects.exists()


def test_another_organisation_can_neither_list_nor_see_nor_withdraw_someones_time():
    m = market()
    lst = key_client(m.seller).post("/api/v1/resale/listings", body(m), format="json").json()
    other = key_client(m.buyer)

    assert other.post("/api/v1/resale/listings", body(m), format="json").status_code == 404
    assert other.get(f"/api/v1/resale/listings/{lst['id']}").status_code == 404
    assert other.post(f"/api/v1/resale/listings/{lst['id']}/withdraw").status_code == 404
    assert other.get("/api/v1/resale/listings").json()["results"] == []
    assert ResaleListing.objects.get().status == "open"


def test_a_read_only_key_and_a_billing_member_cannot_list():
    m = market()
    read_only = key_client(m.seller, scopes=[ApiKeyScope.READ])
    response = read_only.post("/api/v1/resale/listings", body(m), format="json")
    assert (response.status_code, response.json()["error"]["code"]) == (403, "insufficient_scope")
    billing = session_client(MembershipFactory(organization=m.seller, role="billing"))
    response = billing.post("/api/v1/resale/listings", body(m), format="json")
    assert (response.status_code, response.json()["error"]["code"]) == (403, "insufficient_role")
    assert read_only.get("/api/v1/resale/listings").status_code == 200
    assert not ResaleListing.objects.exists()


def test_an_idempotency_key_lists_once_and_replays_the_answer():
    m = market()
    seller = key_client(m.seller)
    headers = {"HTTP_IDEMPOTENCY_KEY": "list-once"}

    first = seller.post("/api/v1/resale/listings", body(m), format="json", **headers)
    again = seller.post("/api/v1/resale/listings", body(m), format="json", **headers)
    other = seller.post("/api/v1/resale/listings", body(m, gpu_count=1), format="json", **headers)

    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again["Idempotent-Replayed"] == "true"
    assert other.status_code == 422
    assert ResaleListing.objects.count() == 1


def test_search_offers_the_listing_a_buyer_books_and_the_seller_sees_the_sale():
    m = market()
    seller, buyer = key_client(m.seller), key_client(m.buyer)
    lst = seller.post("/api/v1/resale/listings", body(m, gpu_count=2), format="json").json()
    start, end = m.start + 30 * H, m.start + 40 * H

    offers = buyer.get(
        "/api/v1/availability",
        {"gpu_model": m.model.slug, "gpu_count": 2, "start": iso(start), "end": iso(end)},
    ).json()["results"]
    (offer,) = [o for o in offers if o["resale"]]
    assert offer["resale"]["listing"] == lst["id"]
    assert (offer["price_per_gpu_hour"], offer["total"]) == ("1.5000", "30.00")

    bought = buyer.post(
        "/api/v1/reservations",
        {"listing": lst["id"], "gpu_count": 2, "starts_at": iso(start), "ends_at": iso(end),
         "workload": {"image": "ghcr.io/acme/train:1"}},
        format="json",
        HTTP_IDEMPOTENCY_KEY="buy-1",
    )  # fmt: skip
    assert bought.status_code == 201, bought.json()
    data = bought.json()
    assert (data["tier"], data["total"], data["allocations"]["gpu_count"]) == (
        "on_demand",
        "30.00",
        2,
    )
    reservation = Reservation.objects.get(public_id=data["id"])
    assert len(live_rows(reservation)) == 2

    # The buyer uses an hour; the seller sees what it brought, less the 10 % fee.
    Reservation.objects.filter(pk=reservation.pk).update(activated_at=start)
    reservations_meter(reservation_ids=[reservation.pk], now=start + H)
    (sale,) = seller.get("/api/v1/resale/sales").json()["results"]
    assert sale["id"] == lst["id"] and sale["status"] == "sold"
    assert sale["sale"]["total"] == "30.00"
    assert (sale["sale"]["proceeds"], sale["sale"]["fees"], sale["sale"]["net"]) == (
        "3.00",
        "0.30",
        "2.70",
    )
    # A sold listing cannot be withdrawn; the buyer never sees the seller's listings.
    response = seller.post(f"/api/v1/resale/listings/{lst['id']}/withdraw")
    assert (response.status_code, response.json()["error"]["code"]) == (409, "listing_sold")
    assert buyer.get("/api/v1/resale/sales").json()["results"] == []


def test_withdrawing_takes_the_listing_out_of_search_and_a_buyer_gets_409():
    m = market()
    seller, buyer = key_client(m.seller), key_client(m.buyer)
    lst = seller.post("/api/v1/resale/listings", body(m, gpu_count=2), format="json").json()

    withdrawn = seller.post(f"/api/v1/resale/listings/{lst['id']}/withdraw")
    twice = seller.post(f"/api/v1/resale/listings/{lst['id']}/withdraw")

    assert withdrawn.status_code == twice.status_code == 200
    assert withdrawn.json()["status"] == "withdrawn" and not withdrawn.json()["for_sale"]
    start, end = m.start + 30 * H, m.start + 40 * H
    offers = buyer.get(
        "/api/v1/availability", {"gpu_count": 2, "start": iso(start), "end": iso(end)}
    ).json()["results"]
    assert [o for o in offers if o["resale"]] == []
    response = buyer.post(
        "/api/v1/reservations",
        {"listing": lst["id"], "gpu_count": 2, "starts_at": iso(start), "ends_at": iso(end)},
        format="json",
    )
    assert (response.status_code, response.json()["error"]["code"]) == (
        409,
        "listing_not_available",
    )
    assert not Reservation.objects.filter(organization=m.buyer).exists()


def test_buying_needs_a_count_and_an_end_and_not_a_quote_too():
    m = market()
    buyer = key_client(m.buyer)
    for payload, field in (
        ({"listing": "lst_x", "ends_at": iso(m.start + 30 * H)}, "gpu_count"),
        ({"listing": "lst_x", "gpu_count": 1}, "ends_at"),
        ({"listing": "lst_x", "quote": "quo_x"}, "listing"),
        # A listing's node is fixed: a filter it would ignore must not look applied.
        (
            {
                "listing": "lst_x",
                "gpu_count": 1,
                "ends_at": iso(m.start + 30 * H),
                "region": "eu-north",
            },
            "region",
        ),
        (
            {
                "listing": "lst_x",
                "gpu_count": 1,
                "ends_at": iso(m.start + 30 * H),
                "min_reliability": "0.9999",
            },
            "min_reliability",
        ),
    ):
        response = buyer.post("/api/v1/reservations", payload, format="json")
        assert response.status_code == 400, payload
        assert response.json()["error"]["field"] == field
    response = buyer.post(
        "/api/v1/reservations",
        {"listing": "lst_nope", "gpu_count": 1, "ends_at": iso(m.start + 30 * H)},
        format="json",
    )
    assert response.status_code == 404
