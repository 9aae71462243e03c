"""An organisation books in the one currency it is billed in. Where Switchyard chooses the
site (a quote, a booking that names none) it chooses among offers in that currency, however
cheap another currency's figures look; the portal's search shows only those; the API's search
filters by `currency` when asked."""

from decimal import Decimal

import pytest

from billing.models import BillingAccount, Hold
from config.errors import NotAvailable
from marketplace.models import Quote, Reservation, Role
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (
    make_nodes,
    make_policy,
    make_rate,
    member_client,
    tomorrow,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def two_currencies():
    """The same model at a euro site priced 1.00 EUR (the smaller figure) and at a dollar site
    priced 2.00 USD."""
    make_policy()
    model = GpuModelFactory()
    eur = SiteFactory(slug="oslo-1", name="Oslo One")
    usd = SiteFactory(slug="texas-1", name="Texas One")
    make_rate(model, "1.0000", site=eur, currency="eur")
    make_rate(model, "2.0000", site=usd, currency="usd")
    make_nodes(eur, model, 1, gpus=8)
    make_nodes(usd, model, 1, gpus=8)
    return model, eur, usd


def _billed_in(currency: str, *, credit: bool = True):
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, currency=currency)
    if credit:
        from billing.models import LedgerKind
        from billing.services.ledger import ledger_entry_add

        ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=1_000_000,
                         currency=currency, idempotency_key=f"credit:{org.pk}")  # fmt: skip
    return org


def _ask(model, **extra) -> dict:
    return dict(gpu_model=model.slug, gpu_count=2, tier="on_demand", starts_at=tomorrow(),
                ends_at=tomorrow(3), **extra)  # fmt: skip


@pytest.mark.parametrize("currency", ["usd", "eur"])
def test_a_booking_that_names_no_site_takes_the_cheapest_in_the_billing_currency(
    two_currencies, currency
):
    model, eur, usd = two_currencies
    org = _billed_in(currency)

    reservation = reservation_create(organization=org, **_ask(model))

    assert (reservation.site, reservation.currency) == ({"eur": eur, "usd": usd}[currency],
                                                         currency)  # fmt: skip
    assert list(Hold.objects.values_list("currency", flat=True)) == [currency]


def test_a_quote_is_for_the_cheapest_offer_in_the_billing_currency(two_currencies):
    model, _eur, usd = two_currencies
    org = _billed_in("usd", credit=False)

    quote = quote_create(organization=org, **_ask(model))

    assert (quote.site, quote.currency, quote.price_per_gpu_hour) == (usd, "usd", Decimal("2"))


def test_an_organisation_without_an_account_yet_is_offered_the_default_currency(
    two_currencies, settings
):
    model, eur, _usd = two_currencies
    settings.CURRENCY = "eur"

    quote = quote_create(organization=OrganizationFactory(), **_ask(model))

    assert (quote.site, quote.currency) == (eur, "eur")


def test_with_gpus_only_in_another_currency_the_refusal_says_so_and_writes_nothing(
    two_currencies,
):
    model, _eur, usd = two_currencies
    usd.nodes.update(status="maintenance")
    org = _billed_in("usd")

    with pytest.raises(NotAvailable) as booking:
        reservation_create(organization=org, **_ask(model))
    with pytest.raises(NotAvailable) as quoting:
        quote_create(organization=org, **_ask(model))

    for error in (booking.value, quoting.value):
        assert error.code == "not_available"
        assert error.message == (
            f"No site has 2 {model.slug} GPU(s) free for that period priced in USD, the "
            "currency this organisation is billed in (sites priced in EUR have them)."
        )
    assert not Reservation.objects.exists() and not Quote.objects.exists()
    assert not Hold.objects.exists()


def test_the_api_search_filters_by_currency_and_refuses_a_bad_one(two_currencies):
    model, _eur, _usd = two_currencies
    client = member_client(_billed_in("usd", credit=False), Role.OWNER)
    params = {"gpu_model": model.slug, "gpu_count": 2, "start": tomorrow().isoformat(),
              "end": tomorrow(3).isoformat()}  # fmt: skip

    every = client.get("/api/v1/availability", params).json()["results"]
    euros = client.get("/api/v1/availability", {**params, "currency": "eur"}).json()["results"]
    capped = client.get(
        "/api/v1/availability", {**params, "currency": "usd", "max_price": "1.5"}
    ).json()["results"]

    assert sorted(o["currency"] for o in every) == ["eur", "usd"]
    assert [(o["site"]["id"], o["currency"]) for o in euros] == [("oslo-1", "eur")]
    assert capped == []  # 2.00 USD is above 1.5 USD; the euro site's 1.00 is not in dollars
    for bad in ("USD", "dollars", "isk", "kwd"):
        response = client.get("/api/v1/availability", {**params, "currency": bad})
        assert response.status_code == 400, bad
        assert response.json()["error"]["field"] == "currency", bad


def test_the_portal_search_shows_offers_in_the_billing_currency_only(two_currencies):
    model, _eur, _usd = two_currencies
    client = member_client(_billed_in("eur", credit=False), Role.OWNER)

    catalogue = client.get("/gpus").content.decode()
    page = client.get("/gpus", {"gpu_model": model.slug, "gpu_count": 2, "plan": "on_demand",
                                "starts_at": tomorrow().strftime("%Y-%m-%dT%H:%M"),
                                "hours": 3}).content.decode()  # fmt: skip

    assert "Max price per GPU-hour (EUR)" in page
    assert "Oslo One" in page and "Texas One" not in page.split('id="offers"')[1]
    assert "1 offer" in page
    assert "EUR" in catalogue and "USD" not in catalogue


def test_a_portal_search_that_finds_nothing_in_the_billing_currency_says_where_there_is(
    two_currencies,
):
    model, eur, _usd = two_currencies
    eur.nodes.update(status="maintenance")
    client = member_client(_billed_in("eur", credit=False), Role.OWNER)

    page = client.get("/gpus", {"gpu_model": model.slug, "gpu_count": 2, "plan": "on_demand",
                                "starts_at": tomorrow().strftime("%Y-%m-%dT%H:%M"),
                                "hours": 3}).content.decode()  # fmt: skip

    assert "0 offers" in page
    assert (
        "Sites priced in USD have them, but your organisation is billed in EUR and can book "
        "only in EUR." in page
    )
