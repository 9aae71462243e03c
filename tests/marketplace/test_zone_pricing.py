"""Offers, quotes and reservations priced from the site's zone prices: stale, absurd and missing
prices fall back to the static price, the floor shows in every breakdown, a quote holds its
price, and a search reads the zone prices once."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from inventory.models import ZonePrice
from marketplace.services.pricing import price_floor
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create
from tests.factories import (
    GpuModelFactory,
    OrganizationFactory,
    PriceZoneFactory,
    SiteFactory,
    UserFactory,
)
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]

T1, T2 = tomorrow(), tomorrow(4)
H = timedelta(hours=1)


@pytest.fixture
def h100():
    model = GpuModelFactory()  # 700 W
    make_rate(model, "2.2000")
    # Full pass-through, so the energy price shows in the price itself.
    make_policy(energy_pass_through_pct=Decimal("100"), reference_energy_price_per_mwh=40)
    return model


@pytest.fixture
def site(h100):
    # PUE 1.25, static 40.00 usd per MWh.
    s = SiteFactory(
        price_zone=PriceZoneFactory(code="ercot-west"),
        pue=Decimal("1.25"),
        energy_price_per_mwh=Decimal("40.00"),
    )
    make_nodes(s, h100, 1)
    return s


def publish(zone, start, prices, *, received_at=None, step=H):
    ZonePrice.objects.bulk_create(
        ZonePrice(
            zone=zone,
            starts_at=start + i * step,
            ends_at=start + (i + 1) * step,
            price_per_mwh=Decimal(p),
            currency=zone.currency,
            source="test",
            received_at=received_at or timezone.now(),
        )
        for i, p in enumerate(prices)
    )


def search_offer(tier="on_demand", **kw):
    from marketplace.selectors.availability import AvailabilityQuery, availability_search

    (offer,) = availability_search(
        AvailabilityQuery(gpu_count=1, starts_at=T1, ends_at=T2, tier=tier, **kw)
    )  # one site
    return offer


def test_an_offer_is_priced_from_the_zones_time_weighted_price(site):
    publish(site.price_zone, T1, ["20.00", "40.00", "60.00", "80.00"])
    b = search_offer().breakdown
    # (20 + 40 + 60 + 80) / 4 = 50 → energy multiplier 50 / 40 = 1.25 on 2.20.
    assert (b.energy_price_per_mwh, b.energy_multiplier) == (Decimal("50.0000"), Decimal("1.2500"))
    assert b.price_per_gpu_hour == Decimal("2.7500")
    assert (b.energy_price_source, b.energy_price_basis) == ("zone:ercot-west", "window")
    # Floor: 0.7 × 1.25 × 0.05 = 0.04375 → 0.0438, margin 20 % = 0.00875 → 0.0088; 0.0525.
    assert (b.energy_cost_per_gpu_hour, b.margin_per_gpu_hour, b.price_floor_per_gpu_hour) == (
        Decimal("0.0438"),
        Decimal("0.0088"),
        Decimal("0.0525"),
    )


def test_interruptible_follows_the_hours_price(site):
    publish(site.price_zone, T1, ["80.00", "20.00", "20.00", "20.00"])
    b = search_offer(tier="interruptible").breakdown
    assert (b.energy_price_per_mwh, b.energy_price_basis) == (Decimal("80.0000"), "hour")
    assert b.window_energy_price_per_mwh == Decimal("35.0000")


def test_a_stale_feed_falls_back_to_the_static_price(site, settings):
    settings.GRID_PRICE_MAX_AGE = timedelta(hours=2)
    publish(site.price_zone, T1, ["400.00"] * 4, received_at=timezone.now() - timedelta(hours=3))
    b = search_offer().breakdown
    assert (b.energy_price_per_mwh, b.energy_price_source) == (Decimal("40.00"), "static")
    assert "stale" in b.energy_price_note
    assert b.price_per_gpu_hour == Decimal("2.2000")


def test_absurd_stored_values_are_ignored_as_gaps(site, settings):
    publish(site.price_zone, T1, ["20.00", "9000.00", "20.00", "20.00"])  # stored before a cap
    settings.GRID_PRICE_CAP_PER_MWH = Decimal("5000")
    b = search_offer().breakdown
    # The absurd hour is a gap, priced at the static 40: (20 × 3 + 40) / 4 = 25.
    assert b.energy_price_per_mwh == Decimal("25.0000")
    assert "25.0 % in gaps at the static price 40.00" in b.energy_price_note


def test_a_gap_in_the_zones_prices_is_priced_at_the_static_price(site):
    publish(site.price_zone, T1, ["20.00"])
    publish(site.price_zone, T1 + 3 * H, ["20.00"])
    b = search_offer().breakdown
    assert b.energy_price_per_mwh == Decimal("30.0000")  # (20 + 40 + 40 + 20) / 4


def test_a_zone_priced_in_another_currency_is_not_used(h100):
    s = SiteFactory(price_zone=PriceZoneFactory(code="nordpool-no4", currency="eur"))
    make_nodes(s, h100, 1)
    publish(s.price_zone, T1, ["300.00"] * 4)
    b = search_offer().breakdown
    assert (b.energy_price_per_mwh, b.energy_price_source) == (Decimal("38.50"), "static")
    assert "another currency" in b.energy_price_note


def test_a_search_reads_every_zones_prices_in_one_query(h100):
    for n in range(4):
        s = SiteFactory(price_zone=PriceZoneFactory(code=f"z{n}"))
        make_nodes(s, h100, 2)
        publish(s.price_zone, T1, ["30.00", "50.00"])
    from marketplace.selectors.availability import AvailabilityQuery, availability_search

    availability_search(
        AvailabilityQuery(gpu_count=1, starts_at=T1, ends_at=T2, tier="on_demand")
    )  # warm caches
    with CaptureQueriesContext(connection) as queries:
        offers = availability_search(
            AvailabilityQuery(gpu_count=1, starts_at=T1, ends_at=T2, tier="on_demand")
        )
    assert len(offers) == 4
    assert all(o.breakdown.energy_price_source.startswith("zone:") for o in offers)
    assert sum("inventory_zoneprice" in q["sql"] for q in queries.captured_queries) == 1


def test_a_quote_holds_its_price_through_a_price_spike(site):
    org = OrganizationFactory()
    publish(site.price_zone, T1, ["40.00"] * 4)
    q = quote_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=T1, ends_at=T2,
        tier="on_demand",
    )  # fmt: skip
    assert q.price_per_gpu_hour == Decimal("2.2000")
    ZonePrice.objects.filter(zone=site.price_zone).update(price_per_mwh=Decimal("4000.00"))

    r = reservation_create(organization=org, user=UserFactory(), quote=q, workload={})

    assert (r.price_per_gpu_hour, r.total_amount) == (Decimal("2.2000"), Decimal("8.80"))
    assert r.breakdown["energy_price_per_mwh"] == "40.0000"
    # A new quote sees the spike: 0.7 × 1.25 × 4 = 3.50 of power, + 20 % = 4.20, above the
    # ceiling of 1.5 × 2.20.
    again = quote_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=T1, ends_at=T2,
        tier="on_demand",
    )  # fmt: skip
    assert (again.price_per_gpu_hour, again.breakdown["clamped"]) == (
        Decimal("4.2000"),
        "energy_floor",
    )


def test_a_direct_reservation_shows_the_energy_cost_and_margin(site):
    publish(site.price_zone, T1, ["40.00"] * 4)
    r = reservation_create(
        organization=OrganizationFactory(), gpu_model="h100-sxm-80gb", gpu_count=1,
        starts_at=T1, ends_at=T2, tier="on_demand",
    )  # fmt: skip
    # 0.7 × 1.25 × 0.04 = 0.035, margin 0.007, floor 0.042.
    assert (
        r.breakdown["energy_cost_per_gpu_hour"],
        r.breakdown["margin_per_gpu_hour"],
        r.breakdown["price_floor_per_gpu_hour"],
    ) == ("0.0350", "0.0070", "0.0420")


def test_price_floor_is_the_energy_cost_plus_margin_of_the_window(site, h100):
    publish(site.price_zone, T1, ["1000.00", "3000.00", "1000.00", "3000.00"])
    make_policy(floor_margin_pct=Decimal("10"), floor_margin_per_gpu_hour=Decimal("0.0500"))
    floor = price_floor(site=site, gpu_model=h100, starts_at=T1, ends_at=T2)
    # 2000 average: 0.7 × 1.25 × 2 = 1.75; + 10 % + 0.05 = 1.975.
    assert (floor.price_per_gpu_hour, floor.currency) == (Decimal("1.9750"), "usd")
    assert (floor.energy_cost_per_gpu_hour, floor.margin_per_gpu_hour) == (
        Decimal("1.7500"),
        Decimal("0.2250"),
    )
    assert floor.energy_price_per_mwh == Decimal("2000.0000")


def test_price_floor_without_zone_uses_the_static_price(h100):
    s = SiteFactory(pue=Decimal("1.00"), energy_price_per_mwh=Decimal("50.00"))
    floor = price_floor(site=s, gpu_model=h100, starts_at=T1, ends_at=T2)
    assert floor.price_per_gpu_hour == Decimal("0.0420")  # 0.7 × 0.05 = 0.035 + 20 %
    assert "no price zone" in floor.energy_price_note


def test_a_reserved_term_reads_the_month_before_summed_in_the_database(site, settings):
    from marketplace.services.pricing import PowerPrices, power_price_over

    zone = site.price_zone
    history = [("10.00" if h != 100 else "9000.00") for h in range(30 * 24)]  # one absurd hour
    publish(zone, T1 - timedelta(days=30), history)
    ZonePrice.objects.filter(
        zone=zone, starts_at__gte=T1 - timedelta(days=3), starts_at__lt=T1 - timedelta(days=2)
    ).delete()  # a day with no prices
    publish(zone, T1, ["100.00", "20.00"])
    settings.GRID_PRICE_CAP_PER_MWH = Decimal("5000")
    from marketplace.selectors.availability import AvailabilityQuery, availability_search

    (offer,) = availability_search(
        AvailabilityQuery(
            gpu_count=1, starts_at=T1, ends_at=T1 + timedelta(days=7), tier="reserved", term="1w"
        )
    )
    b = offer.breakdown
    # 888 h: 695 h at 10, 25 h of gaps (the day, the absurd hour) at the static 40, 2 h
    # published in the window (100 + 20), 166 h beyond the horizon at the static 40.
    expected = (Decimal(695 * 10 + 25 * 40 + 120 + 166 * 40) / 888).quantize(Decimal("0.0001"))
    assert (b.energy_price_per_mwh, b.energy_price_basis) == (expected, "long")
    assert (
        "2.8 % in gaps" in b.energy_price_note
        and "beyond the published horizon" in b.energy_price_note
    )
    # The same figure as the pure rule reading every interval itself.
    rows = ZonePrice.objects.filter(zone=zone, price_per_mwh__lt=5000).order_by("starts_at")
    intervals = tuple((r.starts_at, r.ends_at, r.price_per_mwh) for r in rows)
    pure = power_price_over(
        PowerPrices(Decimal("40.00"), "ercot-west", "ok", intervals, intervals[-1]),
        starts_at=T1 - timedelta(days=30),
        ends_at=T1 + timedelta(days=7),
    )
    assert pure.price_per_mwh == expected
