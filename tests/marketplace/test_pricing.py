from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from config.errors import NotAvailable, ValidationFailed
from marketplace.models import PricingPolicy
from marketplace.services.pricing import (
    PricingBounds,
    RateInputs,
    period_total,
    price_quote,
    pricing_inputs_for,
)
from tests.factories import GpuModelFactory, SiteFactory
from tests.marketplace.market_helpers import make_policy, make_rate

T0 = datetime(2030, 1, 1, tzinfo=UTC)
DISCOUNTS = {"1w": Decimal("5"), "1m": Decimal("12"), "3m": Decimal("20"), "1y": Decimal("35")}


def rate(price="2.2000", interruptible="55"):
    return RateInputs(
        price_per_gpu_hour=Decimal(price),
        currency="usd",
        term_discount_pct=DISCOUNTS,
        interruptible_discount_pct=Decimal(interruptible),
    )


def bounds(slope="0.5", floor="0.35", ceiling="1.5", pivot="0.6"):
    return PricingBounds(
        utilisation_pivot=Decimal(pivot),
        utilisation_slope=Decimal(slope),
        floor_multiplier=Decimal(floor),
        ceiling_multiplier=Decimal(ceiling),
    )


# (tier, term, gpus, period, utilisation, bounds kwargs, price/GPU-h, total, clamped)
CASES = [
    ("on_demand", "none", 1, timedelta(hours=10), "0.6", {}, "2.2000", "22.00", None),
    ("on_demand", "none", 3, timedelta(minutes=90), "0.6", {}, "2.2000", "9.90", None),
    ("reserved", "1w", 1, timedelta(days=7), "0.6", {}, "2.0900", "351.12", None),
    ("reserved", "1m", 1, timedelta(days=30), "0.6", {}, "1.9360", "1393.92", None),
    ("reserved", "3m", 1, timedelta(days=90), "0.6", {}, "1.7600", "3801.60", None),
    ("reserved", "1y", 1, timedelta(days=365), "0.6", {}, "1.4300", "12526.80", None),
    ("reserved", "1w", 2, timedelta(days=8), "0.6", {}, "2.0900", "802.56", None),
    ("interruptible", "none", 1, timedelta(hours=10), "0.6", {}, "0.9900", "9.90", None),
    # Utilisation above the pivot raises the price: 1 + 0.5 × (1.0 − 0.6) = 1.2.
    ("on_demand", "none", 1, timedelta(hours=1), "1", {}, "2.6400", "2.64", None),
    # ... and below it lowers it: 1 + 0.5 × (0 − 0.6) = 0.7.
    ("on_demand", "none", 1, timedelta(hours=1), "0", {}, "1.5400", "1.54", None),
    # Ceiling: 1 + 2 × 0.4 = 1.8 is clamped to 1.5.
    ("on_demand", "none", 1, timedelta(hours=1), "1", {"slope": "2"}, "3.3000", "3.30", "ceiling"),
    # Floor: 0.45 × 0.7 = 0.315 is clamped to 0.35.
    ("interruptible", "none", 1, timedelta(hours=1), "0", {}, "0.7700", "0.77", "floor"),
    # Floor binds reserved too: 0.65 × 0.7 = 0.455 < 0.5.
    ("reserved", "1y", 1, timedelta(days=365), "0", {"floor": "0.5"}, "1.1000", "9636.00", "floor"),
]


@pytest.mark.parametrize("tier,term,gpus,length,utilisation,bound_kw,price,total,clamped", CASES)
def test_it_prices_every_tier_term_and_bound(
    tier, term, gpus, length, utilisation, bound_kw, price, total, clamped
):
    b = price_quote(
        rate=rate(),
        tier=tier,
        term=term,
        gpu_count=gpus,
        starts_at=T0,
        ends_at=T0 + length,
        utilisation=Decimal(utilisation),
        bounds=bounds(**bound_kw),
    )
    assert (b.price_per_gpu_hour, b.total, b.clamped) == (Decimal(price), Decimal(total), clamped)
    assert b.currency == "usd" and b.gpu_count == gpus and b.tier == tier and b.term == term


# (site energy price, pass-through %, reference, tier, term, utilisation, energy multiplier,
#  price/GPU-h, clamped) on the 2.2000 list price with the default bounds.
ENERGY_CASES = [
    # Off (pass-through 0): the site's price changes nothing.
    ("20.00", "0", "40", "on_demand", "none", "0.6", "1", "2.2000", None),
    # 20 % follows energy; power at half the reference: 1 + 0.2 × (0.5 − 1) = 0.9.
    ("20.00", "20", "40", "on_demand", "none", "0.6", "0.9000", "1.9800", None),
    # ... at the reference: neutral.
    ("40.00", "20", "40", "on_demand", "none", "0.6", "1.0000", "2.2000", None),
    # ... dearer power, combined with the tier and utilisation: 1 + 0.2 × (1.5 − 1) = 1.1;
    # 0.95 (1w) × 1.2 (busy) × 1.1 = 1.254.
    ("60.00", "20", "40", "reserved", "1w", "1", "1.1000", "2.7588", None),
    # The bounds still hold: 1 + 1 × (0.1 − 1) = 0.1 → 0.1 < the 0.35 floor.
    ("4.00", "100", "40", "on_demand", "none", "0.6", "0.1000", "0.7700", "floor"),
    # Unknown in the card's currency (None): no adjustment whatever the pass-through.
    (None, "50", "40", "on_demand", "none", "0.6", "1", "2.2000", None),
]


@pytest.mark.parametrize(
    "energy_price,pass_through,reference,tier,term,utilisation,energy_mult,price,clamped",
    ENERGY_CASES,
)
def test_the_price_follows_the_sites_energy_price_by_the_policys_pass_through(
    energy_price, pass_through, reference, tier, term, utilisation, energy_mult, price, clamped
):
    b = price_quote(
        rate=RateInputs(
            price_per_gpu_hour=Decimal("2.2000"), currency="usd", term_discount_pct=DISCOUNTS,
            interruptible_discount_pct=Decimal("55"),
            energy_price_per_mwh=None if energy_price is None else Decimal(energy_price),
        ),
        tier=tier, term=term, gpu_count=1, starts_at=T0,
        ends_at=T0 + (timedelta(days=7) if term == "1w" else timedelta(hours=1)),
        utilisation=Decimal(utilisation),
        bounds=PricingBounds(
            utilisation_pivot=Decimal("0.6"), utilisation_slope=Decimal("0.5"),
            floor_multiplier=Decimal("0.35"), ceiling_multiplier=Decimal("1.5"),
            energy_pass_through_pct=Decimal(pass_through),
            reference_energy_price_per_mwh=Decimal(reference),
        ),
    )  # fmt: skip
    assert (b.energy_multiplier, b.price_per_gpu_hour, b.clamped) == (
        Decimal(energy_mult), Decimal(price), clamped,
    )  # fmt: skip
    d = b.as_dict()
    assert d["energy_price_per_mwh"] == energy_price
    assert d["energy_multiplier"] == str(Decimal(energy_mult))


@pytest.mark.django_db
def test_only_a_site_paying_in_the_cards_currency_is_adjusted():
    model = GpuModelFactory()
    texas = SiteFactory(energy_price_per_mwh=Decimal("20.00"), energy_currency="usd")
    quebec = SiteFactory(energy_price_per_mwh=Decimal("20.00"), energy_currency="cad")
    make_rate(model, "2.2000")
    make_policy(energy_pass_through_pct=Decimal("20"), reference_energy_price_per_mwh=Decimal("40"))
    assert pricing_inputs_for(texas, model).rate.energy_price_per_mwh == Decimal("20.00")
    assert pricing_inputs_for(quebec, model).rate.energy_price_per_mwh is None
    assert pricing_inputs_for(texas, model).bounds.energy_pass_through_pct == Decimal("20")


def test_it_rounds_the_price_per_gpu_hour_half_up_to_four_places():
    # 1.0005 × 0.5 = 0.50025: half-up gives 0.5003 (banker's rounding would give 0.5002).
    b = price_quote(
        rate=rate(price="1.0005", interruptible="50"),
        tier="interruptible",
        term="none",
        gpu_count=1,
        starts_at=T0,
        ends_at=T0 + timedelta(hours=1),
        utilisation=Decimal("0.6"),
        bounds=bounds(floor="0.1"),
    )
    assert b.price_per_gpu_hour == Decimal("0.5003")
    assert b.total == Decimal("0.50")


def test_it_rounds_the_total_half_up_to_the_cent_once():
    # 1.0000 × 18 s = 0.005 exactly: half-up gives 0.01.
    assert period_total(
        price_per_gpu_hour=Decimal("1"), gpu_count=1, seconds=18, currency="usd"
    ) == Decimal("0.01")
    # Not rounded per hour: 0.0001/h × 3 GPUs × 100 h = 0.03, not 3 × round(0.01) per 100 h.
    assert period_total(
        price_per_gpu_hour=Decimal("0.0001"), gpu_count=3, seconds=360000, currency="usd"
    ) == Decimal("0.03")


def test_a_currency_without_cents_is_totalled_to_its_whole_unit_as_the_ledger_charges_it():
    """Shown is charged: 316.6666 JPY × 168 h = 53199.99 would be charged as 53200 yen."""
    from billing.money import to_minor_units

    total = period_total(
        price_per_gpu_hour=Decimal("316.6666"), gpu_count=1, seconds=168 * 3600, currency="jpy"
    )
    assert total == Decimal("53200") and to_minor_units(total, "jpy") == 53200
    assert period_total(
        price_per_gpu_hour=Decimal("333.3333"), gpu_count=1, seconds=61, currency="JPY"
    ) == Decimal("6")


def test_the_breakdown_is_json_safe():
    b = price_quote(
        rate=rate(),
        tier="reserved",
        term="1w",
        gpu_count=8,
        starts_at=T0,
        ends_at=T0 + timedelta(days=7),
        utilisation=Decimal("0.6"),
        bounds=bounds(),
    )
    d = b.as_dict()
    assert d["price_per_gpu_hour"] == "2.0900"
    assert d["total"] == "2808.96"
    assert d["tier_discount_pct"] == "5"
    assert d["hours"] == "168.000000"
    assert "half-up" in d["rounding"]


@pytest.mark.parametrize(
    "tier,term,length,code",
    [
        ("reserved", "none", timedelta(days=7), "term_required"),
        ("reserved", "1w", timedelta(days=6, hours=23), "period_shorter_than_term"),
        ("reserved", "1m", timedelta(days=29), "period_shorter_than_term"),
        ("reserved", "3m", timedelta(days=89), "period_shorter_than_term"),
        ("reserved", "1y", timedelta(days=364), "period_shorter_than_term"),
        ("on_demand", "1w", timedelta(days=7), "term_not_allowed"),
        ("interruptible", "1m", timedelta(days=30), "term_not_allowed"),
        ("spot", "none", timedelta(days=1), "invalid_tier"),
        ("reserved", "2y", timedelta(days=800), "invalid_term"),
    ],
)
def test_it_refuses_inconsistent_tier_and_term(tier, term, length, code):
    with pytest.raises(ValidationFailed) as exc:
        price_quote(
            rate=rate(),
            tier=tier,
            term=term,
            gpu_count=1,
            starts_at=T0,
            ends_at=T0 + length,
            utilisation=Decimal("0.5"),
            bounds=bounds(),
        )
    assert exc.value.code == code


@pytest.mark.parametrize("gpus,length", [(0, timedelta(hours=1)), (1, timedelta(0))])
def test_it_refuses_no_gpus_or_an_empty_period(gpus, length):
    with pytest.raises(ValidationFailed):
        price_quote(
            rate=rate(),
            tier="on_demand",
            term="none",
            gpu_count=gpus,
            starts_at=T0,
            ends_at=T0 + length,
            utilisation=Decimal("0.5"),
            bounds=bounds(),
        )


@pytest.mark.django_db
def test_pricing_inputs_prefer_the_site_override_and_the_newest_policy():
    model = GpuModelFactory()
    site, other = SiteFactory(), SiteFactory()
    make_rate(model, "2.2000")
    make_rate(model, "1.9000", site=site)
    make_policy(discount_1w_pct=Decimal("5"))
    make_policy(discount_1w_pct=Decimal("9"))

    here = pricing_inputs_for(site, model)
    there = pricing_inputs_for(other, model)

    assert (here.rate.price_per_gpu_hour, here.rate.source) == (
        Decimal("1.9000"),
        f"site:{site.slug}",
    )
    assert (there.rate.price_per_gpu_hour, there.rate.source) == (Decimal("2.2000"), "default")
    assert here.rate.term_discount_pct["1w"] == Decimal("9")


@pytest.mark.django_db
def test_pricing_inputs_fall_back_to_the_default_policy_and_refuse_a_model_without_rate():
    model = GpuModelFactory()
    site = SiteFactory()
    assert PricingPolicy.objects.count() == 0
    with pytest.raises(NotAvailable):
        pricing_inputs_for(site, model)
    make_rate(model, "2.2000")
    inputs = pricing_inputs_for(site, model)
    assert inputs.bounds.floor_multiplier == Decimal("0.35")
    assert inputs.rate.interruptible_discount_pct == Decimal("55")


@pytest.mark.django_db
def test_the_database_refuses_a_second_default_rate_card_for_a_model():
    from django.db import IntegrityError

    model = GpuModelFactory()
    make_rate(model, "2.2000")
    with pytest.raises(IntegrityError):
        make_rate(model, "2.5000")


def test_utilisation_is_taken_to_four_places_and_clipped_to_zero_one():
    def util(u):
        return price_quote(
            rate=rate(),
            tier="on_demand",
            term="none",
            gpu_count=1,
            starts_at=T0,
            ends_at=T0 + timedelta(hours=1),
            utilisation=u,
            bounds=bounds(),
        ).utilisation

    assert util(Decimal(1) / Decimal(3)) == Decimal("0.3333")
    assert util(Decimal("1.7")) == Decimal("1")
    assert util(Decimal("-0.2")) == Decimal("0")
