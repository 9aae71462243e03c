"""A direct booking is priced when it is made; `max_price` caps what the caller will pay, as
the search's filter of the same name: above it the booking is refused and nothing is
written."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest

from marketplace.models import Allocation, Quote, Reservation
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    market,
    org,
    owner,
    owner_client,
    reservation_body,
    tomorrow,
)

pytestmark = pytest.mark.django_db


def test_a_booking_at_a_named_site_priced_above_max_price_is_refused(owner_client, market):
    response = owner_client.post(
        "/api/v1/reservations",
        reservation_body(site="abilene-1", max_price="1.9999"),
        format="json",
    )

    assert_error(response, 409, "price_above_max")
    body = response.json()["error"]
    assert "2.00" in body["message"] and "1.9999" in body["message"], body
    assert (Reservation.objects.count(), Allocation.objects.count()) == (0, 0)


def test_a_booking_at_or_below_max_price_is_made_at_its_price(owner_client, market):
    response = owner_client.post(
        "/api/v1/reservations",
        reservation_body(site="abilene-1", max_price="2.00"),
        format="json",
    )

    assert response.status_code == 201, response.content
    assert response.json()["price_per_gpu_hour"] == "2.0000"


def test_the_cheapest_site_is_booked_only_at_or_below_max_price(owner_client, market):
    refused = owner_client.post(
        "/api/v1/reservations", reservation_body(max_price="1.50"), format="json"
    )
    assert_error(refused, 409, "not_available")
    assert "at or below 1.5000 per GPU-hour" in refused.json()["error"]["message"]
    assert Reservation.objects.count() == 0

    made = owner_client.post("/api/v1/reservations", reservation_body(max_price="5"), format="json")
    assert made.status_code == 201, made.content


def test_a_quote_above_max_price_is_not_taken(owner_client, market):
    start = tomorrow()
    quote = owner_client.post(
        "/api/v1/quotes",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "starts_at": start.isoformat(),
         "ends_at": (start + timedelta(hours=1)).isoformat()},
        format="json",
    ).json()  # fmt: skip

    response = owner_client.post(
        "/api/v1/reservations", {"quote": quote["id"], "max_price": "1.00"}, format="json"
    )

    assert_error(response, 409, "price_above_max")
    assert Reservation.objects.count() == 0
    # The quote is still there to take without the cap.
    taken = owner_client.post("/api/v1/reservations", {"quote": quote["id"]}, format="json")
    assert taken.status_code == 201, taken.content
    assert Quote.objects.get(public_id=quote["id"]).reservation is not None


@pytest.mark.parametrize("bad", ["-1", "abc", "1.00001", ""])
def test_a_bad_max_price_is_a_400(owner_client, market, bad):
    response = owner_client.post(
        "/api/v1/reservations", reservation_body(max_price=bad), format="json"
    )

    assert response.status_code == 400, response.content
    assert response.json()["error"]["field"] == "max_price"
    assert Reservation.objects.count() == 0
