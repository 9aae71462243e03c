"""The portal's resale: list from a reserved term's page, withdraw, see listings and sales, and
find and reserve resold time from the search."""

import secrets
from datetime import timedelta

import pytest
from django.urls import reverse

from marketplace.models import ResaleListing, Reservation
from tests.marketplace.market_helpers import member_client
from tests.marketplace.resale_helpers import live_rows, market

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)


def minute(t) -> str:
    return t.strftime("%Y-%m-%dT%H:%M")


def form(m, **overrides):
    fields = {
        "once": secrets.token_urlsafe(8),  # the form's one-time key, new each time it is shown
        "gpu_count": "4",
        "starts_at": minute(m.start + 24 * H),
        "ends_at": minute(m.start + 48 * H),
        "price_per_gpu_hour": "1.5000",
        "tier": "on_demand",
        **overrides,
    }
    return {f"resale-{name}": value for name, value in fields.items()}


def test_a_term_is_listed_from_its_page_withdrawn_and_shown_on_the_resale_page():
    m = market()
    seller = member_client(m.seller, "member")
    page = reverse("portal:reservation", args=[m.term.public_id])
    assert 'id="resale-form"' in seller.get(page).content.decode()

    response = seller.post(reverse("portal:reservation-resale", args=[m.term.public_id]), form(m))

    assert response.status_code == 302
    listing = ResaleListing.objects.get()
    assert (listing.gpu_count, listing.status) == (4, "open")
    html = seller.get(page).content.decode()
    assert listing.public_id in html and "Withdraw" in html
    assert listing.public_id in seller.get(reverse("portal:resale")).content.decode()

    seller.post(reverse("portal:resale-withdraw", args=[listing.public_id]))
    listing.refresh_from_db()
    assert listing.status == "withdrawn"


def test_a_listing_below_the_floor_is_refused_on_the_page_and_nothing_is_listed():
    m = market()
    seller = member_client(m.seller, "member")
    response = seller.post(
        reverse("portal:reservation-resale", args=[m.term.public_id]),
        form(m, price_per_gpu_hour="0.0371"),
    )
    assert response.status_code == 400
    assert "at least the floor" in response.content.decode()
    assert not ResaleListing.objects.exists()


def test_a_billing_member_sees_no_form_and_cannot_list():
    m = market()
    billing = member_client(m.seller, "billing")
    page = billing.get(reverse("portal:reservation", args=[m.term.public_id])).content.decode()
    assert 'id="resale-form"' not in page
    response = billing.post(reverse("portal:reservation-resale", args=[m.term.public_id]), form(m))
    assert response.status_code == 403
    assert not ResaleListing.objects.exists()


def test_a_buyer_finds_resold_time_in_the_search_and_reserves_it():
    m = market()
    member_client(m.seller, "member").post(
        reverse("portal:reservation-resale", args=[m.term.public_id]), form(m, gpu_count="2")
    )
    listing = ResaleListing.objects.get()
    buyer = member_client(m.buyer, "member")
    start = m.start + 30 * H

    search = buyer.get(
        reverse("portal:search"),
        {"gpu_model": m.model.slug, "gpu_count": 2, "plan": "on_demand",
         "starts_at": minute(start), "hours": 10},
    ).content.decode()  # fmt: skip

    assert "Resold" in search
    buy_url = reverse("portal:resale-buy", args=[listing.public_id])
    assert buy_url in search
    params = {
        "gpu_count": 2,
        "starts_at": start.isoformat(),
        "ends_at": (start + 10 * H).isoformat(),
    }
    page = buyer.get(buy_url, params)
    assert page.status_code == 200 and "30.00 USD" in page.content.decode()

    response = buyer.post(buy_url, {**params, "without_ssh": "on"})

    assert response.status_code == 302, response.content.decode()[:2000]
    bought = Reservation.objects.get(organization=m.buyer)
    assert len(live_rows(bought)) == 2
    listing.refresh_from_db()
    assert listing.status == "sold" and listing.buyer_reservation == bought
