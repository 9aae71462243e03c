"""Energy and emissions of GPU time: the pure function, table-driven, and where it shows."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta
from decimal import Decimal

import pytest

from marketplace.services.energy import energy_estimate
from tests.marketplace.api_fixtures import (  # noqa: F401 - fixtures, requested by name
    allow_all_funding,
    client_key,
    fresh_rate_limits,
    market,
    org,
    owner,
    owner_client,
)

D = Decimal


@pytest.mark.parametrize(
    "tdp, pue, renewable, grid, gpus, seconds, kwh, kg",
    [
        # 8 × 700 W × 1 h × 1.10 = 6.16 kWh; half renewable at 400 g/kWh: 6.16 × 0.5 × 0.4
        (700, D("1.10"), D("0.500"), 400, 8, 3600, "6.160", "1.232"),
        # fully renewable: energy, no emissions
        (700, D("1.05"), D("1.000"), 12, 8, 3600, "5.880", "0.000"),
        # no renewables, a coal-heavy grid, one GPU for a day
        (350, D("1.30"), D("0.000"), 820, 1, 86400, "10.920", "8.954"),
        # grid intensity unknown: no emissions figure, not a guess
        (700, D("1.15"), D("0.420"), None, 2, 3600, "1.610", None),
        # rounded half-up once, at the end: 1 GPU × 1 W × 1 s × 1.5 = 0.000000417 kWh
        (1, D("1.50"), D("0.000"), 400, 1, 1, "0.000", "0.000"),
        # 3 × 450 W × 20 min × 1.20 = 0.54 kWh exactly; 0.54 × 0.75 × 333 / 1000 = 0.134865
        (450, D("1.20"), D("0.250"), 333, 3, 1200, "0.540", "0.135"),
        # nothing used
        (700, D("1.10"), D("0.500"), 400, 8, 0, "0.000", "0.000"),
    ],
)
def test_energy_and_market_based_emissions(tdp, pue, renewable, grid, gpus, seconds, kwh, kg):
    estimate = energy_estimate(
        tdp_watts=tdp, pue=pue, renewable_share=renewable, grid_carbon_g_per_kwh=grid,
        gpu_count=gpus, seconds=seconds,
    )  # fmt: skip
    assert estimate.kwh == D(kwh) and str(estimate.kwh) == kwh
    assert (None if estimate.kg_co2e is None else str(estimate.kg_co2e)) == kg
    assert estimate.as_dict()["kwh"] == kwh and estimate.as_dict()["kg_co2e"] == kg


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"gpu_count": -1}, ValueError),
        ({"seconds": -5}, ValueError),
        ({"pue": 1.1}, TypeError),
        ({"renewable_share": 0.5}, TypeError),
    ],
)
def test_bad_input_is_refused(kwargs, error):
    base = {"tdp_watts": 700, "pue": D("1.1"), "renewable_share": D("0.5"),
            "grid_carbon_g_per_kwh": 400, "gpu_count": 1, "seconds": 60}  # fmt: skip
    with pytest.raises(error):
        energy_estimate(**{**base, **kwargs})


@pytest.mark.django_db
def test_offers_quotes_and_reservations_carry_the_estimate(client_key, owner_client, market):
    from tests.marketplace.api_fixtures import make_reservation, tomorrow

    site, _ = market
    site.grid_carbon_g_per_kwh = 390
    site.save(update_fields=["grid_carbon_g_per_kwh"])
    from marketplace.selectors.reference import reference_cache_clear

    reference_cache_clear()  # the site's facts are cached for a few seconds
    start = tomorrow()
    end = start + timedelta(hours=10)
    # 4 × 700 W × 10 h × PUE 1.15 = 32.2 kWh; × (1 − 0.42) × 390 g/kWh = 7.28364 kg
    expected = {"kwh": "32.200", "kg_co2e": "7.284", "pue": "1.15", "renewable_share": "0.420",
                "grid_carbon_g_per_kwh": 390}  # fmt: skip
    window = {"gpu_model": "h100-sxm-80gb", "gpu_count": 4,
              "start": start.isoformat(), "end": end.isoformat()}  # fmt: skip
    (offer,) = client_key.get("/api/v1/availability", window).json()["results"]
    assert {k: offer["energy"][k] for k in expected} == expected
    assert offer["energy"]["basis"] == "estimated"
    assert "PUE" in offer["energy"]["method"]

    quote = client_key.post(
        "/api/v1/quotes", {"gpu_model": "h100-sxm-80gb", "gpu_count": 4,
                           "starts_at": start.isoformat(), "ends_at": end.isoformat()},
        format="json",
    ).json()  # fmt: skip
    assert {k: quote["energy"][k] for k in expected} == expected

    reservation = make_reservation(owner_client, gpu_count=4, ends_at=end.isoformat())
    assert {k: reservation["energy"][k] for k in expected} == expected


@pytest.mark.django_db
def test_an_offer_follows_the_sites_energy_price_when_the_policy_says_so(client_key, market):
    from marketplace.selectors.reference import reference_cache_clear
    from tests.marketplace.api_fixtures import tomorrow
    from tests.marketplace.market_helpers import make_policy

    site, _ = market
    site.energy_price_per_mwh, site.energy_currency = Decimal("20.00"), "usd"
    site.save(update_fields=["energy_price_per_mwh", "energy_currency"])
    start = tomorrow()
    window = {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "start": start.isoformat(),
              "end": (start + timedelta(hours=1)).isoformat()}  # fmt: skip

    reference_cache_clear()
    (offer,) = client_key.get("/api/v1/availability", window).json()["results"]
    assert offer["price_per_gpu_hour"] == "2.0000"  # the policy in force passes nothing through
    assert offer["breakdown"]["energy_multiplier"] == "1"

    make_policy(energy_pass_through_pct=Decimal("20"), reference_energy_price_per_mwh=Decimal("40"))
    reference_cache_clear()
    (offer,) = client_key.get("/api/v1/availability", window).json()["results"]
    # Power at half the reference, 20 % of the price following it: × 0.9.
    assert offer["breakdown"]["energy_price_per_mwh"] == "20.00"
    assert offer["breakdown"]["energy_multiplier"] == "0.9000"
    assert offer["price_per_gpu_hour"] == "1.8000"
