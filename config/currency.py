"""Currencies' minor units, which the marketplace's totals and billing's ledger both round to:
one rule, so an amount shown is the amount charged (ISO 4217, as Stripe lists them)."""

import re
from decimal import ROUND_HALF_UP, Decimal

__all__ = [
    "APPROXIMATE_UNITS_PER_USD",
    "SUPPORTED_CURRENCIES",
    "ZERO_DECIMAL_CURRENCIES",
    "THREE_DECIMAL_CURRENCIES",
    "WHOLE_UNIT_ONLY_CURRENCIES",
    "currency_refusal",
    "minor_exponent",
    "minor_unit",
    "money_round",
]

# ISO 4217 currencies of three decimals that Stripe takes (in multiples of ten of the minor
# unit): not supported here, as a price of them would be charged at two decimals.
THREE_DECIMAL_CURRENCIES = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})

# Two decimals in Stripe's API but charged in whole units only: since 2023 Stripe refuses an
# ISK amount that is not a multiple of 100 (invalid_charge_amount_no_decimal_compatible), and
# usage, holds and refunds here are kept to the hundredth. Not supported, as three-decimal ones.
WHOLE_UNIT_ONLY_CURRENCIES = frozenset({"isk"})

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


# The currencies Switchyard charges in: Stripe's presentment currencies of 0 or 2 decimals
# (docs.stripe.com/currencies; not its MRO and STD, codes ISO 4217 retired when those
# currencies were redenominated, so their unit is uncertain), each with APPROXIMATELY how
# many of its units make one US dollar (market rates of late 2025, rounded).
# The rates only size the top-up limits of a currency Stripe documents no minimum charge for
# (billing.money.top_up_limits), with room for them to move by half; nothing is converted
# or charged with them. A currency is added here, with its rate, or it is not taken.
_APPROXIMATE_UNITS_PER_USD = {
    "usd": "1", "aed": "3.67", "afn": "68", "all": "83", "amd": "385", "ang": "1.79",
    "aoa": "915", "ars": "1450", "aud": "1.53", "awg": "1.79", "azn": "1.70", "bam": "1.68",
    "bbd": "2", "bdt": "122", "bgn": "1.68", "bif": "2950", "bmd": "1", "bnd": "1.30",
    "bob": "6.91", "brl": "5.40", "bsd": "1", "bwp": "13.5", "byn": "3.0", "bzd": "2",
    "cad": "1.39", "cdf": "2250", "chf": "0.80", "clp": "940", "cny": "7.12", "cop": "3850",
    "crc": "500", "cve": "95", "czk": "21", "djf": "178", "dkk": "6.45", "dop": "63",
    "dzd": "130", "egp": "47.5", "etb": "150", "eur": "0.86", "fjd": "2.27", "fkp": "0.75",
    "gbp": "0.75", "gel": "2.70", "gip": "0.75", "gmd": "73", "gnf": "8700", "gtq": "7.66",
    "gyd": "209", "hkd": "7.78", "hnl": "26.3", "htg": "131", "huf": "335", "idr": "16600",
    "ils": "3.30", "inr": "88", "jmd": "160", "jpy": "152", "kes": "129",
    "kgs": "87.4", "khr": "4010", "kmf": "423", "krw": "1430", "kyd": "0.83", "kzt": "525",
    "lak": "21700", "lbp": "89500", "lkr": "303", "lrd": "183", "lsl": "17.4", "mad": "9.2",
    "mdl": "17", "mga": "4500", "mkd": "53", "mmk": "2100", "mnt": "3600", "mop": "8.02",
    "mur": "45.5", "mvr": "15.4", "mwk": "1735", "mxn": "18.4", "myr": "4.20",
    "mzn": "63.9", "nad": "17.4", "ngn": "1460", "nio": "36.8", "nok": "10.1", "npr": "141",
    "nzd": "1.75", "pab": "1", "pen": "3.40", "pgk": "4.20", "php": "58.5", "pkr": "283",
    "pln": "3.65", "pyg": "7100", "qar": "3.64", "ron": "4.37", "rsd": "101", "rub": "80",
    "rwf": "1450", "sar": "3.75", "sbd": "8.2", "scr": "14", "sek": "9.5", "sgd": "1.30",
    "shp": "0.75", "sle": "23", "sos": "571", "srd": "38.5", "szl": "17.4",
    "thb": "32.5", "tjs": "9.3", "top": "2.40", "try": "42", "ttd": "6.78", "twd": "30.7",
    "tzs": "2450", "uah": "41.7", "ugx": "3500", "uyu": "39.8", "uzs": "12000",
    "vnd": "26300", "vuv": "122", "wst": "2.80", "xaf": "565", "xcd": "2.70", "xcg": "1.79",
    "xof": "565", "xpf": "103", "yer": "239", "zar": "17.4", "zmw": "22.5",
}  # fmt: skip
APPROXIMATE_UNITS_PER_USD = {
    code: Decimal(rate) for code, rate in _APPROXIMATE_UNITS_PER_USD.items()
}
SUPPORTED_CURRENCIES = frozenset(APPROXIMATE_UNITS_PER_USD)


def minor_exponent(currency: str) -> int:
    return 0 if currency.lower() in ZERO_DECIMAL_CURRENCIES else 2


def minor_unit(currency: str) -> Decimal:
    """0.01 for most currencies, 1 for those without a minor unit."""
    return Decimal(1).scaleb(-minor_exponent(currency))


def money_round(amount: Decimal, currency: str) -> Decimal:
    """An amount rounded half-up to the currency's minor unit (the one rounding rule)."""
    return amount.quantize(minor_unit(currency), rounding=ROUND_HALF_UP)


def currency_refusal(code: str) -> str | None:
    """Why `code` (lower case) is not a currency Switchyard charges in; None when it is: one
    of SUPPORTED_CURRENCIES (Stripe's, of 0 or 2 decimals), lower case as Stripe and the
    ledger write it ("USD" would be another currency than the accounts' "usd", and a
    three-decimal one would be charged a tenth of its price)."""
    if not re.fullmatch(r"[a-z]{3}", code or ""):
        return "A currency is a three-letter ISO 4217 code in lower case (usd, eur, jpy)."
    if code in THREE_DECIMAL_CURRENCIES:
        return f"{code.upper()} has three decimals, which Switchyard does not charge in."
    if code in WHOLE_UNIT_ONLY_CURRENCIES:
        return (
            f"Stripe charges {code.upper()} in whole units only, which Switchyard does not "
            "charge in (its usage is kept to the hundredth)."
        )
    if code not in SUPPORTED_CURRENCIES:
        return f"{code.upper()} is not a currency Stripe charges in."
    return None
