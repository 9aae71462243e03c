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
"""

from dataclasses import dataclass, field, fields
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Q

from config.errors import NotAvailable, ValidationFailed
from marketplace.models import PricingPolicy, RateCard, Term, Tier

__all__ = [
    "TERM_LENGTHS",
    "ROUNDING_RULE",
    "RateInputs",
    "PricingBounds",
    "PricingInputs",
    "PriceBreakdown",
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
    "exact hours, rounded half-up to the cent once"
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


@dataclass(frozen=True)
class PricingInputs:
    rate: RateInputs
    bounds: PricingBounds


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
}


def validate_tier_term(*, tier: str, term: str, starts_at: datetime, ends_at: datetime) -> None:
    """Raise ValidationFailed unless tier, term and period go together."""
    if tier not in Tier.values:
        raise ValidationFailed(f"Unknown tier {tier!r}.", code="invalid_tier", field="tier")
    if term not in Term.values:
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


def period_total(*, price_per_gpu_hour: Decimal, gpu_count: int, seconds: int) -> Decimal:
    """The one total rule: price × GPUs × seconds / 3600, rounded half-up to the cent once."""
    return (price_per_gpu_hour * gpu_count * seconds / Decimal(3600)).quantize(
        _CENT, rounding=ROUND_HALF_UP
    )


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
) -> PriceBreakdown:
    """Price `gpu_count` GPUs for [starts_at, ends_at). Pure: no database access."""
    validate_tier_term(tier=tier, term=term, starts_at=starts_at, ends_at=ends_at)
    if gpu_count < 1:
        raise ValidationFailed("gpu_count must be at least 1.", field="gpu_count")
    if ends_at <= starts_at:
        raise ValidationFailed("ends_at must be after starts_at.", field="ends_at")
    # Utilisation is a share (0 to 1) taken to 4 places, so the breakdown stays readable.
    utilisation = min(max(Decimal(utilisation), Decimal("0")), _ONE).quantize(
        Decimal("0.0001"), rounding=ROUND_HALF_UP
    )

    if tier == Tier.RESERVED:
        discount = rate.term_discount_pct.get(term, Decimal("0"))
    elif tier == Tier.INTERRUPTIBLE:
        discount = rate.interruptible_discount_pct
    else:
        discount = Decimal("0")
    util_mult = _ONE + bounds.utilisation_slope * (utilisation - bounds.utilisation_pivot)
    energy_mult = _ONE
    if rate.energy_price_per_mwh is not None and bounds.energy_pass_through_pct:
        ratio = rate.energy_price_per_mwh / bounds.reference_energy_price_per_mwh
        energy_mult = (_ONE + bounds.energy_pass_through_pct / 100 * (ratio - _ONE)).quantize(
            Decimal("0.0001"), rounding=ROUND_HALF_UP
        )
    unbounded = (_ONE - discount / 100) * util_mult * energy_mult
    multiplier, clamped = unbounded, None
    if unbounded < bounds.floor_multiplier:
        multiplier, clamped = bounds.floor_multiplier, "floor"
    elif unbounded > bounds.ceiling_multiplier:
        multiplier, clamped = bounds.ceiling_multiplier, "ceiling"

    price = (rate.price_per_gpu_hour * multiplier).quantize(_PRICE_QUANTUM, rounding=ROUND_HALF_UP)
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
        energy_price_per_mwh=rate.energy_price_per_mwh,
        energy_multiplier=energy_mult,
        multiplier_unbounded=unbounded,
        multiplier=multiplier,
        clamped=clamped,
        price_per_gpu_hour=price,
        gpu_count=gpu_count,
        hours=(Decimal(seconds) / Decimal(3600)).quantize(Decimal("0.000001")),
        total=period_total(price_per_gpu_hour=price, gpu_count=gpu_count, seconds=seconds),
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
    from marketplace.selectors.reference import pricing_policy_current

    return pricing_policy_current()


def pricing_inputs_for(site, gpu_model, *, policy: PricingPolicy | None = None) -> PricingInputs:
    """Load the rate card (the site's override, else the model default) and the policy.

    Raises NotAvailable when the model has no rate card: it is not for sale.
    """
    cards = {
        c.site_id: c
        for c in RateCard.objects.filter(Q(site=site) | Q(site__isnull=True), gpu_model=gpu_model)
    }
    card = cards.get(site.pk) or cards.get(None)
    if card is None:
        raise NotAvailable(f"{gpu_model.slug} has no rate card; it is not for sale.")
    return pricing_inputs_from(card=card, site=site, policy=policy or current_policy())


def pricing_inputs_from(*, card: RateCard, site, policy: PricingPolicy | None):
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
    return PricingInputs(rate=rate, bounds=bounds)
