"""Amounts in the marketplace's API are written in their currency's own decimals, as billing
writes balances: "9000" in yen, "12.00" in dollars. Searching, quoting, booking, the
cancellation and extension terms, the events (and so the webhooks) and resale sales alike;
prices per GPU-hour keep their 4 places."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import pytest
from rest_framework import serializers

from billing.models import BillingAccount, LedgerKind
from billing.services.ledger import ledger_entry_add
from billing.services.usage import reservations_meter
from config.api.serializers import AmountField, Serializer, amount_text
from marketplace.models import Event, Reservation, Role
from tests.clients import HttpsAPIClient
from tests.factories import GpuModelFactory, MembershipFactory, OrganizationFactory, SiteFactory
from tests.marketplace.api_fixtures import fresh_rate_limits, session_client  # noqa: F401
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)

# Per currency: the list price per GPU-hour, then what each step below must show.
YEN = {
    "price": "1500.0000", "offer_total": "9000", "zero": "0",
    "extra": "3000", "new_total": "12000",
    "term_total": "273600", "refund": "136800", "fee": "136800",
    "listing_price": "1200.0000", "sale_total": "12000",
    "proceeds": "1200", "fees": "120", "net": "1080",
}  # fmt: skip
DOLLARS = {
    "price": "2.0000", "offer_total": "12.00", "zero": "0.00",
    "extra": "4.00", "new_total": "16.00",
    "term_total": "364.80", "refund": "182.40", "fee": "182.40",
    "listing_price": "1.5000", "sale_total": "15.00",
    "proceeds": "1.50", "fees": "0.15", "net": "1.35",
}  # fmt: skip
CURRENCIES = [pytest.param("jpy", YEN, id="jpy"), pytest.param("usd", DOLLARS, id="usd")]


def iso(t) -> str:
    return t.isoformat().replace("+00:00", "Z")


@dataclass
class Market:
    currency: str
    model: object
    site: object
    seller: HttpsAPIClient
    buyer: HttpsAPIClient
    buyer_org: object


def funded_client(currency: str) -> tuple[HttpsAPIClient, object]:
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, currency=currency)
    # 10,000,000 minor units: ¥10,000,000, or $100,000.00.
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=10_000_000,
                     currency=currency, idempotency_key=f"fund:{org.pk}")  # fmt: skip
    return session_client(MembershipFactory(organization=org, role=Role.OWNER)), org


def market(currency: str, price: str) -> Market:
    """A site of two 8-GPU nodes whose rate card is in `currency`, and two organisations
    billed and funded in it."""
    model = GpuModelFactory()
    make_policy()  # utilisation-neutral: on-demand is the list price, a 1w term 5 % off
    site = SiteFactory()
    make_rate(model, price, site=site, currency=currency)
    make_nodes(site, model, 2)
    seller, _ = funded_client(currency)
    buyer, buyer_org = funded_client(currency)
    return Market(currency, model, site, seller, buyer, buyer_org)


def book_term(m: Market) -> dict:
    """1 GPU reserved for 8 days (1w term) from two days ahead (50 % refund on cancelling)."""
    start = tomorrow(48)
    response = m.seller.post("/api/v1/reservations", {
        "gpu_model": m.model.slug, "gpu_count": 1, "site": m.site.slug, "tier": "reserved",
        "term": "1w", "starts_at": iso(start), "ends_at": iso(start + 192 * H),
    }, format="json")  # fmt: skip
    assert response.status_code == 201, response.content
    return response.json()


@pytest.mark.parametrize(("currency", "shown"), CURRENCIES)
def test_search_quote_booking_and_extension_terms_write_amounts_in_the_currencys_decimals(
    currency, shown
):
    m = market(currency, shown["price"])
    start = tomorrow(2)
    period = {"gpu_model": m.model.slug, "gpu_count": 2}

    (offer,) = m.buyer.get(
        "/api/v1/availability", {**period, "start": iso(start), "end": iso(start + 3 * H)}
    ).json()["results"]
    quote = m.buyer.post(
        "/api/v1/quotes", {**period, "starts_at": iso(start), "ends_at": iso(start + 3 * H)},
        format="json",
    )  # fmt: skip
    booked = m.buyer.post("/api/v1/reservations", {"quote": quote.json()["id"]}, format="json")
    res_id = booked.json()["id"]
    terms = m.buyer.get(f"/api/v1/reservations/{res_id}/extension-terms",
                        {"ends_at": iso(start + 4 * H)})  # fmt: skip
    cancel_terms = m.buyer.get(f"/api/v1/reservations/{res_id}/cancellation-terms")

    assert (offer["currency"], offer["price_per_gpu_hour"]) == (currency, shown["price"])
    assert (offer["total"], offer["breakdown"]["total"]) == (shown["offer_total"],) * 2
    assert quote.status_code == 201, quote.content
    assert (quote.json()["price_per_gpu_hour"], quote.json()["total"]) == (
        shown["price"], shown["offer_total"],
    )  # fmt: skip
    assert booked.status_code == 201, booked.content
    detail = booked.json()
    assert (detail["total"], detail["charged"], detail["price_per_gpu_hour"]) == (
        shown["offer_total"], shown["zero"], shown["price"],
    )  # fmt: skip
    assert m.buyer.get(f"/api/v1/reservations/{res_id}").json()["total"] == shown["offer_total"]
    (listed,) = m.buyer.get("/api/v1/reservations").json()["results"]
    assert (listed["total"], listed["charged"]) == (shown["offer_total"], shown["zero"])
    assert terms.status_code == 200, terms.content
    assert {k: terms.json()[k] for k in ("extra_amount", "new_total", "charged_now")} == {
        "extra_amount": shown["extra"], "new_total": shown["new_total"],
        "charged_now": shown["zero"],
    }  # fmt: skip
    assert cancel_terms.status_code == 200, cancel_terms.content
    assert [cancel_terms.json()[k] for k in ("unused_amount", "refund_amount", "fee_amount")] == [
        shown["zero"]
    ] * 3
    # The event (and so every webhook delivery of it) shows the reservation as the API does.
    created = Event.objects.get(object_id=res_id, type="reservation.created")
    assert (created.data["total"], created.data["charged"]) == (shown["offer_total"], shown["zero"])
    event = m.buyer.get(f"/api/v1/events/{created.public_id}").json()
    assert event["data"]["object"]["total"] == shown["offer_total"]


@pytest.mark.parametrize(("currency", "shown"), CURRENCIES)
def test_a_reserved_terms_cancellation_terms_and_the_applied_terms_are_in_its_decimals(
    currency, shown
):
    m = market(currency, shown["price"])
    term = book_term(m)
    url = f"/api/v1/reservations/{term['id']}"

    terms = m.seller.get(f"{url}/cancellation-terms")
    cancelled = m.seller.post(f"{url}/cancel", {"expected_refund_fraction": "0.5"}, format="json")

    assert (term["total"], term["charged"]) == (shown["term_total"], shown["zero"])
    assert terms.status_code == 200, terms.content
    stated = {k: terms.json()[k] for k in ("unused_amount", "refund_amount", "fee_amount")}
    assert stated == {
        "unused_amount": shown["term_total"], "refund_amount": shown["refund"],
        "fee_amount": shown["fee"],
    }  # fmt: skip
    assert cancelled.status_code == 200, cancelled.content
    applied = cancelled.json()["cancellation"]
    # The terms applied are shown as they were stated, whatever the stored row's digits.
    assert {k: applied[k] for k in stated} == stated
    assert applied["refund_fraction"] == terms.json()["refund_fraction"] == "0.50"
    assert m.seller.get(url).json()["cancellation"] == applied


def test_applied_terms_stored_with_two_places_in_yen_are_shown_in_whole_yen():
    """Rows written before (and the services' Decimals printed) hold "136800.00"; a stored
    value that is not a number is shown as it is, not hidden."""
    m = market("jpy", YEN["price"])
    term = book_term(m)
    Reservation.objects.filter(public_id=term["id"]).update(cancellation={
        "unused_amount": "273600.00", "refund_amount": "136800.00", "fee_amount": "oops",
        "rule": "as stored",
    })  # fmt: skip

    shown = m.seller.get(f"/api/v1/reservations/{term['id']}").json()["cancellation"]

    assert shown == {"unused_amount": "273600", "refund_amount": "136800",
                     "fee_amount": "oops", "rule": "as stored"}  # fmt: skip


@pytest.mark.parametrize(("currency", "shown"), CURRENCIES)
def test_a_resale_sale_shows_its_total_proceeds_fees_and_net_in_the_currencys_decimals(
    currency, shown
):
    m = market(currency, shown["price"])
    term = book_term(m)
    start = tomorrow(48) + 24 * H
    listing = m.seller.post("/api/v1/resale/listings", {
        "reservation": term["id"], "gpu_count": 1, "starts_at": iso(start),
        "ends_at": iso(start + 10 * H), "price_per_gpu_hour": shown["listing_price"],
    }, format="json")  # fmt: skip
    assert listing.status_code == 201, listing.content
    (offer,) = [
        o
        for o in m.buyer.get("/api/v1/availability", {
            "gpu_model": m.model.slug, "start": iso(start), "end": iso(start + 10 * H),
        }).json()["results"]
        if o["resale"]
    ]  # fmt: skip
    bought = m.buyer.post("/api/v1/reservations", {
        "listing": listing.json()["id"], "gpu_count": 1, "starts_at": iso(start),
        "ends_at": iso(start + 10 * H),
    }, format="json")  # fmt: skip
    assert bought.status_code == 201, bought.content
    # The buyer uses an hour: the seller is credited what it was charged, less the 10 % fee.
    reservation = Reservation.objects.get(public_id=bought.json()["id"])
    Reservation.objects.filter(pk=reservation.pk).update(activated_at=start)
    reservations_meter(reservation_ids=[reservation.pk], now=start + H)

    (sale,) = m.seller.get("/api/v1/resale/sales").json()["results"]

    assert (offer["price_per_gpu_hour"], offer["total"]) == (
        shown["listing_price"], shown["sale_total"],
    )  # fmt: skip
    assert bought.json()["total"] == shown["sale_total"]
    assert (sale["currency"], sale["price_per_gpu_hour"]) == (currency, shown["listing_price"])
    assert {k: sale["sale"][k] for k in ("total", "proceeds", "fees", "net")} == {
        "total": shown["sale_total"], "proceeds": shown["proceeds"], "fees": shown["fees"],
        "net": shown["net"],
    }  # fmt: skip
    sold = Event.objects.filter(object_id=listing.json()["id"], type="listing.sold").get()
    assert sold.data["sale"]["total"] == shown["sale_total"]


class _Row(Serializer):
    amount = AmountField(allow_null=True)
    nested = AmountField(source="amount", currency_source="account.currency")


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (Decimal("32"), "usd", "32.00"),
        (Decimal("241500.00"), "jpy", "241500"),
        (0, "usd", "0.00"),
        (0, "jpy", "0"),
        (Decimal("-12.5"), "eur", "-12.50"),
        # Finer than the unit: the one money rule (half-up), never a rule of the field's own.
        (Decimal("0.005"), "usd", "0.01"),
        (Decimal("2.5"), "jpy", "3"),
        (Decimal("100000000"), "krw", "100000000"),
    ],
)
def test_an_amount_is_written_in_its_currencys_decimals(amount, currency, text):
    row = {"amount": amount, "currency": currency, "account": {"currency": currency}}
    assert _Row(row).data == {"amount": text, "nested": text}
    assert amount_text(amount, currency) == text


def test_a_missing_amount_is_null_and_a_float_or_bool_is_refused_loudly():
    assert _Row({"amount": None, "currency": "usd"}).data["amount"] is None
    for bad in (1.5, True):
        with pytest.raises(TypeError, match="an amount must be Decimal or int"):
            amount_text(bad, "usd")
    with pytest.raises(TypeError):
        _Row({"amount": 2.0, "currency": "jpy", "account": {"currency": "jpy"}}).data


def test_the_field_is_read_only_and_refused_as_input():
    class _Input(Serializer):
        name = serializers.CharField()
        total = AmountField()

    given = _Input(data={"name": "x", "total": "12.00"})
    assert not given.is_valid()
    assert given.errors["total"][0].code == "unknown_field"
