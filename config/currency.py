"""Currencies' minor units, which the marketplace's totals and billing's ledger both round to:
one rule, so an amount shown is the amount charged (ISO 4217, as Stripe lists them)."""

import re
from decimal import ROUND_HALF_UP, Decimal

__all__ = [
    "ZERO_DECIMAL_CURRENCIES",
    "THREE_DECIMAL_CURRENCIES",
    "currency_refusal",
    "minor_exponent",
    "minor_unit",
    "money_round",
]

# ISO 4217 currencies of three decimals that Stripe takes (in multiples of ten of the minor
# unit): not supported here, as a price of them would be charged at two decimals.
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})

# ISO 4217 currencies without a minor unit, as Stripe lists them ("zero-decimal currencies").
ZERO_DECIMAL_CURRENCIES = frozenset(
    {
        "bif",
        "clp",
        "djf",
        "gnf",
        "jpy",
        "kmf",
        "krw",
        "mga",
        "pyg",
        "rwf",
        "ugx",
        "vnd",
        "vuv",
        "xaf",
        "xof",
        "xpf",
    }  # fmt: skip
)


def minor_exponent(currency: str) -> int:
    return 0 if currency.lower() in ZERO_DECIMAL_CURRENCIES else 2


def minor_unit(currency: str) -> Decimal:
    """0.01 for most currencies, 1 for those without a minor unit."""
    return Decimal(1).scaleb(-minor_exponent(currency))


def money_round(amount: Decimal, currency: str) -> Decimal:
    """An amount rounded half-up to the currency's minor unit (the one rounding rule)."""
    return amount.quantize(minor_unit(currency), rounding=ROUND_HALF_UP)


def currency_refusal(code: str) -> str | None:
    """Why `code` (lower case) is not a currency Switchyard charges in; None when it is: an
    ISO 4217 code of 0 or 2 decimals, lower case as Stripe and the ledger write it ("USD"
    would be another currency than the accounts' "usd", and a three-decimal one would be
    charged a tenth of its price)."""
    if not re.fullmatch(r"[a-z]{3}", code or ""):
        return "A currency is a three-letter ISO 4217 code in lower case (usd, eur, jpy)."
    if code in THREE_DECIMAL_CURRENCIES:
        return f"{code.upper()} has three decimals, which Switchyard does not charge in."
    return None
