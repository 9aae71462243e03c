"""The pure rules of power-price pricing: time-weighting, gaps and the horizon, the tier's basis,
and the energy floor that no price crosses."""

from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marketplace.models import EnergyBasis
from marketplace.services.pricing import (
    PowerInputs,
    PowerPrices,
    PricingBounds,
    RateInputs,
    energy_floor,
    power_price_over,
    price_quote,
)

T0 = datetime(2030, 1, 1, 10, 0, tzinfo=UTC)
H = timedelta(hours=1)
DISCOUNTS = {"1w": Decimal("5"), "1m": Decimal("12"), "3m": Decimal("20"), "1y": Decimal("35")}


def zone(*intervals, static="40.00", feed="ok") -> PowerPrices:
    """Prices from (start offset in hours, end offset in hours, price) triples."""
    rows = tuple((T0 + a * H, T0 + b * H, Decimal(p)) for a, b, p in intervals)
    return PowerPrices(
        static_price_per_mwh=None if static is None else Decimal(static),
        zone="ercot-west",
        feed=feed,
        intervals=rows,
        last=rows[-1] if rows else None,
    )


def over(prices, start_h, end_h, beyond="static"):
    return power_price_over(
        prices, starts_at=T0 + start_h * H, ends_at=T0 + end_h * H, beyond_horizon=beyond
    )


def test_it_weights_each_interval_by_the_time_it_covers_in_the_window():
    # 10:30-11:00 at 30 and 11:00-12:00 at 60: (30 × 30 + 60 × 60) / 90 minutes = 50.
    estimate = over(zone((0, 1, "30.00"), (1, 2, "60.00")), 0.5, 2)
    assert estimate.price_per_mwh == Decimal("50.0000")
    assert (estimate.published_seconds, estimate.gap_seconds, estimate.beyond_seconds) == (
        5400,
        0,
        0,
    )


def test_quarter_hours_and_a_negative_price_weigh_as_they_last():
    # 15-minute market: 20, -10, 40, 100 per MWh; window 10:00-10:45 → (20 - 10 + 40) / 3.
    prices = zone((0, 0.25, "20.00"), (0.25, 0.5, "-10.00"), (0.5, 0.75, "40.00"),
                  (0.75, 1, "100.00"))  # fmt: skip
    assert over(prices, 0, 0.75).price_per_mwh == Decimal("16.6667")


def test_a_gap_inside_the_horizon_is_priced_at_the_static_price():
    # 10-11 at 30, nothing 11-12, 12-13 at 90; static 40: (30 + 40 + 90) / 3 = 53.3333.
    estimate = over(zone((0, 1, "30.00"), (2, 3, "90.00")), 0, 3)
    assert estimate.price_per_mwh == Decimal("53.3333")
    assert estimate.gap_seconds == 3600
    assert "33.3 % in gaps at the static price 40.00" in estimate.note


@pytest.mark.parametrize(
    ("beyond", "price", "words"),
    [
        ("static", "35.0000", "at the static price 40.00"),
        ("last_known", "30.0000", "at the last known price 30.00"),
    ],
)
def test_time_beyond_the_horizon_takes_the_policys_choice_and_says_so(beyond, price, words):
    estimate = over(zone((0, 1, "30.00")), 0, 2, beyond=beyond)
    assert estimate.price_per_mwh == Decimal(price)
    assert estimate.beyond_seconds == 3600 and estimate.beyond_at == beyond
    assert "50.0 % beyond the published horizon" in estimate.note and words in estimate.note


def test_without_a_static_price_in_the_currency_beyond_the_horizon_is_the_last_known():
    estimate = over(zone((0, 1, "30.00"), static=None), 0, 2, beyond="static")
    assert (estimate.price_per_mwh, estimate.beyond_at) == (Decimal("30.0000"), "last_known")


@pytest.mark.parametrize("feed", ["stale", "no_prices", "other_currency", "no_zone"])
def test_an_unusable_feed_falls_back_to_the_static_price_and_names_why(feed):
    estimate = over(zone((0, 3, "900.00"), feed=feed), 0, 2)
    assert estimate.price_per_mwh == Decimal("40.00")
    assert estimate.published_seconds == 0
    assert "static price" in estimate.note


def test_the_energy_floor_is_board_power_times_pue_times_price_plus_the_margin():
    bounds = _bounds(margin_pct="20", margin_abs="0.0100")
    # 0.7 kW × 1.08 × 38.50 / 1000 = 0.029106; margin 0.0058212 + 0.01; floor rounded up.
    cost, margin, floor = energy_floor(
        board_power_w=700, pue=Decimal("1.08"), energy_price_per_mwh=Decimal("38.50"),
        bounds=bounds,
    )  # fmt: skip
    assert (cost, margin, floor) == (Decimal("0.0291"), Decimal("0.0158"), Decimal("0.0450"))


def _bounds(margin_pct="20", margin_abs="0", floor="0.35", ceiling="1.5", slope="0.5", **kw):
    return PricingBounds(
        utilisation_pivot=Decimal("0.6"),
        utilisation_slope=Decimal(slope),
        floor_multiplier=Decimal(floor),
        ceiling_multiplier=Decimal(ceiling),
        floor_margin_pct=Decimal(margin_pct),
        floor_margin_per_gpu_hour=Decimal(margin_abs),
        **kw,
    )


def _rate(price="2.2000"):
    return RateInputs(
        price_per_gpu_hour=Decimal(price), currency="usd", term_discount_pct=DISCOUNTS,
        interruptible_discount_pct=Decimal("55"), energy_price_per_mwh=Decimal("40.00"),
    )  # fmt: skip


def _quote(prices, tier="on_demand", term="none", hours=2, utilisation="0.6", **bound_kw):
    return price_quote(
        rate=_rate(),
        tier=tier,
        term=term,
        gpu_count=1,
        starts_at=T0,
        ends_at=T0 + hours * H,
        utilisation=Decimal(utilisation),
        bounds=_bounds(**bound_kw),
        power=PowerInputs(board_power_w=700, pue=Decimal("1.20"), prices=prices),
    )


def test_a_price_spike_lifts_every_tier_to_the_energy_floor_above_the_ceiling():
    # 5000 per MWh: 0.7 × 1.2 × 5 = 4.20 per GPU-hour of power, + 20 % = 5.04; the list price
    # (2.20, ceiling 1.5 × 2.20 = 3.30) would sell the power at a loss.
    spike = zone((0, 2, "5000.00"))
    for tier, term, hours in (("on_demand", "none", 2), ("interruptible", "none", 2),
                              ("reserved", "1w", 24 * 7)):  # fmt: skip
        b = _quote(spike, tier=tier, term=term, hours=hours, beyond_horizon="last_known")
        assert b.energy_cost_per_gpu_hour == Decimal("4.2000")
        assert b.margin_per_gpu_hour == Decimal("0.8400")
        assert b.price_per_gpu_hour == b.price_floor_per_gpu_hour == Decimal("5.0400")
        assert b.clamped == "energy_floor"


def test_normal_power_prices_leave_the_price_above_the_floor_and_show_it():
    b = _quote(zone((0, 2, "38.50")))
    assert b.price_per_gpu_hour == Decimal("2.2000") and b.clamped is None
    # 0.7 × 1.2 × 0.0385 = 0.03234 → cost 0.0323, margin 0.006468 → 0.0065, floor 0.0389.
    assert (b.energy_cost_per_gpu_hour, b.margin_per_gpu_hour, b.price_floor_per_gpu_hour) == (
        Decimal("0.0323"),
        Decimal("0.0065"),
        Decimal("0.0389"),
    )
    assert (b.energy_price_source, b.energy_price_basis) == ("zone:ercot-west", "window")


def test_each_tier_reads_the_zone_over_its_own_basis():
    # Hour 0 at 100, hour 1 at 20, the 30 days before at 10 (one interval a day), static 40.
    history = tuple((-24 * (d + 1), -24 * d, "10.00") for d in reversed(range(30)))
    prices = zone(*history, (0, 1, "100.00"), (1, 2, "20.00"))
    on_demand = _quote(prices, tier="on_demand", energy_pass_through_pct=Decimal("100"))
    interruptible = _quote(prices, tier="interruptible", energy_pass_through_pct=Decimal("100"))
    # Interruptible: the first hour only (100); on-demand: the window, (100 + 20) / 2 = 60.
    assert (interruptible.energy_price_per_mwh, interruptible.energy_price_basis) == (
        Decimal("100.0000"),
        "hour",
    )
    assert (on_demand.energy_price_per_mwh, on_demand.energy_price_basis) == (
        Decimal("60.0000"),
        "window",
    )
    assert interruptible.window_energy_price_per_mwh == Decimal("60.0000")
    reserved = _quote(
        prices, tier="reserved", term="1w", hours=24 * 7, beyond_horizon="static",
        energy_pass_through_pct=Decimal("100"),
    )  # fmt: skip
    # Long: 30 days at 10, 1 h at 100, 1 h at 20, then 7 d − 2 h beyond the horizon at 40.
    hours_long = 30 * 24 + 7 * 24
    expected = (Decimal(30 * 24 * 10 + 100 + 20 + (7 * 24 - 2) * 40) / hours_long).quantize(
        Decimal("0.0001")
    )
    assert (reserved.energy_price_per_mwh, reserved.energy_price_basis) == (expected, "long")
    assert "beyond the published horizon" in reserved.energy_price_note


def test_the_policy_can_put_interruptible_on_the_window_too():
    prices = zone((0, 1, "100.00"), (1, 2, "20.00"))
    b = _quote(
        prices,
        tier="interruptible",
        energy_basis={"interruptible": EnergyBasis.WINDOW, "on_demand": EnergyBasis.WINDOW,
                      "reserved": EnergyBasis.LONG},
    )  # fmt: skip
    assert b.energy_price_per_mwh == Decimal("60.0000")


_money = st.decimals(min_value=Decimal("-500"), max_value=Decimal("5000"), places=2)


@settings(max_examples=400, deadline=None)
@given(
    prices=st.lists(_money, min_size=1, max_size=6),
    static=_money,
    list_price=st.decimals(min_value=Decimal("0.05"), max_value=Decimal("9"), places=4),
    tier=st.sampled_from(["on_demand", "interruptible", "reserved"]),
    utilisation=st.decimals(min_value=Decimal("0"), max_value=Decimal("1"), places=3),
    hours=st.integers(min_value=1, max_value=12),
    tdp=st.integers(min_value=50, max_value=1500),
    pue=st.decimals(min_value=Decimal("1"), max_value=Decimal("2"), places=2),
    margin_pct=st.decimals(min_value=Decimal("0"), max_value=Decimal("100"), places=2),
    margin_abs=st.decimals(min_value=Decimal("0"), max_value=Decimal("1"), places=4),
    pass_through=st.decimals(min_value=Decimal("0"), max_value=Decimal("100"), places=2),
    beyond=st.sampled_from(["static", "last_known"]),
)
def test_no_price_is_ever_below_the_energy_cost_plus_margin(
    prices, static, list_price, tier, utilisation, hours, tdp, pue, margin_pct, margin_abs,
    pass_through, beyond,
):  # fmt: skip
    power = zone(*((i, i + 1, str(p)) for i, p in enumerate(prices)), static=str(static))
    term, length = ("1w", 24 * 7) if tier == "reserved" else ("none", hours)
    bounds = _bounds(margin_pct=margin_pct, margin_abs=margin_abs, beyond_horizon=beyond,
                     energy_pass_through_pct=pass_through)  # fmt: skip
    b = price_quote(
        rate=_rate(str(list_price)), tier=tier, term=term, gpu_count=1, starts_at=T0,
        ends_at=T0 + length * H, utilisation=utilisation, bounds=bounds,
        power=PowerInputs(board_power_w=tdp, pue=pue, prices=power),
    )  # fmt: skip
    # The floor's energy price is the higher of the tier's and the window's.
    energy = max(b.energy_price_per_mwh, b.window_energy_price_per_mwh)
    exact_cost = Decimal(tdp) / 1000 * pue * energy / 1000
    exact_floor = exact_cost + max(exact_cost, 0) * margin_pct / 100 + margin_abs
    assert b.price_per_gpu_hour >= exact_floor
    assert b.price_per_gpu_hour >= b.price_floor_per_gpu_hour
    assert b.price_floor_per_gpu_hour == max(exact_floor, Decimal(0)).quantize(
        Decimal("0.0001"), rounding=ROUND_CEILING
    )
    assert b.price_per_gpu_hour > 0
