"""Energy and emissions of GPU time: what no other GPU cloud shows, and what these sites know.

Pure functions (no database), like pricing:

    kWh       = GPUs × the model's rated board power (TDP) × hours × the site's PUE
    kg CO2e   = kWh × (1 − the site's renewable share) × the grid's gCO2e/kWh ÷ 1000

- TDP is the GPU's rated power: an upper estimate of what the boards draw flat out; the rest
  of the node (CPUs, fans, network) is inside the PUE only as far as the site's PUE counts it.
- Emissions are market-based: energy covered by the site's renewable contracts counts as zero,
  the rest at the grid's average intensity. Unknown intensity (a site without the figure)
  gives no emissions figure rather than a guess.
- Both are rounded half-up to 3 decimal places, once, at the end.

Measured (`energy_measured`): where the GPUs reported their power draw, a reservation's kWh is
the measured draw (each minute's mean board power × 60 s) × the site's PUE over its metered
time; its metered GPU-seconds without a reading are counted at TDP as above. `basis` says
which: "measured" when any reading was used (with `measured_share`, the part of the metered
GPU-seconds covered by readings), else "estimated".
"""

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

__all__ = [
    "EnergyEstimate",
    "energy_estimate",
    "energy_measured",
    "energy_for",
    "booking_energy",
]

_PLACES = Decimal("0.001")
_EMISSIONS = (
    "emissions market-based: the site's renewable share at zero, the rest at the grid's "
    "average gCO2e/kWh."
)
_ESTIMATED = "GPUs × rated board power (TDP) × hours × site PUE; " + _EMISSIONS
_MEASURED = (
    "measured board power (per-minute means reported by the node) × site PUE over the metered "
    "time, rated power (TDP) for metered time without a reading; " + _EMISSIONS
)


@dataclass(frozen=True)
class EnergyEstimate:
    kwh: Decimal
    kg_co2e: Decimal | None  # None: the site's grid intensity is unknown
    pue: Decimal
    renewable_share: Decimal
    grid_carbon_g_per_kwh: int | None
    basis: str = "estimated"  # or "measured"
    method: str = _ESTIMATED
    measured_share: Decimal | None = None  # measured: the share of metered GPU-time read

    def as_dict(self) -> dict:
        return {
            "kwh": str(self.kwh),
            "kg_co2e": None if self.kg_co2e is None else str(self.kg_co2e),
            "pue": str(self.pue),
            "renewable_share": str(self.renewable_share),
            "grid_carbon_g_per_kwh": self.grid_carbon_g_per_kwh,
            "basis": self.basis,
            "method": self.method,
            "measured_share": None if self.measured_share is None else str(self.measured_share),
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


def energy_measured(
    *,
    measured_wh: Decimal,
    measured_gpu_seconds: int,
    metered_gpu_seconds: int,
    tdp_watts: int,
    pue: Decimal,
    renewable_share: Decimal,
    grid_carbon_g_per_kwh: int | None,
) -> EnergyEstimate:
    """kWh and CO2e of metered GPU time of which `measured_gpu_seconds` drew `measured_wh`
    (board energy, before PUE); the rest of the metered time at TDP."""
    if min(measured_gpu_seconds, metered_gpu_seconds, tdp_watts) < 0 or measured_wh < 0:
        raise ValueError("energy and times must not be negative")
    if isinstance(measured_wh, float) or isinstance(pue, float):
        raise TypeError("measured_wh and pue must be Decimal, not float")
    if measured_gpu_seconds == 0:
        return energy_estimate(
            tdp_watts=tdp_watts,
            pue=pue,
            renewable_share=renewable_share,
            grid_carbon_g_per_kwh=grid_carbon_g_per_kwh,
            gpu_count=1,
            seconds=metered_gpu_seconds,
        )
    unread = max(metered_gpu_seconds - measured_gpu_seconds, 0)
    board_wh = measured_wh + Decimal(tdp_watts) * unread / Decimal(3600)
    kwh = board_wh * pue / Decimal(1000)
    kg = None
    if grid_carbon_g_per_kwh is not None:
        kg = kwh * (1 - renewable_share) * grid_carbon_g_per_kwh / Decimal(1000)
        kg = kg.quantize(_PLACES, rounding=ROUND_HALF_UP)
    share = Decimal(min(measured_gpu_seconds, metered_gpu_seconds or measured_gpu_seconds))
    share /= Decimal(max(metered_gpu_seconds, measured_gpu_seconds))
    return EnergyEstimate(
        kwh=kwh.quantize(_PLACES, rounding=ROUND_HALF_UP),
        kg_co2e=kg,
        pue=pue,
        renewable_share=renewable_share,
        grid_carbon_g_per_kwh=grid_carbon_g_per_kwh,
        basis="measured",
        method=_MEASURED,
        measured_share=share.quantize(_PLACES, rounding=ROUND_HALF_UP),
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
