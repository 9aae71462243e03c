"""Rarely-changing reference rows (GPU models and sites by slug, rate cards, the pricing policy),
kept per process for REFERENCE_TTL_SECONDS so a reservation does not read them every time.

An edit takes effect at once in the process that saved it (a save or delete of any of these
models empties the cache) and within REFERENCE_TTL_SECONDS in every other worker process.
Only what cannot cause harm when a few seconds old is read from here: identities (pk, slug,
region) and prices; node, site and GPU status are always read from the database, under lock,
when GPUs are placed.
"""

import threading
import time
from collections.abc import Callable

from django.db.models.signals import post_delete, post_save

from config.replica import primary_reads
from inventory.models import GpuModel, Site, SiteStatus
from marketplace.models import PricingPolicy, RateCard

__all__ = [
    "REFERENCE_TTL_SECONDS",
    "reference_cache_clear",
    "gpu_model_by_slug",
    "gpu_models_by_id",
    "gpu_models_in_slug_order",
    "site_by_slug",
    "site_regions",
    "sites_by_id",
    "pricing_policy_current",
    "rate_card_for",
    "rate_card_currencies",
]

REFERENCE_TTL_SECONDS = 5.0

_entries: dict[tuple, tuple[float, object]] = {}
_lock = threading.Lock()


def reference_cache_clear(**_kwargs) -> None:
    with _lock:
        _entries.clear()


def _cached(key: tuple, load: Callable[[], object]):
    now = time.monotonic()
    hit = _entries.get(key)
    if hit is not None and hit[0] > now:
        return hit[1]
    # Placement prices from these rows too: never a replica's copy, however far behind it is.
    with primary_reads():
        value = load()
    with _lock:
        _entries[key] = (now + REFERENCE_TTL_SECONDS, value)
    return value


# The tables read here are small (GPU models, sites and rate cards number in the tens or
# hundreds), so each is loaded whole: one miss per table per process every TTL, whichever
# rows the requests in between ask for.


def _gpu_models() -> dict:
    models = sorted(GpuModel.objects.all(), key=lambda m: m.slug)
    return {"slug": {m.slug: m for m in models}, "pk": {m.pk: m for m in models}, "all": models}


def _sites() -> dict:
    sites = list(Site.objects.all())
    return {
        "slug": {s.slug: s for s in sites},
        "pk": {s.pk: s for s in sites},
        "regions": frozenset(s.region for s in sites),
    }


def _rate_cards() -> dict:
    return {(c.gpu_model_id, c.site_id): c for c in RateCard.objects.all()}


def gpu_model_by_slug(slug: str) -> GpuModel | None:
    return _cached(("gpu_models",), _gpu_models)["slug"].get(slug)


def gpu_models_by_id(ids) -> dict[int, GpuModel]:
    """{pk: GpuModel} for the ids that exist."""
    by_pk = _cached(("gpu_models",), _gpu_models)["pk"]
    return {pk: by_pk[pk] for pk in ids if pk in by_pk}


def gpu_models_in_slug_order() -> list[GpuModel]:
    """The whole catalogue of GPU models; the same list object until the cache reloads."""
    return _cached(("gpu_models",), _gpu_models)["all"]


def site_by_slug(slug: str) -> Site | None:
    return _cached(("sites",), _sites)["slug"].get(slug)


def site_regions() -> frozenset[str]:
    """Every region a site is in."""
    return _cached(("sites",), _sites)["regions"]


def sites_by_id(ids) -> dict[int, Site]:
    """{pk: Site} for the ids that exist."""
    by_pk = _cached(("sites",), _sites)["pk"]
    return {pk: by_pk[pk] for pk in ids if pk in by_pk}


def pricing_policy_current() -> PricingPolicy | None:
    """The newest policy is the one in force."""
    return _cached(
        ("policy",), lambda: PricingPolicy.objects.order_by("-created_at", "-id").first()
    )


def rate_card_for(*, site_id: int, gpu_model_id: int) -> RateCard | None:
    """The site's own rate card for the model, else the model's default, else None."""
    cards = _cached(("rate_cards",), _rate_cards)
    return cards.get((gpu_model_id, site_id)) or cards.get((gpu_model_id, None))


def rate_card_currencies() -> frozenset[str]:
    """The currencies something is sold in: those of the rate cards in force (a model's
    default, or a site's own unless the site is retired)."""
    cards = _cached(("rate_cards",), _rate_cards).values()
    sites = _cached(("sites",), _sites)["pk"]
    return frozenset(
        card.currency
        for card in cards
        if card.site_id is None
        or (card.site_id in sites and sites[card.site_id].status != SiteStatus.RETIRED)
    )


for _model in (GpuModel, Site, RateCard, PricingPolicy):
    post_save.connect(reference_cache_clear, sender=_model, dispatch_uid=f"refcache_{_model}")
    post_delete.connect(reference_cache_clear, sender=_model, dispatch_uid=f"refdel_{_model}")
