"""Quotes: a priced offer held for settings.QUOTE_TTL."""

from dataclasses import replace
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from config.errors import NotAvailable, ValidationFailed
from marketplace import ids
from marketplace.funding import funding_gate
from marketplace.models import Organization, Quote
from marketplace.rules import validate_request_period
from marketplace.selectors.availability import AvailabilityQuery, availability_search
from marketplace.selectors.reference import gpu_model_by_slug, site_by_slug, site_regions
from marketplace.services.allocation import site_curtailed_refusal

__all__ = ["currencies_elsewhere", "nothing_available", "quote_create", "resolve_catalogue"]


def resolve_catalogue(
    *, gpu_model: str | None, site: str | None, region: str | None = None
) -> None:
    """Unknown model or site slugs, or a region no site is in, are bad input (400), not
    "nothing available" (409)."""
    if gpu_model is not None and gpu_model_by_slug(gpu_model) is None:
        raise ValidationFailed(
            f"Unknown GPU model {gpu_model!r}.", code="unknown_gpu_model", field="gpu_model"
        )
    if site is not None and site_by_slug(site) is None:
        raise ValidationFailed(f"Unknown site {site!r}.", code="unknown_site", field="site")
    if region is not None and region not in site_regions():
        raise ValidationFailed(
            f"No site is in region {region!r}.", code="unknown_region", field="region"
        )


def currencies_elsewhere(query: AvailabilityQuery) -> list[str]:
    """For a search in one currency that found nothing: the other currencies offers for the
    same request are priced in (which an organisation billed in that one cannot book)."""
    if query.currency is None:
        return []
    offers = availability_search(replace(query, currency=None))
    return sorted({offer.currency for offer in offers} - {query.currency})


def _filters_text(query: AvailabilityQuery) -> str:
    """The filters a request narrowed the search by, as a refusal names them, so a caller
    knows which to relax."""
    said = []
    if query.region is not None:
        said.append(f"in region {query.region}")
    if query.max_price_per_gpu_hour is not None:
        said.append(f"at or below {query.max_price_per_gpu_hour} per GPU-hour")
    if query.min_reliability is not None:
        said.append(
            f"on nodes with a 30-day reliability of at least {query.min_reliability} (a node "
            "too new to have one does not qualify)"
        )
    grid = [
        f"{name} {value}"
        for name, value in (
            ("min_renewable_share", query.min_renewable_share),
            ("max_grid_carbon_g_per_kwh", query.max_grid_carbon_g_per_kwh),
            ("max_pue", query.max_pue),
        )
        if value is not None
    ]
    if grid:
        said.append(f"at sites meeting {', '.join(grid)}")
    return "".join(f" {text}" for text in said)


def nothing_available(query: AvailabilityQuery) -> NotAvailable:
    """The refusal of a request no site can serve, naming the filters that narrowed it; in
    the organisation's currency, when sites priced in another currency have the GPUs, it says
    so (the organisation cannot book those: it is billed in one currency)."""
    message = (
        f"No site has {query.gpu_count} {query.gpu_model} GPU(s) free for that period"
        f"{_filters_text(query)}"
    )
    if query.currency is not None:
        elsewhere = currencies_elsewhere(query)
        if elsewhere:
            message += (
                f" priced in {query.currency.upper()}, the currency this organisation is "
                f"billed in (sites priced in {', '.join(c.upper() for c in elsewhere)} have "
                "them)"
            )
    return NotAvailable(message + ".", code="not_available")


@transaction.atomic
def quote_create(
    *,
    organization: Organization,
    gpu_model: str,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
    tier: str,
    term: str = "none",
    site: str | None = None,
    region: str | None = None,
    min_reliability: Decimal | None = None,
    min_renewable_share: Decimal | None = None,
    max_grid_carbon_g_per_kwh: int | None = None,
    max_pue: Decimal | None = None,
) -> Quote:
    """Price the cheapest offer that fits and hold it for settings.QUOTE_TTL. A reliability
    floor is kept on the quote: booking it places only on nodes at or above it. The grid
    filters choose the site, which the quote then names."""
    now = timezone.now()
    validate_request_period(starts_at=starts_at, ends_at=ends_at, gpu_count=gpu_count, now=now)
    resolve_catalogue(gpu_model=gpu_model, site=site, region=region)
    query = AvailabilityQuery(
        gpu_count=gpu_count,
        starts_at=starts_at,
        ends_at=ends_at,
        tier=tier,
        term=term,
        gpu_model=gpu_model,
        site=site,
        region=region,
        min_reliability=min_reliability,
        min_renewable_share=min_renewable_share,
        max_grid_carbon_g_per_kwh=max_grid_carbon_g_per_kwh,
        max_pue=max_pue,
        # The cheapest in the currency it is billed in: one in another could not be booked.
        currency=funding_gate().billing_currency(organization_id=organization.pk),
        with_history=False,
    )
    offers = availability_search(query)
    if not offers:
        named = site_by_slug(site) if site is not None else None
        if named is not None and region is not None and named.region != region:
            named = None  # not offered for the region asked: the search's own refusal
        # At a site asked for by name, a grid curtailment of the period is the reason, as
        # when booking there directly (409 site_curtailed).
        refusal = named and site_curtailed_refusal(
            site_id=named.pk, starts_at=starts_at, ends_at=ends_at
        )
        raise refusal or nothing_available(query)
    best = offers[0]
    expires_at = now + settings.QUOTE_TTL
    return Quote.objects.create(
        public_id=ids.quote_id(expires_at=expires_at),
        organization=organization,
        gpu_model=best.gpu_model,
        site=best.site,
        gpu_count=gpu_count,
        tier=tier,
        term=term,
        starts_at=starts_at,
        ends_at=ends_at,
        currency=best.currency,
        price_per_gpu_hour=best.price_per_gpu_hour,
        total_amount=best.total,
        breakdown=best.breakdown.as_dict(),
        min_reliability=min_reliability,
        expires_at=expires_at,
    )
