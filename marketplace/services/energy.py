"""Energy and emissions of GPU time: what no other GPU cloud shows, and what these sites know.

A pure function (no database), like pricing:

    kWh       = GPUs × the model's rated board power (TDP) × hours × the site's PUE
    kg CO2e   = kWh × (1 − the site's renewable share) × the grid's gCO2e/kWh ÷ 1000

- TDP is the GPU's rated power: an upper estimate of what the boards draw flat out; the rest
  of the node (CPUs, fans, network) is inside the PUE only as far as the site's PUE counts it.
- Emissions are market-based: energy covered by the site's renewable contracts counts as zero,
  the rest at the grid's average intensity. Unknown intensity (a site without the figure)
  gives no emissions figure rather than a guess.
- Both are rounded half-up to 3 decimal places, once, at the end.
"""

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

__all__ = ["EnergyEstimate", "energy_estimate", "energy_for", "booking_energy"]

_PLACES = Decimal("0.001")
_BASIS = (
    "GPUs × rated board power (TDP) × hours × site PUE; emissions market-based: the site's "
    "renewable share at zero, the rest at the grid's average gCO2e/kWh."
)


@dataclass(frozen=True)
class EnergyEstimate:
    kwh: Decimal
    kg_co2e: Decimal | None  # None: the site's grid intensity is unknown
    pue: Decimal
    renewable_share: Decimal
    grid_carbon_g_per_kwh: int | None
    basis: str = _BASIS

    def as_dict(self) -> dict:
        return {
            "kwh": str(self.kwh),
            "kg_co2e": None if self.kg_co2e is None else str(self.kg_co2e),
            "pue": str(self.pue),
            "renewable_share": str(self.renewable_share),
            "grid_carbon_g_per_kwh": self.grid_carbon_g_per_kwh,
            "basis": self.basis,
        }


def energy_estimate(
    *,
    tdp_watts: int,
    pue: Decimal,
    renewable_share: Decimal,
    grid_carbon_g_per_kwh: int | None,
    gpu_count: int,
    seconds: int,
) -> EnergyEstimate:
    if gpu_count < 0 or seconds < 0 or tdp_watts < 0:
        raise ValueError("gpu_count, seconds and tdp_watts must not be negative")
    if isinstance(pue, float) or isinstance(renewable_share, float):
        raise TypeError("pue and renewable_share must be Decimal, not float")
    kwh = Decimal(tdp_watts) * gpu_count * seconds * pue / Decimal(3_600_000)
    kg = None
    if grid_carbon_g_per_kwh is not None:
        kg = kwh * (1 - renewable_share) * grid_carbon_g_per_kwh / Decimal(1000)
        kg = kg.quantize(_PLACES, rounding=ROUND_HALF_UP)
    return EnergyEstimate(
        kwh=kwh.quantize(_PLACES, rounding=ROUND_HALF_UP),
        kg_co2e=kg,
        pue=pue,
        renewable_share=renewable_share,
        grid_carbon_g_per_kwh=grid_carbon_g_per_kwh,
    )


def energy_for(*, site, gpu_model, gpu_count: int, seconds: int) -> EnergyEstimate:
    """The estimate for `gpu_count` GPUs of `gpu_model` at `site` for `seconds`."""
    return energy_estimate(
        tdp_watts=gpu_model.tdp_watts,
        pue=site.pue,
        renewable_share=site.renewable_share,
        grid_carbon_g_per_kwh=site.grid_carbon_g_per_kwh,
        gpu_count=gpu_count,
        seconds=seconds,
    )


def booking_energy(booking) -> EnergyEstimate:
    """The estimate for a quote's or reservation's whole booked period."""
    return energy_for(
        site=booking.site,
        gpu_model=booking.gpu_model,
        gpu_count=booking.gpu_count,
        seconds=int((booking.ends_at - booking.starts_at).total_seconds()),
    )
