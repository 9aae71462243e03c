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

from django.db.models import Q
from django.db.models.signals import post_delete, post_save

from inventory.models import GpuModel, Site
from marketplace.models import PricingPolicy, RateCard

__all__ = [
    "REFERENCE_TTL_SECONDS",
    "reference_cache_clear",
    "gpu_model_by_slug",
    "site_by_slug",
    "pricing_policy_current",
    "rate_card_for",
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
    value = load()
    with _lock:
        _entries[key] = (now + REFERENCE_TTL_SECONDS, value)
    return value


def gpu_model_by_slug(slug: str) -> GpuModel | None:
    return _cached(("gpu_model", slug), lambda: GpuModel.objects.filter(slug=slug).first())


def site_by_slug(slug: str) -> Site | None:
    return _cached(("site", slug), lambda: Site.objects.filter(slug=slug).first())


def pricing_policy_current() -> PricingPolicy | None:
    """The newest policy is the one in force."""
    return _cached(
        ("policy",), lambda: PricingPolicy.objects.order_by("-created_at", "-id").first()
    )


def rate_card_for(*, site_id: int, gpu_model_id: int) -> RateCard | None:
    """The site's own rate card for the model, else the model's default, else None."""

    def load() -> RateCard | None:
        cards = {
            c.site_id: c
            for c in RateCard.objects.filter(
                Q(site_id=site_id) | Q(site__isnull=True), gpu_model_id=gpu_model_id
            )
        }
        return cards.get(site_id) or cards.get(None)

    return _cached(("rate_card", site_id, gpu_model_id), load)


for _model in (GpuModel, Site, RateCard, PricingPolicy):
    post_save.connect(reference_cache_clear, sender=_model, dispatch_uid=f"refcache_{_model}")
    post_delete.connect(reference_cache_clear, sender=_model, dispatch_uid=f"refdel_{_model}")
