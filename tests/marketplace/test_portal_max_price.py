"""The portal's prices per GPU-hour are read as typed digits (the search's max price, a resale
listing's asking price), and the search's max price goes with "Hold this price" to the quote's
page and binds the booking made from it, as the API's `max_price` does."""

import re
from datetime import timedelta
from decimal import Decimal
from html import unescape

import pytest
from django.urls import reverse

from billing.models import BillingAccount, LedgerKind
from billing.services.ledger import ledger_entry_add
from marketplace.models import Quote, RateCard, ResaleListing, Reservation, Role
from tests.clients import HttpsClient
from tests.factories import GpuModelFactory, MembershipFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (
    make_nodes,
    make_policy,
    make_rate,
    member_client,
    tomorrow,
)
from tests.marketplace.resale_helpers import market as resale_market

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)
LOOSE = ["1e3", "1E2", "1_000", "１０", "0x10", "٣"]


def _market():
    """A site of two 8-GPU nodes at 2.0000 USD per GPU-hour (on-demand at the list price), and
    a funded organisation with an owner signed in."""
    model = GpuModelFactory()
    make_policy()
    site = SiteFactory()
    make_rate(model, "2.0000", site=site)
    make_nodes(site, model, 2)
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, currency="usd")
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=10_000_000,
                     currency="usd", idempotency_key=f"fund:{org.pk}")  # fmt: skip
    client = HttpsClient()
    client.force_login(MembershipFactory(organization=org, role=Role.OWNER).user)
    return model, site, org, client


def _search(model, site, **more) -> dict:
    return {"gpu_model": model.slug, "site": site.slug, "gpu_count": 2, "plan": "on_demand",
            "starts_at": tomorrow(2).strftime("%Y-%m-%dT%H:%M"), "hours": 3, **more}  # fmt: skip


def _hidden_inputs(html: str, form_pattern: str) -> dict:
    """The hidden inputs of the page's first form whose opening tag matches `form_pattern`."""
    form = re.search(form_pattern + r".*?</form>", html, flags=re.S).group(0)
    return {
        name: unescape(value)
        for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form)
    }


def _hold_this_price(client, model, site, max_price: str):
    """Search with a max price, then press the first offer's "Hold this price" as the page
    writes it; returns the response (a redirect to the quote's page)."""
    page = client.get(
        reverse("portal:search"), _search(model, site, max_price_per_gpu_hour=max_price)
    )
    assert page.status_code == 200
    offer = _hidden_inputs(page.content.decode(), r'<form method="post" action="/quotes">')
    return client.post(reverse("portal:quote-create"), offer)


def _text(response) -> str:
    html = re.sub(r"<script.*?</script>", "", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


# --- Strict numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("typed", LOOSE)
def test_a_search_max_price_not_typed_as_digits_is_a_form_error(typed):
    model, site, _, client = _market()

    response = client.get(
        reverse("portal:search"), _search(model, site, max_price_per_gpu_hour=typed)
    )

    assert response.status_code == 400
    assert "Enter a number." in _text(response)
    assert 'id="offers"' not in response.content.decode()


def test_a_search_max_price_has_four_places_and_filters_the_offers():
    model, site, _, client = _market()

    def offers(max_price: str) -> str:
        response = client.get(
            reverse("portal:search"), _search(model, site, max_price_per_gpu_hour=max_price)
        )
        return response.status_code, _text(response)

    assert offers("2.0000")[0] == 200 and "1 offer " in offers("2.0000")[1]
    assert offers("1.9999")[0] == 200 and "0 offers" in offers("1.9999")[1]
    status, text = offers("2.00001")
    assert status == 400 and "Ensure that there are no more than 4 decimal places." in text


@pytest.mark.parametrize("typed", LOOSE)
def test_a_resale_asking_price_not_typed_as_digits_is_refused_and_lists_nothing(typed):
    m = resale_market()
    seller = member_client(m.seller, "member")
    body = {"resale-once": "k1", "resale-gpu_count": "2",
            "resale-starts_at": (m.start + 24 * H).strftime("%Y-%m-%dT%H:%M"),
            "resale-ends_at": (m.start + 48 * H).strftime("%Y-%m-%dT%H:%M"),
            "resale-price_per_gpu_hour": typed, "resale-tier": "on_demand"}  # fmt: skip
    url = reverse("portal:reservation-resale", args=[m.term.public_id])

    refused = seller.post(url, body)

    assert refused.status_code == 400
    assert "Enter a number." in _text(refused)
    assert not ResaleListing.objects.exists()
    listed = seller.post(url, body | {"resale-once": "k2", "resale-price_per_gpu_hour": "1.5000"})
    assert listed.status_code == 302
    assert ResaleListing.objects.get().price_per_gpu_hour == Decimal("1.5000")


# --- The max price through "Hold this price" --------------------------------------------------


def test_the_max_price_goes_with_the_quote_and_a_booking_within_it_is_made():
    model, site, org, client = _market()

    held = _hold_this_price(client, model, site, "2.5")
    quote = Quote.objects.get(organization=org)
    page = client.get(held["Location"])
    form = _hidden_inputs(page.content.decode(), r'<form method="post" class="card" id="reserve">')
    booked = client.post(held["Location"], {**form, "without_ssh": "on"})

    assert held["Location"] == f"/quotes/{quote.public_id}?max_price_per_gpu_hour=2.5"
    assert "Your max price 2.5000 USD per GPU-hour, from your search" in _text(page)
    assert form["max_price_per_gpu_hour"] == "2.5"
    assert "max_price_per_gpu_hour=2.5" in unescape(
        re.search(r'href="([^"]*)">Back to the search', page.content.decode()).group(1)
    )
    assert booked.status_code == 302
    assert Reservation.objects.get(organization=org).price_per_gpu_hour == Decimal("2.0000")


def test_a_quote_priced_above_the_searchs_max_price_is_not_booked():
    model, site, org, client = _market()
    # The price rises between the search and "Hold this price": the quote holds the new one.
    search = client.get(
        reverse("portal:search"), _search(model, site, max_price_per_gpu_hour="2.5")
    )
    offer = _hidden_inputs(search.content.decode(), r'<form method="post" action="/quotes">')
    rate = RateCard.objects.get(gpu_model=model)
    rate.price_per_gpu_hour = Decimal("3.0000")
    rate.save()  # saved, not updated: the reference cache is cleared as staff's edit clears it
    held = client.post(reverse("portal:quote-create"), offer)
    page = client.get(held["Location"])
    form = _hidden_inputs(page.content.decode(), r'<form method="post" class="card" id="reserve">')

    refused = client.post(held["Location"], {**form, "without_ssh": "on"})

    assert Quote.objects.get(organization=org).price_per_gpu_hour == Decimal("3.0000")
    assert "this price is above it, so it will not be reserved" in _text(page)
    assert refused.status_code == 409
    assert "above your max_price of 2.5: nothing was booked." in _text(refused)
    assert not Reservation.objects.filter(organization=org).exists()


@pytest.mark.parametrize("typed", LOOSE)
def test_a_tampered_max_price_on_the_quote_books_nothing(typed):
    model, site, org, client = _market()
    held = _hold_this_price(client, model, site, "2.5")
    quote_url = held["Location"].split("?")[0]

    shown = client.get(quote_url, {"max_price_per_gpu_hour": typed})
    refused = client.post(quote_url, {"max_price_per_gpu_hour": typed, "without_ssh": "on"})

    assert shown.status_code == 302 and shown["Location"].startswith(reverse("portal:search"))
    assert refused.status_code == 400
    assert (
        "The search&#x27;s max price could not be read; search again." in refused.content.decode()
    )
    assert not Reservation.objects.filter(organization=org).exists()
