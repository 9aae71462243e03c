"""Reads of the inventory, shared by the admin, the API and the marketplace."""

import logging
import math
import time
from datetime import UTC, date, datetime, timedelta

from django.conf import settings
from django.db.models import Count, IntegerField, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce, TruncDate

from inventory.models import FleetMinute, Gpu, GpuHealth, Node, NodeStatus, Site, ZonePrice

logger = logging.getLogger(__name__)

NODE_STATUSES = list(NodeStatus.values)
# The fleet's size changes by the node, not by the second: counted once a minute a process.
FLEET_COUNT_SECONDS = 60
# The longest interval agents take from an answer (agent/switchyard_agent.py clamps to it).
AGENT_HEARTBEAT_LONGEST_SECONDS = 300
_heartbeat_interval: tuple[float, int] | None = None  # (monotonic expiry, seconds)


def agent_heartbeat_seconds() -> int:
    """How long every site agent waits between heartbeats, as each heartbeat's answer tells
    it: AGENT_HEARTBEAT_SECONDS, lengthened so that the fleet's heartbeats stay within
    AGENT_HEARTBEATS_PER_SECOND (what the web tier is sized for, docs/scaling.md) as nodes
    are added, but never past a third of NODE_OFFLINE_AFTER (a node must miss several
    heartbeats before it is marked offline) nor 300 s (what agents take); past that, the
    fleet outgrows the setting and a warning says so. Nodes not retired are counted, once a
    minute a process."""
    global _heartbeat_interval
    now = time.monotonic()
    if _heartbeat_interval is not None and now < _heartbeat_interval[0]:
        return _heartbeat_interval[1]
    seconds = settings.AGENT_HEARTBEAT_SECONDS
    budget = settings.AGENT_HEARTBEATS_PER_SECOND
    if budget:
        nodes = Node.objects.exclude(status=NodeStatus.RETIRED).count()
        longest = min(
            int(settings.NODE_OFFLINE_AFTER.total_seconds() // 3), AGENT_HEARTBEAT_LONGEST_SECONDS
        )
        wanted = max(seconds, math.ceil(nodes / budget))
        if wanted > longest:
            logger.warning(
                "%d nodes heartbeat every %d s, %.0f a second, more than "
                "AGENT_HEARTBEATS_PER_SECOND=%d: raise NODE_OFFLINE_AFTER_SECONDS (the interval "
                "stays within a third of it) or the budget, with the web tier (docs/scaling.md)",
                nodes, longest, nodes / longest, budget,
            )  # fmt: skip
        seconds = min(wanted, longest)
    _heartbeat_interval = (now + FLEET_COUNT_SECONDS, seconds)
    return seconds


def agent_heartbeat_seconds_clear() -> None:
    """Count the fleet again at the next call (tests; a changed setting)."""
    global _heartbeat_interval
    _heartbeat_interval = None


def site_list_with_capacity() -> QuerySet[Site]:
    """Sites annotated with GPU totals: gpu_total and gpu_available (not failed, on available
    nodes: what search and the API's availability count as healthy, and may sell).

    Each a subquery per site, not a Count over a join: the join grouped every GPU of the
    fleet under every query on this queryset (its count, the admin's filters' choices), 1-2 s
    at 100,000 GPUs; a subquery runs only for the rows shown, and not at all in a count."""
    per_site = Gpu.objects.filter(node__site=OuterRef("pk")).order_by().values("node__site")

    def gpus(queryset: QuerySet) -> Coalesce:
        counted = queryset.annotate(n=Count("pk")).values("n")
        return Coalesce(Subquery(counted, output_field=IntegerField()), 0)

    return Site.objects.annotate(
        gpu_total=gpus(per_site),
        gpu_available=gpus(
            per_site.filter(node__status=NodeStatus.AVAILABLE).exclude(health=GpuHealth.FAILED)
        ),
    )


def site_capacity_summary(*, site: Site) -> list[dict]:
    """GPUs at the site per model: how many sit on nodes in each status, and how many are
    unhealthy. One aggregated query; one row per GPU model, ordered by model slug.

    Each row: {"gpu_model", "gpu_model_name", "total", "unhealthy", <each node status>: n}.
    """
    per_status = {status: Count("id", filter=Q(node__status=status)) for status in NODE_STATUSES}
    rows = (
        Gpu.objects.filter(node__site=site)
        .values("node__gpu_model__slug", "node__gpu_model__name")
        .annotate(
            total=Count("id"),
            unhealthy=Count("id", filter=~Q(health=GpuHealth.OK)),
            **per_status,
        )
        .order_by("node__gpu_model__slug")
    )
    return [
        {
            "gpu_model": row.pop("node__gpu_model__slug"),
            "gpu_model_name": row.pop("node__gpu_model__name"),
            **row,
        }
        for row in rows
    ]


def fleet_gpu_utilisation_by_day(*, first: datetime, days: int) -> dict[date, float]:
    """Mean GPU utilisation (%) of the GPUs that reported, per UTC day from `first`, from the
    fleet's telemetry minutes (FleetMinute: one row a minute). A day without telemetry is
    absent, not 0."""
    rows = (
        FleetMinute.objects.filter(
            minute__gte=first, minute__lt=first + timedelta(days=days), utilization_gpus__gt=0
        )
        .annotate(day=TruncDate("minute", tzinfo=UTC))
        .values("day")
        .annotate(total=Sum("utilization_pct_sum"), readings=Sum("utilization_gpus"))
        .order_by("day")
    )
    return {r["day"]: round(r["total"] / r["readings"], 1) for r in rows}


def zone_prices_between(*, zone, starts_at, ends_at) -> QuerySet:
    """A price zone's intervals overlapping [starts_at, ends_at), in order."""
    return ZonePrice.objects.filter(
        zone=zone, starts_at__lt=ends_at, ends_at__gt=starts_at
    ).order_by("starts_at")
