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

from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_UP, Decimal

from config.currency import (
    APPROXIMATE_UNITS_PER_USD,
    ZERO_DECIMAL_CURRENCIES,
    minor_exponent,
    minor_unit,
)
from config.errors import ValidationFailed

__all__ = [
    "ZERO_DECIMAL_CURRENCIES",
    "STRIPE_MINIMUM_CHARGE",
    "STRIPE_MAXIMUM_CHARGE_MINOR",
    "TOP_UP_LIMITS",
    "top_up_limits",
    "top_up_range_text",
    "default_recharge_settings",
    "minor_exponent",
    "to_minor_units",
    "hold_minor_units",
    "from_minor_units",
    "to_minor_units_asked",
    "usage_cost_minor",
]

# Stripe's smallest charge per currency, in major units: a PaymentIntent for less is refused
# (docs.stripe.com/currencies, "Minimum and maximum charge amounts").
_STRIPE_MINIMUMS = {
    "usd": "0.50", "aed": "2.00", "aud": "0.50", "bgn": "1.00", "brl": "0.50",
    "cad": "0.50", "chf": "0.50", "czk": "15.00", "dkk": "2.50", "eur": "0.50",
    "gbp": "0.30", "hkd": "4.00", "huf": "175.00", "inr": "0.50", "jpy": "50",
    "mxn": "10.00", "myr": "2.00", "nok": "3.00", "nzd": "0.50", "pln": "2.00",
    "ron": "2.00", "sek": "3.00", "sgd": "0.50", "thb": "10.00",
}  # fmt: skip
STRIPE_MINIMUM_CHARGE = {code: Decimal(amount) for code, amount in _STRIPE_MINIMUMS.items()}
# Stripe's largest charge in any currency: eight digits of minor units (999,999.99; ¥99,999,999).
STRIPE_MAXIMUM_CHARGE_MINOR = 99_999_999

# What one top-up may be in each currency Stripe lists a minimum for, in major units: at least
# 5 and at least Stripe's minimum; at most about US$100,000 in round numbers of the currency,
# or Stripe's largest charge where that is less (HUF, INR, CZK, MXN, THB, NOK, SEK).
_TOP_UP_LIMITS = {
    "usd": ("5.00", "100000.00"), "eur": ("5.00", "100000.00"), "gbp": ("5.00", "100000.00"),
    "chf": ("5.00", "100000.00"), "aud": ("5.00", "150000.00"), "cad": ("5.00", "150000.00"),
    "nzd": ("5.00", "150000.00"), "sgd": ("5.00", "150000.00"), "bgn": ("5.00", "200000.00"),
    "aed": ("5.00", "400000.00"), "pln": ("5.00", "400000.00"), "brl": ("5.00", "500000.00"),
    "myr": ("5.00", "500000.00"), "ron": ("5.00", "500000.00"), "dkk": ("5.00", "700000.00"),
    "hkd": ("5.00", "800000.00"), "nok": ("5.00", "999999.99"), "sek": ("5.00", "999999.99"),
    "inr": ("5.00", "999999.99"), "mxn": ("10.00", "999999.99"), "thb": ("10.00", "999999.99"),
    "czk": ("15.00", "999999.99"), "huf": ("175.00", "999999.99"), "jpy": ("50", "10000000"),
}  # fmt: skip
TOP_UP_LIMITS = {
    code: (Decimal(least), Decimal(most)) for code, (least, most) in _TOP_UP_LIMITS.items()
}


# A currency Stripe documents no minimum for (Stripe takes the equivalent of US$0.50 at the
# day's rate): at least US$1 at the approximate rate, so a currency that has lost half its
# value since config.currency's table was written still clears Stripe's minimum; at most
# US$100,000, as for the listed currencies.
_DERIVED_LEAST_USD = Decimal(1)
_DERIVED_MOST_USD = Decimal(100_000)


def top_up_limits(currency: str) -> tuple[Decimal, Decimal]:
    """The least and the most one top-up may be in `currency`, in major units, both included;
    an automatic recharge and its threshold are bounded by the same numbers.

    TOP_UP_LIMITS for the currencies Stripe lists a minimum for. Any other currency
    Switchyard charges in (config.currency.SUPPORTED_CURRENCIES) from its approximate rate:
    the equivalent of US$1 rounded up to one significant figure (30,000 VND, 2,000 KRW), and
    at least 5; the equivalent of US$100,000 rounded down to two significant figures, or
    Stripe's largest charge where that is less (99,999,999 VND or KRW). ValueError for a
    currency Switchyard does not charge in."""
    code = currency.lower()
    if code in TOP_UP_LIMITS:
        return TOP_UP_LIMITS[code]
    if code not in APPROXIMATE_UNITS_PER_USD:
        raise ValueError(f"{currency!r} is not a currency Switchyard charges in")
    rate = APPROXIMATE_UNITS_PER_USD[code]
    unit = minor_unit(code)
    least = max(_round_figures(_DERIVED_LEAST_USD * rate, 1, ROUND_CEILING), Decimal(5))
    most = min(
        _round_figures(_DERIVED_MOST_USD * rate, 2, ROUND_FLOOR),
        from_minor_units(STRIPE_MAXIMUM_CHARGE_MINOR, code),
    )
    return least.quantize(unit, rounding=ROUND_CEILING), most.quantize(unit, rounding=ROUND_FLOOR)


# A new account's automatic-recharge threshold and amount when the operator sets none: about
# US$50 and US$100 in the currency, to two significant figures (43 and 86 EUR, 7,600 and
# 15,000 JPY, 1,300,000 and 2,600,000 VND), the amount within the currency's top-up limits.
_DEFAULT_RECHARGE_USD = (Decimal(50), Decimal(100))


def default_recharge_settings(currency: str) -> tuple[Decimal, Decimal]:
    """The default recharge threshold and amount in `currency`, in major units (the USD ones
    exactly: 50 and 100). ValueError for a currency Switchyard does not charge in."""
    code = currency.lower()
    least, most = top_up_limits(code)
    rate, unit = APPROXIMATE_UNITS_PER_USD[code], minor_unit(code)
    threshold, amount = (
        _round_figures(usd * rate, 2, ROUND_FLOOR).quantize(unit, rounding=ROUND_FLOOR)
        for usd in _DEFAULT_RECHARGE_USD
    )
    return min(threshold, most), min(max(amount, least), most)


def _round_figures(amount: Decimal, figures: int, rounding: str) -> Decimal:
    """`amount` to `figures` significant figures (a round number of the currency)."""
    step = Decimal(1).scaleb(amount.adjusted() - figures + 1)
    return (amount / step).to_integral_value(rounding=rounding) * step


def top_up_range_text(currency: str) -> str:
    """The limits as a customer reads them: "5.00 and 100,000.00 USD"."""
    least, most = top_up_limits(currency)
    return f"{least:,} and {most:,} {currency.upper()}"


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
