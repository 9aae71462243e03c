"""Dates and counts tampered in the portal's query strings: a form error or a way back, never
a 500 or a price for something that cannot be bought."""

from datetime import timedelta

import pytest
from django.urls import reverse

from marketplace.models import ResaleListing
from tests.marketplace.market_helpers import member_client
from tests.marketplace.resale_helpers import market

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)
FAR = ["9999-12-31T23:59", "0001-01-01T00:00", "2200-01-01T00:00"]


@pytest.fixture
def m():
    return market()


@pytest.mark.parametrize("starts_at", FAR)
def test_a_search_from_a_time_out_of_range_is_a_form_error(m, starts_at):
    # 9999-12-31 plus the period's length overflowed datetime (a 500).
    client = member_client(m.buyer, "member")
    response = client.get(
        reverse("portal:search"),
        {"gpu_model": m.model.slug, "gpu_count": 1, "plan": "on_demand", "starts_at": starts_at},
    )
    assert response.status_code in (200, 400)
    assert "Pick a date from 2000 to 2099." in response.content.decode()


@pytest.mark.parametrize("starts_at", FAR)
def test_a_site_window_out_of_range_is_a_form_error(m, starts_at):
    client = member_client(m.buyer, "member")
    response = client.get(
        reverse("portal:site", args=[m.site.slug]), {"starts_at": starts_at, "hours": 24}
    )
    assert response.status_code == 400
    assert "Pick a date from 2000 to 2099." in response.content.decode()


def test_a_tampered_resale_offer_link_is_sent_back_to_search(m):
    member_client(m.seller, "member").post(
        reverse("portal:reservation-resale", args=[m.term.public_id]),
        {"resale-once": "k1", "resale-gpu_count": "2", "resale-starts_at": (m.start + 24 * H).strftime("%Y-%m-%dT%H:%M"),
         "resale-ends_at": (m.start + 48 * H).strftime("%Y-%m-%dT%H:%M"),
         "resale-price_per_gpu_hour": "1.5000", "resale-tier": "on_demand"},
    )  # fmt: skip
    listing = ResaleListing.objects.get()
    buyer = member_client(m.buyer, "member")
    url = reverse("portal:resale-buy", args=[listing.public_id])
    start, end = (m.start + 30 * H).isoformat(), (m.start + 40 * H).isoformat()
    assert buyer.get(url, {"gpu_count": 2, "starts_at": start, "ends_at": end}).status_code == 200

    for params in (
        {"gpu_count": 2, "starts_at": "2026-13-45T00:00:00+00:00", "ends_at": end},  # month 13
        {"gpu_count": 2, "starts_at": start[:19] + "+99:00", "ends_at": end},  # no such offset
        {"gpu_count": 2, "starts_at": "0001-01-01T00:00:00+01:00", "ends_at": end},
        {"gpu_count": 100000, "starts_at": start, "ends_at": end},  # more than it lists
        {"gpu_count": 2, "starts_at": start, "ends_at": "9999-12-31T00:00:00+00:00"},
        {"gpu_count": "1_0", "starts_at": start, "ends_at": end},
    ):
        for response in (buyer.get(url, params), buyer.post(url, params)):
            assert response.status_code == 302, params
            assert response["Location"] == reverse("portal:search")
    listing.refresh_from_db()
    assert listing.status == "open"


@pytest.mark.parametrize(
    "params",
    [
        {"until": "0001-01-01"},  # was an OverflowError
        {"since": "2000-01-01", "until": "2099-12-31"},  # a chart bar per day: 36,500 of them
        {"since": "2001-01-01"},
    ],
)
def test_the_usage_page_refuses_a_period_it_cannot_chart(m, params):
    client = member_client(m.buyer, "owner")
    response = client.get("/billing/usage", params)
    assert response.status_code == 400
    page = response.content.decode()
    assert "Pick a date from 2000 to 2099." in page or "Pick at most 366 days" in page
