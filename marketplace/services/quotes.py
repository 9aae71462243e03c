"""Quotes: a priced offer held for settings.QUOTE_TTL."""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from config.errors import NotAvailable, ValidationFailed
from marketplace.models import Organization, Quote
from marketplace.selectors.availability import availability_search
from marketplace.selectors.reference import gpu_model_by_slug, site_by_slug

__all__ = ["quote_create", "validate_request_period", "START_SKEW", "MAX_DURATION", "MAX_LEAD"]

# A start this far in the past still counts as "now" (clocks and round trips).
START_SKEW = timedelta(seconds=60)
# The longest bookable period (a 1y term plus a day) and how far ahead one may book.
MAX_DURATION = timedelta(days=366)
MAX_LEAD = timedelta(days=365)


def validate_request_period(
    *, starts_at: datetime, ends_at: datetime, gpu_count: int, now: datetime | None = None
) -> None:
    """The checks every quote and reservation request passes; ValidationFailed otherwise."""
    now = now or timezone.now()
    if not isinstance(gpu_count, int) or isinstance(gpu_count, bool) or gpu_count < 1:
        raise ValidationFailed("gpu_count must be a whole number of at least 1.", field="gpu_count")
    for name, value in (("starts_at", starts_at), ("ends_at", ends_at)):
        if not isinstance(value, datetime) or value.tzinfo is None:
            raise ValidationFailed(f"{name} must be a time with a time zone.", field=name)
    if ends_at <= starts_at:
        raise ValidationFailed(
            "The end must be after the start.", code="period_invalid", field="ends_at"
        )
    if starts_at < now - START_SKEW:
        raise ValidationFailed(
            "The start time is in the past.", code="starts_in_past", field="starts_at"
        )
    if starts_at > now + MAX_LEAD:
        raise ValidationFailed(
            f"The start may be at most {MAX_LEAD.days} days ahead.",
            code="starts_too_far_ahead",
            field="starts_at",
        )
    if ends_at - starts_at > MAX_DURATION:
        raise ValidationFailed(
            f"A reservation may last at most {MAX_DURATION.days} days.",
            code="period_too_long",
            field="ends_at",
        )


def resolve_catalogue(*, gpu_model: str | None, site: str | None) -> None:
    """Unknown model or site slugs are bad input (400), not "nothing available" (409)."""
    if gpu_model is not None and gpu_model_by_slug(gpu_model) is None:
        raise ValidationFailed(
            f"Unknown GPU model {gpu_model!r}.", code="unknown_gpu_model", field="gpu_model"
        )
    if site is not None and site_by_slug(site) is None:
        raise ValidationFailed(f"Unknown site {site!r}.", code="unknown_site", field="site")


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
) -> Quote:
    """Price the cheapest offer that fits and hold it for settings.QUOTE_TTL."""
    now = timezone.now()
    validate_request_period(starts_at=starts_at, ends_at=ends_at, gpu_count=gpu_count, now=now)
    resolve_catalogue(gpu_model=gpu_model, site=site)
    offers = availability_search(
        gpu_count=gpu_count,
        starts_at=starts_at,
        ends_at=ends_at,
        tier=tier,
        term=term,
        gpu_model=gpu_model,
        site=site,
        region=region,
    )
    if not offers:
        raise NotAvailable(
            f"No site has {gpu_count} {gpu_model} GPU(s) free for that period.",
            code="not_available",
        )
    best = offers[0]
    return Quote.objects.create(
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
        expires_at=now + settings.QUOTE_TTL,
    )
