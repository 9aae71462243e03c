"""Availability: which GPUs can be sold for a period, and at what price.

Exact by construction: a GPU counts as free for [starts_at, ends_at) only if its node is
`available`, its site is `active`, the GPU itself is not `failed`, no maintenance window of the
node overlaps the period, and no live allocation of the GPU overlaps it. The allocation service
uses the same SQL (under node locks), so what is listed here can be reserved at that moment.

Placement rule shared with marketplace.services.allocation: a request no larger than the
biggest node of that model at a site goes on ONE node (best fit); a larger request takes whole
free nodes at one site (a cluster), never GPUs spread over partly used nodes or several sites.
"""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import connection

from config.errors import ValidationFailed
from inventory.models import GpuModel, Site
from marketplace.models import RateCard
from marketplace.services.pricing import (
    PriceBreakdown,
    current_policy,
    price_quote,
    pricing_inputs_from,
    validate_tier_term,
)

__all__ = [
    "NodeFit",
    "Offer",
    "SiteModelAvailability",
    "availability_search",
    "site_availability",
    "node_free_capacity",
    "NodeCapacity",
]

# How many best-fit nodes an offer lists for a single-node request.
_OFFER_NODE_LIMIT = 10


@dataclass(frozen=True)
class NodeFit:
    node_id: int
    free_gpus: int


@dataclass(frozen=True)
class Offer:
    site: Site
    gpu_model: GpuModel
    gpu_count: int
    placement: str  # "single_node" or "cluster"
    node_count: int  # nodes the reservation would use
    nodes: list[NodeFit]  # single_node: best-fit candidates first; cluster: the whole nodes used
    fitting_node_count: int  # single_node: nodes that fit; cluster: whole free nodes at the site
    free_gpus: int  # free GPUs of this model at this site for the period
    currency: str
    price_per_gpu_hour: Decimal
    total: Decimal
    breakdown: PriceBreakdown


@dataclass(frozen=True)
class SiteModelAvailability:
    gpu_model: GpuModel
    nodes: int
    healthy_gpus: int
    free_gpus: int
    largest_free_on_one_node: int
    whole_free_nodes: int


@dataclass(frozen=True)
class NodeCapacity:
    node_id: int
    gpus: int
    free: int


# The candidate nodes and, per node, its GPUs, healthy GPUs and GPUs free for the window.
# Two ways to find the free GPUs, both a NOT EXISTS over live allocations in effect:
# - wide searches (no model, no site): one scan of the live allocations overlapping the window through the
#   period-first partial GiST index (allocation_live_period_idx), hashed and anti-joined to the
#   GPUs; its cost follows the allocations in the window, never the 1M rows of history.
# - one model or one site (placement, most searches): a probe per node into allocation_live_node_period_idx,
#   whose cost follows the candidate node count instead of the window's allocations.
_CANDIDATE_NODES_SQL = """
WITH win AS (SELECT tstzrange(%(starts_at)s, %(ends_at)s, '[)') AS r),
node_c AS (
    SELECT n.id, n.site_id, n.gpu_model_id
    FROM inventory_node n
    JOIN inventory_site s ON s.id = n.site_id
    JOIN inventory_gpumodel m ON m.id = n.gpu_model_id
    WHERE n.status = 'available' AND s.status = 'active' {filters}
      AND NOT EXISTS (
          SELECT 1 FROM inventory_maintenancewindow w, win
          WHERE w.node_id = n.id AND w.period && win.r)
),
{nodes_cte}
"""

_NODES_BY_HASH = """
busy AS (
    SELECT DISTINCT a.gpu_id
    FROM marketplace_allocation a, win
    WHERE a.is_live AND a.period && win.r
),
nodes AS (
    SELECT c.id, c.site_id, c.gpu_model_id,
           count(*) AS gpus,
           count(*) FILTER (WHERE g.health <> 'failed') AS healthy,
           count(*) FILTER (WHERE g.health <> 'failed' AND b.gpu_id IS NULL) AS free
    FROM node_c c
    JOIN inventory_gpu g ON g.node_id = c.id
    LEFT JOIN busy b ON b.gpu_id = g.id
    GROUP BY c.id, c.site_id, c.gpu_model_id
)"""

_NODES_BY_PROBE = """
nodes AS MATERIALIZED (
    SELECT c.id, c.site_id, c.gpu_model_id, gc.gpus, gc.healthy,
           gc.healthy - (
               SELECT count(DISTINCT a.gpu_id)
               FROM marketplace_allocation a, win
               WHERE a.is_live AND a.node_id = c.id AND a.period && win.r
                 AND a.gpu_id <> ALL(gc.failed)) AS free
    FROM node_c c
    CROSS JOIN LATERAL (
        SELECT count(*) AS gpus,
               count(*) FILTER (WHERE g.health <> 'failed') AS healthy,
               coalesce(array_agg(g.id) FILTER (WHERE g.health = 'failed'), '{}') AS failed
        FROM inventory_gpu g WHERE g.node_id = c.id) gc
    WHERE gc.gpus > 0
)"""


def _sql(tail: str, *, filters: str, probe: bool) -> str:
    nodes_cte = _NODES_BY_PROBE if probe else _NODES_BY_HASH
    return _CANDIDATE_NODES_SQL.format(filters=filters, nodes_cte=nodes_cte) + tail


_SEARCH_TAIL = """,
ranked AS (
    SELECT nodes.*,
           sum(gpus) FILTER (WHERE free = gpus) OVER (
               PARTITION BY site_id, gpu_model_id ORDER BY gpus DESC, id
               ROWS UNBOUNDED PRECEDING) AS whole_running
    FROM nodes
)
SELECT site_id, gpu_model_id,
       max(gpus) AS node_size,
       sum(healthy) AS healthy,
       sum(free) AS free,
       count(*) FILTER (WHERE free >= %(gpu_count)s) AS fitting_nodes,
       (array_agg(ARRAY[id, free] ORDER BY free, id)
            FILTER (WHERE free >= %(gpu_count)s))[1:%(node_limit)s] AS best_fit,
       count(*) FILTER (WHERE free = gpus) AS whole_free_nodes,
       coalesce(sum(gpus) FILTER (WHERE free = gpus), 0) AS whole_free_gpus,
       array_agg(ARRAY[id, gpus] ORDER BY gpus DESC, id)
            FILTER (WHERE free = gpus AND whole_running - gpus < %(gpu_count)s) AS cluster_nodes
FROM ranked
GROUP BY site_id, gpu_model_id
"""

_SITE_TAIL = """
SELECT gpu_model_id, count(*), sum(healthy), sum(free), max(free),
       count(*) FILTER (WHERE free = gpus)
FROM nodes GROUP BY gpu_model_id
"""

_NODES_TAIL = "SELECT id, gpus, free FROM nodes"


def _filters(
    *,
    gpu_model: str | None = None,
    gpu_model_id: int | None = None,
    min_gpu_memory_gb: int | None = None,
    region: str | None = None,
    site: str | None = None,
    site_id: int | None = None,
) -> tuple[str, dict]:
    clauses, params = [], {}
    if gpu_model is not None:
        clauses.append("m.slug = %(gpu_model)s")
        params["gpu_model"] = gpu_model
    if gpu_model_id is not None:
        clauses.append("n.gpu_model_id = %(gpu_model_id)s")
        params["gpu_model_id"] = gpu_model_id
    if min_gpu_memory_gb is not None:
        clauses.append("m.memory_gb >= %(min_gpu_memory_gb)s")
        params["min_gpu_memory_gb"] = min_gpu_memory_gb
    if region is not None:
        clauses.append("s.region = %(region)s")
        params["region"] = region
    if site is not None:
        clauses.append("s.slug = %(site)s")
        params["site"] = site
    if site_id is not None:
        clauses.append("n.site_id = %(site_id)s")
        params["site_id"] = site_id
    return "".join(f" AND {c}" for c in clauses), params


def _validate_window(*, starts_at: datetime, ends_at: datetime) -> None:
    if starts_at.tzinfo is None or ends_at.tzinfo is None:
        raise ValidationFailed("Times must carry a time zone.", field="starts_at")
    if ends_at <= starts_at:
        raise ValidationFailed("ends_at must be after starts_at.", field="ends_at")


def node_free_capacity(
    *, site_id: int, gpu_model_id: int, starts_at: datetime, ends_at: datetime
) -> list[NodeCapacity]:
    """Per node of one model at one site: GPUs, and GPUs free for the whole window."""
    filters, params = _filters(site_id=site_id, gpu_model_id=gpu_model_id)
    with connection.cursor() as cur:
        cur.execute(
            _sql(_NODES_TAIL, filters=filters, probe=True),
            {**params, "starts_at": starts_at, "ends_at": ends_at},
        )
        return [NodeCapacity(node_id=r[0], gpus=r[1], free=r[2]) for r in cur.fetchall()]


def availability_search(
    *,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
    tier: str,
    term: str = "none",
    gpu_model: str | None = None,
    min_gpu_memory_gb: int | None = None,
    region: str | None = None,
    site: str | None = None,
    max_price_per_gpu_hour: Decimal | None = None,
) -> list[Offer]:
    """Offers that can be reserved right now, cheapest first (one per site and GPU model)."""
    if gpu_count < 1:
        raise ValidationFailed("gpu_count must be at least 1.", field="gpu_count")
    _validate_window(starts_at=starts_at, ends_at=ends_at)
    validate_tier_term(tier=tier, term=term, starts_at=starts_at, ends_at=ends_at)

    filters, params = _filters(
        gpu_model=gpu_model, min_gpu_memory_gb=min_gpu_memory_gb, region=region, site=site
    )
    params.update(
        starts_at=starts_at, ends_at=ends_at, gpu_count=gpu_count, node_limit=_OFFER_NODE_LIMIT
    )
    with connection.cursor() as cur:
        # One model or one site bounds the candidates: probing per node is cheaper than
        # hashing every allocation in the window (measured with 1M allocations, bench/).
        narrow = site is not None or gpu_model is not None
        cur.execute(_sql(_SEARCH_TAIL, filters=filters, probe=narrow), params)
        rows = cur.fetchall()

    fits = []
    for (site_id, model_id, node_size, healthy, free, fitting, best_fit, whole_nodes,
         whole_gpus, cluster_nodes) in rows:  # fmt: skip
        if gpu_count <= node_size:
            if not fitting:
                continue
            nodes = [NodeFit(node_id=i, free_gpus=f) for i, f in best_fit]
            fits.append((site_id, model_id, healthy, free, "single_node", 1, nodes, fitting))
        else:
            if whole_gpus < gpu_count:
                continue
            nodes = [NodeFit(node_id=i, free_gpus=g) for i, g in cluster_nodes]
            fits.append(
                (site_id, model_id, healthy, free, "cluster", len(nodes), nodes, whole_nodes)
            )
    if not fits:
        return []

    model_ids = {f[1] for f in fits}
    sites = Site.objects.in_bulk({f[0] for f in fits})
    models = GpuModel.objects.in_bulk(model_ids)
    cards = {}
    for card in RateCard.objects.filter(gpu_model_id__in=model_ids):
        cards[(card.gpu_model_id, card.site_id)] = card
    policy = current_policy()

    offers = []
    for site_id, model_id, healthy, free, placement, node_count, nodes, fitting in fits:
        card = cards.get((model_id, site_id)) or cards.get((model_id, None))
        if card is None:
            continue  # no rate card: not for sale
        inputs = pricing_inputs_from(card=card, site_slug=sites[site_id].slug, policy=policy)
        breakdown = price_quote(
            rate=inputs.rate,
            tier=tier,
            term=term,
            gpu_count=gpu_count,
            starts_at=starts_at,
            ends_at=ends_at,
            utilisation=Decimal(healthy - free) / Decimal(healthy),
            bounds=inputs.bounds,
        )
        if (
            max_price_per_gpu_hour is not None
            and breakdown.price_per_gpu_hour > max_price_per_gpu_hour
        ):
            continue
        offers.append(
            Offer(
                site=sites[site_id],
                gpu_model=models[model_id],
                gpu_count=gpu_count,
                placement=placement,
                node_count=node_count,
                nodes=nodes,
                fitting_node_count=fitting,
                free_gpus=free,
                currency=breakdown.currency,
                price_per_gpu_hour=breakdown.price_per_gpu_hour,
                total=breakdown.total,
                breakdown=breakdown,
            )
        )
    offers.sort(key=lambda o: (o.price_per_gpu_hour, o.total, o.site.slug, o.gpu_model.slug))
    return offers


def site_availability(
    *, site: Site, starts_at: datetime, ends_at: datetime
) -> list[SiteModelAvailability]:
    """Free GPUs by model at one site for the period (empty unless the site is active)."""
    _validate_window(starts_at=starts_at, ends_at=ends_at)
    filters, params = _filters(site_id=site.pk)
    with connection.cursor() as cur:
        cur.execute(
            _sql(_SITE_TAIL, filters=filters, probe=True),
            {**params, "starts_at": starts_at, "ends_at": ends_at},
        )
        rows = cur.fetchall()
    models = GpuModel.objects.in_bulk([r[0] for r in rows])
    result = [
        SiteModelAvailability(
            gpu_model=models[model_id],
            nodes=nodes,
            healthy_gpus=healthy,
            free_gpus=free,
            largest_free_on_one_node=largest,
            whole_free_nodes=whole,
        )
        for model_id, nodes, healthy, free, largest, whole in rows
    ]
    result.sort(key=lambda a: a.gpu_model.slug)
    return result
