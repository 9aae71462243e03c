"""Pricing: a pure function from inputs to a price breakdown, plus the loader of its inputs.

Rounding rule (the only one): the price per GPU-hour is rounded half-up to 4 decimal places;
the total is price per GPU-hour × GPU count × exact hours (seconds / 3600), rounded half-up to
the cent once, at the end. Nothing in between is rounded.

Tiers: on-demand pays the list price; reserved takes the discount of its term, and its period
must be at least the term (1w = 7 days, 1m = 30, 3m = 90, 1y = 365 days; the term is a minimum
commitment, and extending keeps the discounted rate); interruptible takes its own discount and
may be preempted. All tiers then get the utilisation multiplier and the energy multiplier (the
part of the list price set by the policy's pass-through follows the site's energy price against
the policy's reference; off by default, and only where the site pays for power in the rate
card's currency), and the final price is clamped to [floor, ceiling] × list price.

The energy price: where the site's price zone publishes fresh prices in the card's currency,
the zone's prices time-weighted over a span that depends on the tier's basis (the policy's
`energy_basis_<tier>`: "hour", the first hour of the window, so interruptible follows the
hour's price; "window", the booked window; "long", the window plus the 30 days before it).
Time the zone has not published is priced at the site's static price (gaps inside the
published horizon) or, beyond the horizon, at the last known price or the static price (the
policy's `beyond_horizon`); a stale zone, one priced in another currency, or a site without a
zone uses the static price throughout. The breakdown says which.

The energy floor, never crossed by any tier: the marginal energy cost of the GPU-hour (rated
board power × the site's PUE × the energy price, which for the floor is the higher of the
tier's energy price and the window's average) plus the policy's margin (a share of that cost
plus an amount per GPU-hour), rounded up to 4 places. When the price above would be lower,
the price is the floor (`clamped` = "energy_floor"), even above the ceiling.
"""

from bisect import bisect_right
from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from config.currency import money_round
from config.errors import NotAvailable, ValidationFailed
from inventory.grid_prices import zone_price_series
from marketplace.models import EnergyBasis, PricingPolicy, RateCard, Term, Tier
from marketplace.selectors.reference import pricing_policy_current, rate_card_for

__all__ = [
    "TERM_LENGTHS",
    "ROUNDING_RULE",
    "RateInputs",
    "PricingBounds",
    "PricingInputs",
    "PriceBreakdown",
    "PowerPrices",
    "PowerInputs",
    "PowerPriceEstimate",
    "PriceFloor",
    "LONG_AVERAGE_DAYS",
    "power_price_over",
    "power_prices_from",
    "energy_floor",
    "price_floor",
    "power_series_for",
    "price_quote",
    "period_total",
    "pricing_inputs_for",
    "validate_tier_term",
    "DEFAULT_POLICY",
]

TERM_LENGTHS: dict[str, timedelta] = {
    Term.WEEK: timedelta(days=7),
    Term.MONTH: timedelta(days=30),
    Term.QUARTER: timedelta(days=90),
    Term.YEAR: timedelta(days=365),
}
ROUNDING_RULE = (
    "price per GPU-hour rounded half-up to 4 decimal places; total = price × GPUs × "
    "exact hours, rounded half-up once to the currency's smallest unit (the cent; a whole "
    "yen for JPY)"
)
_PRICE_QUANTUM = Decimal("0.0001")
_CENT = Decimal("0.01")
_ONE = Decimal("1")


@dataclass(frozen=True)
class RateInputs:
    """The list price and the discounts that apply to it."""

    price_per_gpu_hour: Decimal
    currency: str
    term_discount_pct: dict[str, Decimal] = field(default_factory=dict)
    interruptible_discount_pct: Decimal = Decimal("0")
    source: str = "default"  # "default" or "site:<slug>": which rate card it came from
    # The site's energy price in the card's currency; None: not known in it (no adjustment).
    energy_price_per_mwh: Decimal | None = None


@dataclass(frozen=True)
class PricingBounds:
    utilisation_pivot: Decimal
    utilisation_slope: Decimal
    floor_multiplier: Decimal
    ceiling_multiplier: Decimal
    energy_pass_through_pct: Decimal = Decimal("0")
    reference_energy_price_per_mwh: Decimal = Decimal("40")
    # Which span of the zone's prices each tier is priced from (EnergyBasis).
    energy_basis: dict[str, str] = field(
        default_factory=lambda: {
            Tier.ON_DEMAND: EnergyBasis.WINDOW,
            Tier.RESERVED: EnergyBasis.LONG,
            Tier.INTERRUPTIBLE: EnergyBasis.HOUR,
        }
    )
    beyond_horizon: str = "static"  # "static" or "last_known"
    floor_margin_pct: Decimal = Decimal("20")
    floor_margin_per_gpu_hour: Decimal = Decimal("0")


# A zone price: [starts_at, ends_at) at price per MWh.
Interval = tuple[datetime, datetime, Decimal]


@dataclass(frozen=True)
class PowerPrices:
    """A site's power price over time, in the rate card's currency.

    feed: "ok" (the zone's intervals are used), "no_zone", "no_prices", "stale" or
    "other_currency" (the zone is not used: the static price throughout).
    """

    static_price_per_mwh: Decimal | None  # None: the site's static price is in another currency
    zone: str | None = None
    feed: str = "no_zone"
    intervals: tuple[Interval, ...] = ()  # sorted, non-overlapping
    last: Interval | None = None  # the last published interval: the horizon, the last price
    # History before the intervals, summed: (from, to, Σ price × seconds, published seconds).
    lookback: tuple[datetime, datetime, Decimal, int] | None = None
    # Estimates already made from these prices (a search prices every model of a site from the
    # same prices and window): a memo, not part of the value.
    memo: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def usable(self) -> bool:
        return self.feed == "ok" and self.last is not None


@dataclass(frozen=True)
class PowerInputs:
    """What the energy floor needs besides the price: the board's rated power and the PUE."""

    board_power_w: int
    pue: Decimal
    prices: PowerPrices


@dataclass(frozen=True)
class PowerPriceEstimate:
    price_per_mwh: Decimal | None
    seconds: int
    published_seconds: int  # priced from the zone's published intervals
    gap_seconds: int  # inside the horizon, unpublished: the static price
    beyond_seconds: int  # after the horizon: last known or static (`beyond_at`)
    beyond_at: str | None  # "last_known" or "static"
    note: str  # in words


@dataclass(frozen=True)
class PricingInputs:
    rate: RateInputs
    bounds: PricingBounds
    power: PowerInputs | None = None


@dataclass(frozen=True)
class PriceBreakdown:
    currency: str
    list_price_per_gpu_hour: Decimal
    rate_source: str
    tier: str
    term: str
    tier_discount_pct: Decimal
    utilisation: Decimal
    utilisation_multiplier: Decimal
    energy_price_per_mwh: Decimal | None
    energy_multiplier: Decimal
    multiplier_unbounded: Decimal
    multiplier: Decimal
    clamped: str | None  # "floor", "ceiling" or None
    price_per_gpu_hour: Decimal
    gpu_count: int
    hours: Decimal  # exact to the second, shown to 6 places
    total: Decimal
    # Where the energy price came from ("zone:<code>", "static", or None: not known in the
    # card's currency), over what span ("hour", "window", "long"), in words.
    energy_price_source: str | None = None
    energy_price_basis: str | None = None
    energy_price_note: str = ""
    # The expected energy price over the booked window (time-weighted), per MWh.
    window_energy_price_per_mwh: Decimal | None = None
    # The floor: energy cost of the GPU-hour + margin (None: no energy price in the currency).
    energy_cost_per_gpu_hour: Decimal | None = None
    margin_per_gpu_hour: Decimal | None = None
    price_floor_per_gpu_hour: Decimal | None = None
    rounding: str = ROUNDING_RULE

    def as_dict(self) -> dict:
        """JSON-safe form (Decimals as strings), as stored on quotes and reservations."""
        # The fields are flat, so no dataclasses.asdict (it deep-copies every value: a search
        # serialises one breakdown per offer).
        return {
            f.name: (str(v) if isinstance(v, Decimal) else v)
            for f in fields(self)
            for v in (getattr(self, f.name),)
        }


# Used when staff have not created a policy yet.
DEFAULT_POLICY = {
    "discount_1w_pct": Decimal("5"),
    "discount_1m_pct": Decimal("12"),
    "discount_3m_pct": Decimal("20"),
    "discount_1y_pct": Decimal("35"),
    "interruptible_discount_pct": Decimal("55"),
    "utilisation_pivot": Decimal("0.6"),
    "utilisation_slope": Decimal("0.5"),
    "floor_multiplier": Decimal("0.35"),
    "ceiling_multiplier": Decimal("1.5"),
    "energy_pass_through_pct": Decimal("0"),
    "reference_energy_price_per_mwh": Decimal("40"),
    "energy_basis_on_demand": EnergyBasis.WINDOW,
    "energy_basis_reserved": EnergyBasis.LONG,
    "energy_basis_interruptible": EnergyBasis.HOUR,
    "beyond_horizon": "static",
    "floor_margin_pct": Decimal("20"),
    "floor_margin_per_gpu_hour": Decimal("0"),
}
LONG_AVERAGE_DAYS = 30
_HOUR = timedelta(hours=1)


# Read on every search, quote and booking: Choices.values builds its list on each access.
_TIERS, _TERMS = frozenset(Tier.values), frozenset(Term.values)


def validate_tier_term(*, tier: str, term: str, starts_at: datetime, ends_at: datetime) -> None:
    """Raise ValidationFailed unless tier, term and period go together."""
    if tier not in _TIERS:
        raise ValidationFailed(f"Unknown tier {tier!r}.", code="invalid_tier", field="tier")
    if term not in _TERMS:
        raise ValidationFailed(f"Unknown term {term!r}.", code="invalid_term", field="term")
    if tier == Tier.RESERVED:
        if term == Term.NONE:
            raise ValidationFailed(
                "The reserved tier needs a term: 1w, 1m, 3m or 1y.",
                code="term_required",
                field="term",
            )
        if ends_at - starts_at < TERM_LENGTHS[term]:
            raise ValidationFailed(
                f"A {term} term needs a period of at least {TERM_LENGTHS[term].days} days.",
                code="period_shorter_than_term",
                field="ends_at",
            )
    elif term != Term.NONE:
        raise ValidationFailed(
            f"Terms apply to the reserved tier only; use term 'none' with {tier}.",
            code="term_not_allowed",
            field="term",
        )


def period_total(
    *, price_per_gpu_hour: Decimal, gpu_count: int, seconds: int, currency: str
) -> Decimal:
    """The one total rule: price × GPUs × seconds / 3600, rounded half-up once to the
    currency's minor unit (the cent; the yen for a currency without one), as the ledger
    charges it."""
    return money_round(price_per_gpu_hour * gpu_count * seconds / Decimal(3600), currency)


def price_quote(
    *,
    rate: RateInputs,
    tier: str,
    term: str,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
    utilisation: Decimal,
    bounds: PricingBounds,
    power: PowerInputs | None = None,
) -> PriceBreakdown:
    """Price `gpu_count` GPUs for [starts_at, ends_at). Pure: no database access.

    Without `power` the energy price is the rate's static one and there is no energy floor
    (the rules' unit tests); every offer and quote passes it."""
    validate_tier_term(tier=tier, term=term, starts_at=starts_at, ends_at=ends_at)
    if gpu_count < 1:
        raise ValidationFailed("gpu_count must be at least 1.", field="gpu_count")
    if ends_at <= starts_at:
        raise ValidationFailed("ends_at must be after starts_at.", field="ends_at")
    # Utilisation is a share (0 to 1) taken to 4 places, so the breakdown stays readable.
    utilisation = min(max(Decimal(utilisation), Decimal("0")), _ONE).quantize(
        Decimal("0.0001"), rounding=ROUND_HALF_UP
    )
    energy = _tier_energy(rate=rate, power=power, bounds=bounds, tier=tier,
                          starts_at=starts_at, ends_at=ends_at)  # fmt: skip
    discount, util_mult, energy_mult, unbounded, multiplier, clamped = _price_multiplier(
        rate=rate,
        bounds=bounds,
        tier=tier,
        term=term,
        utilisation=utilisation,
        energy_price=energy["price"],
    )
    price = (rate.price_per_gpu_hour * multiplier).quantize(_PRICE_QUANTUM, rounding=ROUND_HALF_UP)
    cost = margin = floor_price = None
    if power is not None and energy["floor_price"] is not None:
        cost, margin, floor_price = energy_floor(
            board_power_w=power.board_power_w,
            pue=power.pue,
            energy_price_per_mwh=energy["floor_price"],
            bounds=bounds,
        )
        if price < floor_price:
            price, clamped = floor_price, "energy_floor"
    seconds = int((ends_at - starts_at).total_seconds())
    return PriceBreakdown(
        currency=rate.currency,
        list_price_per_gpu_hour=rate.price_per_gpu_hour,
        rate_source=rate.source,
        tier=tier,
        term=term,
        tier_discount_pct=discount,
        utilisation=utilisation,
        utilisation_multiplier=util_mult,
        energy_price_per_mwh=energy["price"],
        energy_multiplier=energy_mult,
        multiplier_unbounded=unbounded,
        multiplier=multiplier,
        clamped=clamped,
        price_per_gpu_hour=price,
        gpu_count=gpu_count,
        hours=(Decimal(seconds) / Decimal(3600)).quantize(Decimal("0.000001")),
        total=period_total(
            price_per_gpu_hour=price, gpu_count=gpu_count, seconds=seconds, currency=rate.currency
        ),
        energy_price_source=energy["source"],
        energy_price_basis=energy["basis"],
        energy_price_note=energy["note"],
        window_energy_price_per_mwh=energy["window_price"],
        energy_cost_per_gpu_hour=cost,
        margin_per_gpu_hour=margin,
        price_floor_per_gpu_hour=floor_price,
    )


def _price_multiplier(
    *,
    rate: RateInputs,
    bounds: PricingBounds,
    tier: str,
    term: str,
    utilisation: Decimal,
    energy_price: Decimal | None,
) -> tuple[Decimal, Decimal, Decimal, Decimal, Decimal, str | None]:
    """The list price's multiplier: the tier's discount, times the utilisation multiplier,
    times the energy pass-through, kept within the floor and ceiling. Returns the discount (%),
    the utilisation and energy multipliers, the product before and after the bounds, and
    which bound clamped it (None, "floor" or "ceiling")."""
    if tier == Tier.RESERVED:
        discount = rate.term_discount_pct.get(term, Decimal("0"))
    elif tier == Tier.INTERRUPTIBLE:
        discount = rate.interruptible_discount_pct
    else:
        discount = Decimal("0")
    util_mult = _ONE + bounds.utilisation_slope * (utilisation - bounds.utilisation_pivot)
    energy_mult = _ONE
    if energy_price is not None and bounds.energy_pass_through_pct:
        ratio = energy_price / bounds.reference_energy_price_per_mwh
        energy_mult = (_ONE + bounds.energy_pass_through_pct / 100 * (ratio - _ONE)).quantize(
            Decimal("0.0001"), rounding=ROUND_HALF_UP
        )
    unbounded = (_ONE - discount / 100) * util_mult * energy_mult
    multiplier, clamped = unbounded, None
    if unbounded < bounds.floor_multiplier:
        multiplier, clamped = bounds.floor_multiplier, "floor"
    elif unbounded > bounds.ceiling_multiplier:
        multiplier, clamped = bounds.ceiling_multiplier, "ceiling"
    return discount, util_mult, energy_mult, unbounded, multiplier, clamped


def power_price_over(
    prices: PowerPrices, *, starts_at: datetime, ends_at: datetime, beyond_horizon: str = "static"
) -> PowerPriceEstimate:
    """The time-weighted power price over [starts_at, ends_at). Pure.

    Published intervals count for the time they overlap the span; unpublished time inside the
    horizon (gaps) is priced at the static price; time after the horizon at the last known
    price or the static one (`beyond_horizon`; the other when that one is unknown). A zone
    that is not usable (prices.feed) gives the static price throughout. None: no price known.
    """
    key = (starts_at, ends_at, beyond_horizon)
    if key not in prices.memo:
        prices.memo[key] = _power_price_over(prices, starts_at, ends_at, beyond_horizon)
    return prices.memo[key]


def _power_price_over(prices, starts_at, ends_at, beyond_horizon) -> PowerPriceEstimate:
    seconds = int((ends_at - starts_at).total_seconds())
    static = prices.static_price_per_mwh
    if not prices.usable:
        why = {
            "no_zone": "the site has no price zone",
            "no_prices": f"zone {prices.zone} has published no prices",
            "stale": f"zone {prices.zone}'s feed is stale",
            "other_currency": f"zone {prices.zone} is priced in another currency",
        }.get(prices.feed, prices.feed)
        note = (
            f"the site's static price ({why})"
            if static is not None
            else f"no energy price in this currency ({why})"
        )
        return PowerPriceEstimate(static, seconds, 0, 0, 0, None, note)
    horizon, last_price = prices.last[1], prices.last[2]
    beyond_at = beyond_horizon if beyond_horizon == "last_known" else "static"
    if beyond_at == "static" and static is None:
        beyond_at = "last_known"
    beyond_price = last_price if beyond_at == "last_known" else static
    gap_price = static if static is not None else last_price
    weighted = Decimal(0)
    published = gaps = 0
    cursor = starts_at
    back = prices.lookback
    if back is not None and back[0] == starts_at and back[1] <= ends_at:
        # The history was summed in the database: its published part, its unpublished part
        # (gaps, or beyond the horizon if the horizon fell inside it).
        span = int((back[1] - back[0]).total_seconds())
        beyond_back = max(0, int((back[1] - max(horizon, back[0])).total_seconds()))
        weighted, published = back[2], back[3]
        gaps = span - published - beyond_back
        cursor = back[1]
        if beyond_back:  # then nothing after is published either
            beyond = seconds - published - gaps
            return _estimate(prices, seconds, weighted, published, gaps, beyond, beyond_at,
                             gap_price, beyond_price, horizon)  # fmt: skip
    if "ends" not in prices.memo:  # the intervals' ends, sorted as the intervals are
        prices.memo["ends"] = [end for _, end, _ in prices.intervals]
    first = bisect_right(prices.memo["ends"], starts_at)  # the first ending after the start
    for start, end, price in prices.intervals[first:]:
        if start >= ends_at:
            break
        start, end = max(start, cursor), min(end, ends_at)
        if end <= start:
            continue
        if start > cursor:
            gaps += int((start - cursor).total_seconds())
        length = int((end - start).total_seconds())
        weighted += price * length
        published += length
        cursor = max(cursor, end)
    if cursor < min(ends_at, horizon):
        gaps += int((min(ends_at, horizon) - cursor).total_seconds())
    beyond = seconds - published - gaps
    return _estimate(prices, seconds, weighted, published, gaps, beyond, beyond_at,
                     gap_price, beyond_price, horizon)  # fmt: skip


def _estimate(prices, seconds, weighted, published, gaps, beyond, beyond_at, gap_price,
              beyond_price, horizon) -> PowerPriceEstimate:  # fmt: skip
    total = weighted + gap_price * gaps + beyond_price * beyond
    average = (total / seconds).quantize(_PRICE_QUANTUM, rounding=ROUND_HALF_UP)
    parts = [f"zone {prices.zone}'s prices, time-weighted"]
    if gaps:
        parts.append(f"{_share(gaps, seconds)} in gaps at the static price {gap_price}")
    if beyond:
        which = "the last known price" if beyond_at == "last_known" else "the static price"
        parts.append(
            f"{_share(beyond, seconds)} beyond the published horizon "
            f"({horizon.isoformat()}) at {which} {beyond_price}"
        )
    return PowerPriceEstimate(
        average, seconds, published, gaps, beyond, beyond_at if beyond else None, "; ".join(parts)
    )


def _share(part: int, whole: int) -> str:
    return f"{(Decimal(part) * 100 / whole).quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)} %"


_BASIS_WORDS = {
    EnergyBasis.HOUR: "over the window's first hour",
    EnergyBasis.WINDOW: "over the booked window",
    EnergyBasis.LONG: f"over the window and the {LONG_AVERAGE_DAYS} days before it",
}


def _tier_energy(*, rate, power, bounds, tier, starts_at, ends_at) -> dict:
    """The tier's energy price (for the multiplier), the window's (shown to customers), and
    the one the floor uses (the higher of the two)."""
    if power is None:
        static = rate.energy_price_per_mwh
        return {
            "price": static,
            "window_price": static,
            "floor_price": None,
            "source": None if static is None else "static",
            "basis": None,
            "note": "" if static is None else "the site's static price",
        }
    prices = power.prices
    basis = bounds.energy_basis.get(tier, EnergyBasis.WINDOW)
    span = {
        EnergyBasis.HOUR: (starts_at, min(ends_at, starts_at + _HOUR)),
        EnergyBasis.LONG: (starts_at - timedelta(days=LONG_AVERAGE_DAYS), ends_at),
    }.get(basis, (starts_at, ends_at))
    window = power_price_over(
        prices, starts_at=starts_at, ends_at=ends_at, beyond_horizon=bounds.beyond_horizon
    )
    tier_estimate = (
        window
        if span == (starts_at, ends_at)
        else power_price_over(
            prices, starts_at=span[0], ends_at=span[1], beyond_horizon=bounds.beyond_horizon
        )
    )
    price = tier_estimate.price_per_mwh
    if price is None:
        source = None
    elif prices.usable and tier_estimate.published_seconds:
        source = f"zone:{prices.zone}"
    elif prices.usable and tier_estimate.beyond_at == "last_known":
        source = f"zone:{prices.zone}"
    else:
        source = "static"
    floor_price = None
    if price is not None and window.price_per_mwh is not None:
        floor_price = max(price, window.price_per_mwh)
    note = tier_estimate.note
    if prices.usable:
        note = f"{note}, {_BASIS_WORDS.get(basis, basis)}"
    return {
        "price": price,
        "window_price": window.price_per_mwh,
        "floor_price": floor_price,
        "source": source,
        "basis": basis,
        "note": note,
    }


def energy_floor(
    *, board_power_w: int, pue: Decimal, energy_price_per_mwh: Decimal, bounds: PricingBounds
) -> tuple[Decimal, Decimal, Decimal]:
    """(energy cost, margin, floor) per GPU-hour. Pure.

    cost = board power (kW) × PUE × price per MWh ÷ 1000 (kWh per GPU-hour × price per kWh);
    margin = cost × the policy's margin % (on a positive cost) + its amount per GPU-hour;
    floor = cost + margin, rounded UP to 4 places so a price at the floor never sells power
    below what it costs. Cost and margin are shown rounded half-up to 4 places.
    """
    exact_cost = Decimal(board_power_w) / 1000 * pue * energy_price_per_mwh / 1000
    exact_margin = (
        max(exact_cost, Decimal(0)) * bounds.floor_margin_pct / 100
        + bounds.floor_margin_per_gpu_hour
    )
    floor = max(exact_cost + exact_margin, Decimal(0)).quantize(
        _PRICE_QUANTUM, rounding=ROUND_CEILING
    )
    return (
        exact_cost.quantize(_PRICE_QUANTUM, rounding=ROUND_HALF_UP),
        exact_margin.quantize(_PRICE_QUANTUM, rounding=ROUND_HALF_UP),
        floor,
    )


def _bounds_and_discounts(policy: PricingPolicy | None) -> tuple[PricingBounds, dict, Decimal]:
    p = (
        DEFAULT_POLICY
        if policy is None
        else {k: getattr(policy, k) for k in DEFAULT_POLICY}  # same field names
    )
    bounds = PricingBounds(
        utilisation_pivot=p["utilisation_pivot"],
        utilisation_slope=p["utilisation_slope"],
        floor_multiplier=p["floor_multiplier"],
        ceiling_multiplier=p["ceiling_multiplier"],
        energy_pass_through_pct=p["energy_pass_through_pct"],
        reference_energy_price_per_mwh=p["reference_energy_price_per_mwh"],
        energy_basis={
            Tier.ON_DEMAND: p["energy_basis_on_demand"],
            Tier.RESERVED: p["energy_basis_reserved"],
            Tier.INTERRUPTIBLE: p["energy_basis_interruptible"],
        },
        beyond_horizon=p["beyond_horizon"],
        floor_margin_pct=p["floor_margin_pct"],
        floor_margin_per_gpu_hour=p["floor_margin_per_gpu_hour"],
    )
    discounts = {
        Term.WEEK: p["discount_1w_pct"],
        Term.MONTH: p["discount_1m_pct"],
        Term.QUARTER: p["discount_3m_pct"],
        Term.YEAR: p["discount_1y_pct"],
    }
    return bounds, discounts, p["interruptible_discount_pct"]


def current_policy() -> PricingPolicy | None:
    """The newest policy; from the per-process reference cache (up to 5 s old elsewhere)."""
    return pricing_policy_current()


def power_prices_from(*, site, currency: str, series, now: datetime, max_age: timedelta):
    """The site's PowerPrices in `currency` from its zone's series (ZoneSeries or None). Pure."""
    static = site.energy_price_per_mwh if site.energy_currency.lower() == currency.lower() else None
    if site.price_zone_id is None:
        return PowerPrices(static_price_per_mwh=static)
    if series is None or series.last is None:
        return PowerPrices(static, zone=series.code if series else None, feed="no_prices")
    if series.currency.lower() != currency.lower():
        return PowerPrices(static, zone=series.code, feed="other_currency")
    if series.last_received_at is None or now - series.last_received_at > max_age:
        return PowerPrices(static, zone=series.code, feed="stale")
    return PowerPrices(
        static, series.code, "ok", series.intervals, series.last, lookback=series.lookback
    )


def power_series_span(
    *, starts_at: datetime, ends_at: datetime, basis: str | None = None
) -> tuple[datetime, datetime]:
    """The span of zone prices a basis reads for a window (None: any basis)."""
    if basis in (EnergyBasis.HOUR, EnergyBasis.WINDOW):
        return starts_at, ends_at
    return starts_at - timedelta(days=LONG_AVERAGE_DAYS), ends_at


def pricing_inputs_for(
    site,
    gpu_model,
    *,
    policy: PricingPolicy | None = None,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
) -> PricingInputs:
    """Load the rate card (the site's override, else the model default), the policy and, for a
    window, the site's power prices.

    Raises NotAvailable when the model has no rate card: it is not for sale.
    """
    cards = {
        c.site_id: c
        for c in RateCard.objects.filter(Q(site=site) | Q(site__isnull=True), gpu_model=gpu_model)
    }
    card = cards.get(site.pk) or cards.get(None)
    if card is None:
        raise NotAvailable(f"{gpu_model.slug} has no rate card; it is not for sale.")
    series = None
    if starts_at is not None and ends_at is not None:
        series = power_series_for([site], starts_at=starts_at, ends_at=ends_at).get(
            site.price_zone_id
        )
    return pricing_inputs_from(
        card=card,
        site=site,
        policy=policy or current_policy(),
        gpu_model=gpu_model,
        series=series,
    )


def power_series_for(
    sites, *, starts_at: datetime, ends_at: datetime, tier: str | None = None, policy=None
) -> dict:
    """{zone id: ZoneSeries} for the sites' zones, as pricing `tier` for the window needs
    (the policy's basis for the tier; None: any tier): one query."""
    basis = None
    if tier is not None:
        bounds, _, _ = _bounds_and_discounts(policy)
        basis = bounds.energy_basis.get(tier)
    lo, hi = power_series_span(starts_at=starts_at, ends_at=ends_at, basis=basis)
    return zone_price_series(
        zone_ids={s.price_zone_id for s in sites if s.price_zone_id},
        starts_at=starts_at,
        ends_at=hi,
        lookback_from=lo if lo < starts_at else None,
    )


def pricing_inputs_from(
    *,
    card: RateCard,
    site,
    policy: PricingPolicy | None,
    gpu_model=None,
    series=None,
    now=None,
    power_prices: dict | None = None,
):
    """The pricing inputs from loaded rows; with the GPU model, the power inputs too (the
    zone's `series`, from inventory.grid_prices.zone_price_series, or None). `power_prices`:
    a dict the caller keeps for one search, so each site's PowerPrices (and the estimates
    memoised on it) is built once for all its GPU models."""
    bounds, discounts, interruptible = _bounds_and_discounts(policy)
    rate = RateInputs(
        price_per_gpu_hour=card.price_per_gpu_hour,
        currency=card.currency,
        term_discount_pct=discounts,
        interruptible_discount_pct=interruptible,
        source=f"site:{site.slug}" if card.site_id else "default",
        energy_price_per_mwh=site.energy_price_per_mwh
        if site.energy_currency.lower() == card.currency.lower()
        else None,
    )
    power = None
    if gpu_model is not None:
        key = (site.pk, card.currency.lower())
        prices = None if power_prices is None else power_prices.get(key)
        if prices is None:
            prices = power_prices_from(
                site=site,
                currency=card.currency,
                series=series,
                now=now or timezone.now(),
                max_age=settings.GRID_PRICE_MAX_AGE,
            )
            if power_prices is not None:
                power_prices[key] = prices
        power = PowerInputs(board_power_w=gpu_model.tdp_watts, pue=site.pue, prices=prices)
    return PricingInputs(rate=rate, bounds=bounds, power=power)


@dataclass(frozen=True)
class PriceFloor:
    """The lowest price per GPU-hour anything may sell at, and how it was reached."""

    price_per_gpu_hour: Decimal
    currency: str
    energy_cost_per_gpu_hour: Decimal | None
    margin_per_gpu_hour: Decimal
    energy_price_per_mwh: Decimal | None
    energy_price_note: str


def price_floor(
    *,
    site,
    gpu_model,
    starts_at: datetime,
    ends_at: datetime,
    tier: str = Tier.ON_DEMAND,
    currency: str | None = None,
) -> PriceFloor:
    """The energy floor of a GPU-hour of `gpu_model` at `site` for [starts_at, ends_at), as
    offers of `tier` get it: energy cost + margin (module docstring). For callers that set a
    price themselves (resale asks) and must not go below it. `currency`: default the rate
    card's (NotAvailable without a rate card and without `currency`).

    Reads the policy and the zone's prices (one query); the rule itself is energy_floor.
    """
    if currency is None:
        card = rate_card_for(site_id=site.pk, gpu_model_id=gpu_model.pk)
        if card is None:
            raise NotAvailable(f"{gpu_model.slug} has no rate card; it is not for sale.")
        currency = card.currency
    bounds, _, _ = _bounds_and_discounts(current_policy())
    series = power_series_for([site], starts_at=starts_at, ends_at=ends_at, tier=tier).get(
        site.price_zone_id
    )
    prices = power_prices_from(
        site=site,
        currency=currency,
        series=series,
        now=timezone.now(),
        max_age=settings.GRID_PRICE_MAX_AGE,
    )
    power = PowerInputs(board_power_w=gpu_model.tdp_watts, pue=site.pue, prices=prices)
    energy = _tier_energy(
        rate=None, power=power, bounds=bounds, tier=tier, starts_at=starts_at, ends_at=ends_at
    )
    if energy["floor_price"] is None:
        margin = bounds.floor_margin_per_gpu_hour.quantize(_PRICE_QUANTUM)
        return PriceFloor(margin, currency, None, margin, None, energy["note"])
    cost, margin, floor = energy_floor(
        board_power_w=gpu_model.tdp_watts,
        pue=site.pue,
        energy_price_per_mwh=energy["floor_price"],
        bounds=bounds,
    )
    return PriceFloor(floor, currency, cost, margin, energy["floor_price"], energy["note"])
