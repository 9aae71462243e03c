"""How the portal writes numbers, money, times, plans and names for people.

Money totals with thousands separators and two decimals, prices per GPU-hour with four, times
in UTC to the minute, plans and statuses in words, an actor as the name a member knows.
"""

import re
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from django import template

from config.currency import minor_exponent
from marketplace.models import ReservationStatus, Term, Tier

register = template.Library()

_TERM_WORDS = {
    Term.WEEK: "1 week",
    Term.MONTH: "1 month",
    Term.QUARTER: "3 months",
    Term.YEAR: "1 year",
}
_STATUS_WORDS = {
    ReservationStatus.PENDING: "Pending",
    ReservationStatus.SCHEDULED: "Scheduled",
    ReservationStatus.PROVISIONING: "Starting",
    ReservationStatus.ACTIVE: "Running",
    ReservationStatus.RELEASING: "Stopping",
    ReservationStatus.COMPLETED: "Completed",
    ReservationStatus.CANCELLED: "Cancelled",
    ReservationStatus.FAILED: "Failed",
    ReservationStatus.PREEMPTED: "Interrupted",
}
# An ISO 8601 time as services write them into causes and messages (seconds, microseconds and
# offset optional): shown as "2026-12-06 10:20 UTC".
_ISO_TIME = re.compile(r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2})(?::\d{2}(?:\.\d+)?)?(?:\+00:00|Z)?")


def _decimal(value) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _grouped(amount: Decimal, places: int) -> str:
    quantum = Decimal(1).scaleb(-places)
    return f"{amount.quantize(quantum, rounding=ROUND_HALF_UP):,.{places}f}"


@register.filter
def money(value, currency: str = "") -> str:
    """65370.62 → "65,370.62 USD": the currency's own decimals (none for yen: "500,000 JPY";
    two when no currency is named), thousands separated."""
    amount = _decimal(value)
    if amount is None:
        return "—"
    places = minor_exponent(currency) if currency else 2
    return f"{_grouped(amount, places)} {currency.upper()}".strip()


@register.filter
def rate(value, currency: str = "") -> str:
    """A price per GPU-hour: 2.05 → "2.0500 USD"."""
    amount = _decimal(value)
    if amount is None:
        return "—"
    return f"{_grouped(amount, 4)} {currency.upper()}".strip()


@register.filter
def number(value) -> str:
    """1234 → "1,234"; a Decimal keeps up to its own places."""
    amount = _decimal(value)
    if amount is None:
        return "—"
    if amount == amount.to_integral_value():
        return f"{int(amount):,}"
    return f"{amount.normalize():,f}"


@register.filter
def utc(value, seconds: str = "") -> str:
    """An aware datetime as "2026-12-06 10:20 UTC" (no seconds, no microseconds); with
    "seconds", a time off the whole minute keeps them ("2026-12-06 10:20:37 UTC")."""
    if not isinstance(value, datetime):
        return "—"
    value = value.astimezone(UTC)
    if seconds == "seconds" and value.second:
        return f"{value:%Y-%m-%d %H:%M:%S} UTC"
    return f"{value:%Y-%m-%d %H:%M} UTC"


@register.filter
def times_in_words(text) -> str:
    """ISO times inside a sentence (a history cause, an error) as people read them."""
    return _ISO_TIME.sub(lambda m: f"{m.group(1)} {m.group(2)} UTC", str(text or ""))


def plan_label(tier: str, term: str) -> str:
    if tier == Tier.RESERVED and term in _TERM_WORDS:
        return f"Reserved, {_TERM_WORDS[term]}"
    return Tier(tier).label if tier in Tier.values else str(tier)


@register.filter
def plan(obj) -> str:
    """A quote's or reservation's tier and term: "On-demand", "Reserved, 1 week"."""
    return plan_label(obj.tier, obj.term)


@register.filter
def status_label(status) -> str:
    return _STATUS_WORDS.get(status, str(status).replace("_", " ").capitalize())


@register.filter
def gpus_title(obj) -> str:
    """ "8 × H100 SXM at Mo i Rana" for a quote or a reservation."""
    return f"{obj.gpu_count} × {obj.gpu_model.name} at {obj.site.name}"


@register.filter
def duration(value, exact: str = "") -> str:
    """A timedelta (or seconds) as "2 h 05 min", "3 min", "4 d 2 h"; with "exact", to the
    second where it is not whole minutes ("4 d 2 h 05 min 23 s"), for a figure a price is
    multiplied by."""
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else (value or 0))
    seconds = max(seconds, 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, rest = divmod(rest, 60)
    if exact == "exact" and (rest or (days and minutes)):
        if days:
            return f"{days} d {hours} h {minutes:02d} min {rest:02d} s"
        if hours:
            return f"{hours} h {minutes:02d} min {rest:02d} s"
        return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min"


@register.filter
def actor(label, key_names=None) -> str:
    """Who did it, as the organisation knows them: a key by its name, a member by username."""
    label = str(label or "")
    kind, _, rest = label.partition(":")
    if kind == "api_key":
        name = (key_names or {}).get(rest)
        return f"API key “{name}”" if name else f"API key {rest}"
    if kind == "user":
        return rest
    if kind in ("system", "scheduler", "agent", "billing", "curtailment", ""):
        return "Switchyard"
    return label


def _change(multiplier: Decimal) -> str:
    pct = ((multiplier - 1) * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP).normalize()
    return f"+{pct:f} %" if pct > 0 else f"−{-pct:f} %"


@register.filter
def pricing_steps(breakdown) -> list[str]:
    """A stored price breakdown as the steps a customer can follow, in words."""
    b = breakdown or {}
    currency = b.get("currency", "")
    steps = [f"List price {rate(b.get('list_price_per_gpu_hour'), currency)} per GPU-hour"]
    discount = _decimal(b.get("tier_discount_pct")) or Decimal(0)
    if discount:
        steps.append(
            f"{discount.normalize():f} % off for the {plan_label(b.get('tier'), b.get('term')).lower()} plan"
        )
    demand = _decimal(b.get("utilisation_multiplier"))
    utilisation = _decimal(b.get("utilisation"))
    if demand is not None and demand != 1 and utilisation is not None:
        steps.append(
            f"{_change(demand)} for demand ({(utilisation * 100).quantize(Decimal(1))} % of GPUs in use)"
        )
    energy = _decimal(b.get("energy_multiplier"))
    if energy is not None and energy != 1:
        steps.append(
            f"{_change(energy)} for the site's power price ({money(b.get('energy_price_per_mwh'), currency)} per MWh)"
        )
    clamped = b.get("clamped")
    if clamped == "energy_floor":
        steps.append(
            f"raised to the energy floor: {rate(b.get('energy_cost_per_gpu_hour'), currency)} of "
            f"power per GPU-hour plus {rate(b.get('margin_per_gpu_hour'), currency)} margin"
        )
    elif clamped:
        steps.append(
            f"held at the {'lowest' if clamped == 'floor' else 'highest'} price we charge for it"
        )
    if b.get("energy_price_note"):
        steps.append(f"Power price: {b['energy_price_note']}")
    if b.get("price_floor_per_gpu_hour") and clamped != "energy_floor":
        steps.append(
            f"Never below {rate(b.get('price_floor_per_gpu_hour'), currency)} per GPU-hour: "
            f"{rate(b.get('energy_cost_per_gpu_hour'), currency)} of power plus "
            f"{rate(b.get('margin_per_gpu_hour'), currency)} margin"
        )
    return steps


@register.filter
def get_item(mapping, key):
    """mapping[key] in a template, or None."""
    return (mapping or {}).get(key)
