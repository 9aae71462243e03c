"""Probes of this round's changes through the portal, as a customer billed in dollars or in
yen: the quote page holds the price it books at, the cancel pages say what the API says, money
is written in its currency's own decimals everywhere (the spend table, the power price), the
billing forms take amounts only as typed digits within the currency's limits, and a workload
restarting in place is not said to be about to start."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import BillingAccount, LedgerEntry, LedgerKind, TopUp
from billing.services.ledger import ledger_entry_add
from marketplace.models import Quote, RateCard, Reservation, ReservationStatus, Role
from marketplace.services.reservations import reservation_create
from marketplace.templatetags.portal_format import pricing_steps
from tests.clients import HttpsClient
from tests.factories import GpuModelFactory, MembershipFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)
from tests.marketplace.test_agent_report_delivery import REPORT, _active_through_agent

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)
# Per currency: the list price per GPU-hour and what the pages must write.
YEN = {
    "currency": "jpy", "price": "1500.0000", "total": "9,000 JPY", "api_total": "9000",
    "term_refund": "136,800 JPY", "api_refund": "136800", "limits": "50 and 10,000,000 JPY",
}  # fmt: skip
DOLLARS = {
    "currency": "usd", "price": "2.0000", "total": "12.00 USD", "api_total": "12.00",
    "term_refund": "182.40 USD", "api_refund": "182.40", "limits": "5.00 and 100,000.00 USD",
}  # fmt: skip
CURRENCIES = [pytest.param(YEN, id="jpy"), pytest.param(DOLLARS, id="usd")]


def _text(response) -> str:
    """The page's words, tags and runs of spaces gone."""
    html = re.sub(r"<script.*?</script>", "", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#x27;", "'")


def _market(shown: dict):
    """A site of two 8-GPU nodes priced in the currency, and an organisation billed and funded
    in it, with an owner signed in to the portal."""
    model = GpuModelFactory()
    make_policy()  # utilisation-neutral: on-demand is the list price, a 1w term 5 % off
    site = SiteFactory()
    make_rate(model, shown["price"], site=site, currency=shown["currency"])
    make_nodes(site, model, 2)
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, currency=shown["currency"])
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=10_000_000,
                     currency=shown["currency"], idempotency_key=f"fund:{org.pk}")  # fmt: skip
    client = HttpsClient()
    client.force_login(MembershipFactory(organization=org, role=Role.OWNER).user)
    return model, site, org, client


def _offer(model, site, start) -> dict:
    return {"gpu_model": model.slug, "site": site.slug, "gpu_count": 2, "plan": "on_demand",
            "starts_at": start.strftime("%Y-%m-%dT%H:%M"), "hours": 3}  # fmt: skip


@pytest.mark.parametrize("shown", CURRENCIES)
def test_the_quote_page_shows_and_books_at_the_price_it_holds(shown):
    model, site, org, client = _market(shown)
    quote_url = client.post("/quotes", _offer(model, site, tomorrow(2)))["Location"]
    quote = Quote.objects.get(organization=org)
    # The list price changes while the quote is held: the quote's price still binds.
    RateCard.objects.filter(gpu_model=model).update(price_per_gpu_hour=Decimal(shown["price"]) * 2)

    page = _text(client.get(quote_url))
    api = client.get(f"/api/v1/quotes/{quote.public_id}").json()
    booked = client.post(quote_url, {"without_ssh": "on"})

    rate = f"{Decimal(shown['price']):,.4f} {shown['currency'].upper()}"
    assert f"Price {rate} per GPU-hour" in page
    assert f"Total if it runs to the end {shown['total']}" in page
    assert (api["price_per_gpu_hour"], api["total"]) == (shown["price"], shown["api_total"])
    assert booked.status_code == 302
    reservation = Reservation.objects.get(organization=org)
    assert booked["Location"] == f"/reservations/{reservation.public_id}"
    assert reservation.quote_id == quote.pk
    assert reservation.price_per_gpu_hour == Decimal(shown["price"])
    reservation_api = client.get(f"/api/v1/reservations/{reservation.public_id}").json()
    assert reservation_api["total"] == shown["api_total"]
    assert f"Total booked {shown['total']}" in _text(client.get(booked["Location"]))


@pytest.mark.parametrize("shown", CURRENCIES)
def test_an_expired_quote_page_books_nothing_and_says_so(shown):
    model, site, org, client = _market(shown)
    quote_url = client.post("/quotes", _offer(model, site, tomorrow(2)))["Location"]
    Quote.objects.filter(organization=org).update(expires_at=timezone.now() - timedelta(seconds=1))

    page = _text(client.get(quote_url))
    refused = client.post(quote_url, {"without_ssh": "on"})

    assert "This price expired at" in page and "Search again" in page
    assert 'id="reserve"' not in client.get(quote_url).content.decode()
    assert refused.status_code == 409
    assert "This price expired at" in _text(refused)
    assert not Reservation.objects.filter(organization=org).exists()


@pytest.mark.parametrize("shown", CURRENCIES)
def test_the_cancel_pages_say_what_the_api_says(shown):
    model, site, org, client = _market(shown)
    start = tomorrow(48)  # 50 % back: 24 hours' to 7 days' notice
    term = reservation_create(
        organization=org, gpu_model=model.slug, gpu_count=1, site=site.slug, tier="reserved",
        term="1w", starts_at=start, ends_at=start + 192 * H,
    )  # fmt: skip
    on_demand = reservation_create(
        organization=org, gpu_model=model.slug, gpu_count=1, site=site.slug,
        tier="on_demand", starts_at=tomorrow(2), ends_at=tomorrow(5),
    )  # fmt: skip

    api = client.get(f"/api/v1/reservations/{term.public_id}/cancellation-terms").json()
    page = _text(client.get(f"/reservations/{term.public_id}/cancel"))
    metered = _text(client.get(f"/reservations/{on_demand.public_id}/cancel"))

    assert api["refund_amount"] == shown["api_refund"]
    assert f"You get back {shown['term_refund']}" in page
    assert f"Cancel, refund {shown['term_refund']}" in page
    assert "Nothing is refunded, because nothing was charged ahead" in metered
    assert "refund" not in metered.split("Reason (optional)")[1].split("Keep it")[0]

    done = client.post(f"/reservations/{term.public_id}/cancel",
                       {"reason": "plans changed", "confirm": "True",
                        "refund_fraction": api["refund_fraction"]}, follow=True)  # fmt: skip
    assert f"Cancelled. Refund: {shown['term_refund']}." in _text(done)
    term.refresh_from_db()
    assert term.status == ReservationStatus.CANCELLED
    assert term.cancellation["refund_amount"] == shown["api_refund"]


@pytest.mark.parametrize("shown", CURRENCIES)
def test_the_usage_pages_spend_table_writes_amounts_in_the_currencys_decimals(shown):
    model, site, org, client = _market(shown)
    reservation = reservation_create(
        organization=org, gpu_model=model.slug, gpu_count=2, site=site.slug,
        tier="on_demand", starts_at=tomorrow(2), ends_at=tomorrow(5),
    )  # fmt: skip
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    ledger_entry_add(organization=org, kind=LedgerKind.USAGE, amount_minor=-9000,
                     currency=shown["currency"], idempotency_key=f"use:{org.pk}",
                     reservation=reservation, period_start=hour - H, period_end=hour,
                     gpu_seconds=7200)  # fmt: skip
    spent = "9,000 JPY" if shown["currency"] == "jpy" else "90.00 USD"

    html = client.get("/billing/usage").content.decode()
    table = html.split('id="spend-table"')[1].split("</table>")[0]

    assert f"Charged in this period: <strong>{spent}</strong>" in html
    assert f'<td class="num">{spent}</td>' in table
    # Every cell of the table is written in the currency's own decimals, with its code.
    cells = re.findall(r'<td class="num">([^<]*)</td>', table)
    assert cells and all(c.endswith(shown["currency"].upper()) for c in cells)


@pytest.mark.parametrize("shown", CURRENCIES)
@pytest.mark.parametrize("typed", ["1e3", "１００", "1E2", "0x10", "1_000"])
def test_billing_amounts_are_read_only_as_typed_digits(shown, typed, settings):
    settings.STRIPE_SECRET_KEY = "sk_test_probe"  # the top-up form is offered
    _, _, org, client = _market(shown)
    before = BillingAccount.objects.filter(organization=org).values().get()

    settings_page = client.post(
        "/billing/",
        {"recharge_threshold": typed, "recharge_amount": typed, "monthly_spend_limit": typed},
    )  # fmt: skip
    top_up = client.post("/billing/top-ups", {"amount": typed, "once": "probe-1"})

    assert settings_page.status_code == 400
    assert _text(settings_page).count("Enter a number.") == 3
    assert top_up.status_code == 400
    assert "Enter a number." in _text(top_up)
    assert BillingAccount.objects.filter(organization=org).values().get() == before
    assert not TopUp.objects.exists()


@pytest.mark.parametrize("shown", CURRENCIES)
def test_billing_amounts_outside_the_currencys_limits_are_refused_and_change_nothing(
    shown, settings
):
    settings.STRIPE_SECRET_KEY = "sk_test_probe"
    _, _, org, client = _market(shown)
    before = BillingAccount.objects.filter(organization=org).values().get()
    too_small = "49" if shown["currency"] == "jpy" else "4.99"

    form = _text(client.get("/billing/"))
    low_recharge = client.post(
        "/billing/",
        {"recharge_threshold": "10", "recharge_amount": too_small, "monthly_spend_limit": ""},
    )
    low_top_up = client.post("/billing/top-ups", {"amount": too_small, "once": "probe-2"})
    cents = client.post("/billing/top-ups", {"amount": "1000.50", "once": "probe-3"})

    assert f"Recharge amount Between {shown['limits']}." in form
    assert low_recharge.status_code == 400
    assert f"A recharge is between {shown['limits']}." in _text(low_recharge)
    assert low_top_up.status_code == 400
    assert f"A top-up is between {shown['limits']}." in _text(low_top_up)
    if shown["currency"] == "jpy":  # yen has no cents: refused, never rounded
        assert cents.status_code == 400
        assert "Amounts in JPY are whole numbers." in _text(cents)
    else:  # within the limits: refused only for want of a card
        assert "Add a card before topping up." in _text(cents)
    assert BillingAccount.objects.filter(organization=org).values().get() == before
    assert not TopUp.objects.exists()
    assert LedgerEntry.objects.filter(organization=org).count() == 1  # the funding only


@pytest.mark.parametrize(
    ("currency", "price", "written"),
    [("jpy", "6000", "6,000 JPY per MWh"), ("usd", "38.5", "38.50 USD per MWh")],
)
def test_how_a_price_is_made_names_the_power_prices_currency(currency, price, written):
    breakdown = {
        "currency": currency, "list_price_per_gpu_hour": "1500.0000", "tier": "on_demand",
        "term": "none", "energy_multiplier": "1.1000", "energy_price_per_mwh": price,
    }  # fmt: skip

    steps = pricing_steps(breakdown)

    assert f"+10 % for the site's power price ({written})" in steps


@pytest.mark.usefixtures("allow_all_funding")
def test_a_workload_restarting_in_place_is_not_said_to_be_about_to_start():
    reservation, _node, agent, _ = _active_through_agent(tier="reserved")
    agent.post(REPORT, {"containers": []}, format="json")  # its container vanished
    reservation.refresh_from_db()
    client = HttpsClient()
    client.force_login(MembershipFactory(organization=reservation.organization).user)

    page = _text(client.get(f"/reservations/{reservation.public_id}"))
    api = client.get(f"/api/v1/reservations/{reservation.public_id}").json()

    assert reservation.status == ReservationStatus.PROVISIONING
    assert api["status"] == "provisioning" and "restarts in place" in api["status_reason"]
    assert "it restarts in place on the same GPUs (restart 1 of at most" in page
    assert "counts as downtime of the term under the SLA" in page
    assert "Starts in" not in page
