"""The GPU catalogue shown before any search: each model with its specs, the lowest price per
plan right now, GPUs free now and over the next 7 days, and the sites that have it.

Built from the same availability search the offers come from (so a "from" price is one that
can be reserved at that moment), one search per plan over every model and site.
"""

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.db.models import Count

from inventory.models import Gpu, GpuModel, Node, NodeStatus
from marketplace.models import Term, Tier
from marketplace.selectors.availability import AvailabilityQuery, availability_search
from marketplace.services.pricing import TERM_LENGTHS

__all__ = ["CatalogueEntry", "CATALOGUE_PLANS", "gpu_catalogue"]


def _sold_plans() -> list[tuple[str, str, str, timedelta]]:
    """Every tier and term the product sells, from their definitions (a new term is in the
    catalogue without touching it): (plan key as the search form names it, tier, term, how
    long the priced window is: an hour, or the whole term)."""
    hourly = [(t.value, t, Term.NONE, timedelta(hours=1)) for t in Tier if t != Tier.RESERVED]
    terms = [(f"reserved_{t}", Tier.RESERVED, t, TERM_LENGTHS[t]) for t in TERM_LENGTHS]
    return hourly + terms


CATALOGUE_PLANS = _sold_plans()
WEEK = timedelta(days=7)


@dataclass
class CatalogueEntry:
    gpu_model: GpuModel
    from_price: dict[str, Decimal] = field(default_factory=dict)  # plan key → per GPU-hour
    currency: str = ""
    free_now: int = 0
    free_week: int = 0  # free for the whole of the next 7 days
    sites: list[str] = field(default_factory=list)  # sites with this model in service
    installed: int = 0


def gpu_catalogue(*, now: datetime, currency: str | None = None) -> list[CatalogueEntry]:
    """With `currency`, prices and free GPUs of the offers priced in it only (what an
    organisation billed in it can book)."""
    start = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    entries = {m.pk: CatalogueEntry(gpu_model=m) for m in GpuModel.objects.all()}
    counts = (
        Gpu.objects.exclude(node__status=NodeStatus.RETIRED)
        .order_by()
        .values("node__gpu_model_id")
        .annotate(n=Count("id"))
    )
    for row in counts:
        if row["node__gpu_model_id"] in entries:
            entries[row["node__gpu_model_id"]].installed = row["n"]
    site_rows = (
        Node.objects.exclude(status=NodeStatus.RETIRED)
        .order_by()
        .values_list("gpu_model_id", "site__name")
        .distinct()
    )
    for model_id, site_name in site_rows:
        if model_id in entries:
            entries[model_id].sites.append(site_name)
    for entry in entries.values():
        entry.sites.sort()

    for key, tier, term, length in CATALOGUE_PLANS:
        query = AvailabilityQuery(
            gpu_count=1,
            starts_at=start,
            ends_at=start + length,
            tier=tier,
            term=term,
            currency=currency,
        )
        for offer in availability_search(query):
            entry = entries[offer.gpu_model.pk]
            price = entry.from_price.get(key)
            if price is None or offer.price_per_gpu_hour < price:
                entry.from_price[key] = offer.price_per_gpu_hour
                entry.currency = offer.currency
            if key == "on_demand":
                entry.free_now += offer.free_gpus
    week = AvailabilityQuery(
        gpu_count=1, starts_at=start, ends_at=start + WEEK, tier=Tier.ON_DEMAND, currency=currency
    )
    for offer in availability_search(week):
        entries[offer.gpu_model.pk].free_week += offer.free_gpus
    return [e for e in entries.values() if e.installed]
