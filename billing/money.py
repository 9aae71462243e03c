"""Money arithmetic. Amounts are Decimal in major units or int in minor units; never float.

Rounding rule (the only one): an amount becomes minor units once, at the ledger line, with
ROUND_HALF_UP to the currency's minor unit. Usage is rounded on the reservation's cumulative
cost, and each line is the difference to what was already charged, so the sum of the lines is
always the correctly rounded total (no drift from rounding many small lines).

A hold is not a ledger line but money set aside for what a booking commits: it rounds up
(`hold_minor_units`), so it always covers what it stands for. Rounded half-up, the commitment
of a minute of one GPU, or of a short extension, would be held as nothing, and any number of
them would pass a gate with nothing available.
"""

from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

from config.currency import ZERO_DECIMAL_CURRENCIES, minor_exponent
from config.errors import ValidationFailed

__all__ = [
    "ZERO_DECIMAL_CURRENCIES",
    "MIN_TOP_UP",
    "MAX_TOP_UP",
    "minor_exponent",
    "to_minor_units",
    "hold_minor_units",
    "from_minor_units",
    "to_minor_units_asked",
    "usage_cost_minor",
]

# What one top-up (or automatic recharge, or its threshold) may be, in major units.
MIN_TOP_UP = Decimal("5.00")
MAX_TOP_UP = Decimal("100000.00")


def _require_exact(value, name: str) -> None:
    # bool is an int subclass; float has no exact decimal meaning: both are refused loudly.
    if isinstance(value, bool) or not isinstance(value, Decimal | int):
        raise TypeError(f"{name} must be Decimal or int, not {type(value).__name__}")


def to_minor_units(amount: Decimal | int, currency: str) -> int:
    """Decimal major units → int minor units, ROUND_HALF_UP."""
    _require_exact(amount, "amount")
    scaled = Decimal(amount).scaleb(minor_exponent(currency))
    return int(scaled.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def hold_minor_units(amount: Decimal | int, currency: str) -> int:
    """Decimal major units → int minor units for a hold: rounded up, never below the amount."""
    _require_exact(amount, "amount")
    scaled = Decimal(amount).scaleb(minor_exponent(currency))
    return int(scaled.quantize(Decimal(1), rounding=ROUND_CEILING))


def to_minor_units_asked(amount: Decimal | int, currency: str, *, field: str) -> int:
    """An amount a customer asks for (a top-up, a recharge setting) → int minor units, refused
    (400 amount_precision on `field`) unless it is a whole number of them: 5.50 in yen would
    be charged as 6, another amount than the one asked for."""
    minor = to_minor_units(amount, currency)
    if Decimal(amount).scaleb(minor_exponent(currency)) != minor:
        places = minor_exponent(currency)
        unit = "whole numbers" if places == 0 else f"given to at most {places} decimal places"
        raise ValidationFailed(
            f"Amounts in {currency.upper()} are {unit}.", code="amount_precision", field=field
        )
    return minor


def from_minor_units(amount_minor: int, currency: str) -> Decimal:
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise TypeError(f"amount_minor must be int, not {type(amount_minor).__name__}")
    exponent = minor_exponent(currency)
    return Decimal(amount_minor).scaleb(-exponent).quantize(Decimal(1).scaleb(-exponent))


def usage_cost_minor(*, gpu_seconds: int, price_per_gpu_hour: Decimal, currency: str) -> int:
    """Cost of `gpu_seconds` (GPU count × seconds) at an hourly price, in minor units."""
    if isinstance(gpu_seconds, bool) or not isinstance(gpu_seconds, int):
        raise TypeError(f"gpu_seconds must be int, not {type(gpu_seconds).__name__}")
    _require_exact(price_per_gpu_hour, "price_per_gpu_hour")
    return to_minor_units(Decimal(gpu_seconds) * Decimal(price_per_gpu_hour) / 3600, currency)
