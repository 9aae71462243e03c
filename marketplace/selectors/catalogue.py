"""Public catalogue reads for the API: GPU models, sites and their capacity, quotes by org."""

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, Greatest, Least
from django.utils import timezone

from config.errors import Gone, NotFound
from inventory.models import GpuModel, Node, NodeStatus, Site, SiteStatus
from marketplace import ids
from marketplace.models import Curtailment, Organization, Quote

__all__ = [
    "gpu_model_list",
    "site_list_public",
    "site_get_public",
    "site_capacity_summaries",
    "quote_get_for_org",
    "CURTAILMENT_HISTORY_DAYS",
    "CurtailmentHistory",
    "site_curtailment_history",
]

CURTAILMENT_HISTORY_DAYS = 90


@dataclass(frozen=True)
class CurtailmentHistory:
    """How often and how long a site shed load for its grid over the last 90 days."""

    events: int = 0
    hours: Decimal = Decimal("0.0")

    def as_dict(self) -> dict:
        return {"days": CURTAILMENT_HISTORY_DAYS, "events": self.events, "hours": str(self.hours)}


def site_curtailment_history(*, site_ids, now: datetime) -> dict[int, CurtailmentHistory]:
    """{site id: CurtailmentHistory} over [now − 90 days, now), one query for all the sites.

    A curtailment counts from its start (or the period's) to the first of its end, when it
    was called off or ended, and now; one called off before it started does not count. Sites
    without any are absent (the default history is none)."""
    since = now - timedelta(days=CURTAILMENT_HISTORY_DAYS)
    moment = Value(now)
    rows = (
        Curtailment.objects.filter(site_id__in=set(site_ids), shed_at__lt=now)
        .annotate(
            span_start=Greatest("shed_at", Value(since)),
            span_end=Least(Coalesce("until", moment), Coalesce("called_off_at", moment), moment),
        )
        .filter(span_end__gt=F("span_start"))
        .values("site_id")
        .annotate(
            events=Count("id"),
            duration=Sum(
                ExpressionWrapper(F("span_end") - F("span_start"), output_field=DurationField())
            ),
        )
    )
    return {
        row["site_id"]: CurtailmentHistory(
            events=row["events"],
            hours=(Decimal(row["duration"].total_seconds()) / 3600).quantize(
                Decimal("0.1"), rounding=ROUND_HALF_UP
            ),
        )
        for row in rows
    }


def gpu_model_list() -> QuerySet[GpuModel]:
    return GpuModel.objects.all()


def site_list_public() -> QuerySet[Site]:
    """Every site a customer may hear about: all but retired ones (with their price zone)."""
    return Site.objects.exclude(status=SiteStatus.RETIRED).select_related("price_zone")


def site_get_public(*, slug: str) -> Site:
    site = site_list_public().filter(slug=slug).first()
    if site is None:
        raise NotFound(f"No site {slug!r}.", code="site_not_found", field="slug")
    return site


def site_capacity_summaries(*, site_ids: list[int]) -> dict[int, dict]:
    """Installed capacity per site (nodes not retired), by GPU model, in one query."""
    rows = (
        Node.objects.filter(site_id__in=site_ids)
        .exclude(status=NodeStatus.RETIRED)
        .values("site_id", "gpu_model__slug", "gpu_model__name")
        .annotate(
            nodes=Count("id", distinct=True),
            gpus=Count("gpus"),
            available_nodes=Count("id", distinct=True, filter=Q(status=NodeStatus.AVAILABLE)),
        )
        .order_by("site_id", "gpu_model__slug")
    )
    summaries: dict[int, dict] = defaultdict(lambda: {"nodes": 0, "gpus": 0, "gpu_models": []})
    for row in rows:
        summary = summaries[row["site_id"]]
        summary["nodes"] += row["nodes"]
        summary["gpus"] += row["gpus"]
        summary["gpu_models"].append(
            {
                "gpu_model": row["gpu_model__slug"],
                "gpu_model_name": row["gpu_model__name"],
                "nodes": row["nodes"],
                "gpus": row["gpus"],
                "available_nodes": row["available_nodes"],
            }
        )
    return {site_id: summaries[site_id] for site_id in site_ids}


def quote_get_for_org(*, organization: Organization, public_id: str) -> Quote:
    """One of the organisation's quotes; another organisation's is simply not found."""
    quote = (
        Quote.objects.filter(organization=organization, public_id=public_id)
        .select_related("site", "gpu_model", "reservation")
        .first()
    )
    if quote is None:
        # An id of ours whose quote has expired: retention deletes an unbooked quote a day after,
        # and the holder is told why it is gone. The answer rests on the id alone (never on
        # another organisation's rows), so it tells nothing an id's holder does not know.
        expired_at = ids.quote_id_expires_at(public_id)
        if expired_at is not None and expired_at <= timezone.now():
            raise Gone(
                f"Quote {public_id!r} expired at {expired_at.isoformat()}; ask for a new one.",
                code="quote_expired",
                field="quote",
            )
        raise NotFound(f"No quote {public_id!r}.", code="quote_not_found", field="quote")
    return quote
