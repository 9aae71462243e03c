"""Customers see the grid: offers carry the expected power price over the window and the site's
curtailments over 90 days; the search filters on renewable share, grid carbon and PUE; a
site's page charts its zone's prices for the next day, with a table beside the chart."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from inventory.models import ZonePrice
from marketplace.models import Curtailment, Role
from marketplace.selectors.catalogue import CurtailmentHistory, site_curtailment_history
from tests.clients import HttpsAPIClient, HttpsClient
from tests.factories import (
    GpuModelFactory,
    MembershipFactory,
    OrganizationFactory,
    PriceZoneFactory,
    SiteFactory,
)
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = pytest.mark.django_db

T1, T2 = tomorrow(), tomorrow(2)
H = timedelta(hours=1)


def curtail(site, shed_at, until=None, called_off_at=None):
    return Curtailment.objects.create(
        site=site, shed_at=shed_at, until=until, called_off_at=called_off_at, reason="grid"
    )


def test_curtailment_history_counts_events_and_hours_of_the_last_90_days():
    now = timezone.now()
    site, quiet = SiteFactory(), SiteFactory()
    curtail(site, now - timedelta(days=100), now - timedelta(days=99))  # before the 90 days
    curtail(site, now - timedelta(days=91), now - timedelta(days=89))  # 1 day inside: 24 h
    curtail(site, now - timedelta(days=10), now - timedelta(days=10) + 3 * H)  # 3 h
    curtail(site, now - timedelta(days=5), now - timedelta(days=4),
            called_off_at=now - timedelta(days=5, hours=1))  # called off before: none  # fmt: skip
    curtail(site, now - timedelta(days=2), now - timedelta(days=1),
            called_off_at=now - timedelta(days=2) + H / 2)  # ended after 30 min  # fmt: skip
    curtail(site, now - 2 * H)  # open: so far 2 h
    curtail(site, now + H, now + 2 * H)  # announced, not started: not history

    history = site_curtailment_history(site_ids=[site.pk, quiet.pk], now=now)

    assert history == {site.pk: CurtailmentHistory(events=4, hours=Decimal("29.5"))}


@pytest.fixture
def world():
    make_policy()
    h100 = GpuModelFactory()
    make_rate(h100, "2.2000")
    ercot = PriceZoneFactory(code="ercot-west")
    texas = SiteFactory(slug="texas", renewable_share=Decimal("0.420"), grid_carbon_g_per_kwh=390,
                        pue=Decimal("1.08"), price_zone=ercot)  # fmt: skip
    quebec = SiteFactory(slug="quebec", renewable_share=Decimal("0.995"),
                         grid_carbon_g_per_kwh=2, pue=Decimal("1.12"))  # fmt: skip
    unknown = SiteFactory(slug="unknown", renewable_share=Decimal("1.000"),
                          grid_carbon_g_per_kwh=None, pue=Decimal("1.30"))  # fmt: skip
    for site in (texas, quebec, unknown):
        make_nodes(site, h100, 1)
    ZonePrice.objects.bulk_create(
        ZonePrice(
            zone=ercot,
            starts_at=T1 + i * H,
            ends_at=T1 + (i + 1) * H,
            price_per_mwh=Decimal(p),
            currency="usd",
            source="t",
            received_at=timezone.now(),
        )  # fmt: skip
        for i, p in enumerate(["20.00", "50.00"])
    )
    curtail(texas, timezone.now() - timedelta(days=3), timezone.now() - timedelta(days=3) + 4 * H)
    return {"texas": texas, "quebec": quebec, "unknown": unknown}


def _search(client, **params):
    query = {"gpu_model": "h100-sxm-80gb", "start": T1.isoformat(), "end": T2.isoformat(), **params}
    response = client.get("/api/v1/availability", query)
    assert response.status_code == 200, response.json()
    return {o["site"]["id"]: o for o in response.json()["results"]}


def test_an_offer_shows_the_expected_power_price_and_curtailments(world):
    client = HttpsAPIClient()
    client.force_authenticate(MembershipFactory().user)
    offers = _search(client)
    assert offers["texas"]["grid"] == {
        "price_zone": "ercot-west",
        "expected_energy_price_per_mwh": "35.0000",  # (20 + 50) / 2
        "currency": "usd",
        "energy_price_note": offers["texas"]["grid"]["energy_price_note"],
        "curtailments_90d": {"days": 90, "events": 1, "hours": "4.0"},
    }
    assert "ercot-west" in offers["texas"]["grid"]["energy_price_note"]
    quebec = offers["quebec"]["grid"]
    assert (quebec["price_zone"], quebec["expected_energy_price_per_mwh"]) == (None, "38.50")
    assert quebec["curtailments_90d"] == {"days": 90, "events": 0, "hours": "0.0"}


@pytest.mark.parametrize(
    ("params", "sites"),
    [
        ({}, {"texas", "quebec", "unknown"}),
        ({"min_renewable_share": "0.99"}, {"quebec", "unknown"}),
        ({"max_grid_carbon": "100"}, {"quebec"}),  # unknown intensity does not qualify
        ({"max_grid_carbon": "390"}, {"texas", "quebec"}),
        ({"max_pue": "1.10"}, {"texas"}),
        ({"max_pue": "1.20", "min_renewable_share": "0.5"}, {"quebec"}),
    ],
)
def test_the_search_filters_on_renewable_share_carbon_and_pue(world, params, sites):
    client = HttpsAPIClient()
    client.force_authenticate(MembershipFactory().user)
    assert set(_search(client, **params)) == sites


@pytest.mark.parametrize(
    "params", [{"min_renewable_share": "1.5"}, {"max_pue": "0.9"}, {"max_grid_carbon": "-1"}]
)
def test_out_of_range_grid_filters_are_bad_input(world, params):
    client = HttpsAPIClient()
    client.force_authenticate(MembershipFactory().user)
    response = client.get(
        "/api/v1/availability", {"start": T1.isoformat(), "end": T2.isoformat(), **params}
    )
    assert response.status_code == 400
    assert response.json()["error"]["field"] == next(iter(params))


def _portal():
    client = HttpsClient()
    client.force_login(MembershipFactory(organization=OrganizationFactory(), role=Role.MEMBER).user)
    return client


def test_the_portal_search_filters_and_shows_the_grid(world):
    page = _portal().get(
        "/gpus",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "plan": "on_demand",
         "starts_at": T1.strftime("%Y-%m-%dT%H:%M"), "hours": 2, "max_pue": "1.10"},
    )  # fmt: skip
    assert page.status_code == 200
    html = page.content.decode()
    assert html.count("<tr>") - 1 == 1  # texas only
    assert "power ≈ 35.00 USD/MWh over the window" in html
    assert "curtailed 1× (4.0 h) in 90 days" in html
    assert 'name="max_pue"' in html and 'name="max_grid_carbon"' in html


def test_a_sites_page_charts_its_zones_prices_for_the_next_day_with_a_table(world):
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    zone = world["texas"].price_zone
    ZonePrice.objects.all().delete()
    ZonePrice.objects.bulk_create(
        ZonePrice(
            zone=zone,
            starts_at=now + i * H,
            ends_at=now + (i + 1) * H,
            price_per_mwh=Decimal(10 + i),
            currency="usd",
            source="t",
            received_at=timezone.now(),
        )  # fmt: skip
        for i in range(30)
    )
    html = _portal().get("/sites/texas").content.decode()
    assert 'data-chart="power"' in html and 'id="power-chart"' in html
    table = html[html.index('id="power-table"') : html.index("</table>", html.index("power-table"))]
    assert table.count("<tr>") == 25  # the header and 24 hours
    assert "10.00 USD" in table and "33.00 USD" in table and "34.00 USD" not in table


def test_a_site_without_a_zone_says_its_power_has_a_contract_price(world):
    html = _portal().get("/sites/quebec").content.decode()
    assert 'id="power-none"' in html and "fixed contract price (38.50 USD per MWh)" in html
    assert 'data-chart="power"' not in html


@pytest.mark.usefixtures("allow_all_funding")
def test_a_quote_takes_the_grid_filters_too(world):
    make_rate(GpuModelFactory(), "2.5000", site=world["quebec"])  # Québec is dearer
    client = HttpsAPIClient()
    client.force_authenticate(MembershipFactory(role=Role.OWNER).user)
    body = {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "starts_at": T1.isoformat(),
            "ends_at": T2.isoformat()}  # fmt: skip
    cheapest = client.post("/api/v1/quotes", body, format="json")
    greenest = client.post("/api/v1/quotes", {**body, "max_grid_carbon": 100}, format="json")
    assert cheapest.status_code == greenest.status_code == 201
    assert cheapest.json()["site"] == "texas"
    assert greenest.json()["site"] == "quebec"
    nothing = client.post("/api/v1/quotes", {**body, "max_pue": "1.01"}, format="json")
    assert nothing.status_code == 409


def test_the_site_list_names_each_sites_price_zone(world):
    client = HttpsAPIClient()
    client.force_authenticate(MembershipFactory().user)
    response = client.get("/api/v1/sites")
    zones = {s["id"]: s["price_zone"] for s in response.json()["results"]}
    assert zones == {"quebec": None, "texas": "ercot-west", "unknown": None}
