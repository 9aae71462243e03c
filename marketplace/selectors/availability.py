"""Availability: which GPUs can be sold for a period, and at what price.

Exact by construction: a GPU counts as free for [starts_at, ends_at) only if its node is
`available`, its site is `active`, the GPU itself is not `failed`, no maintenance window of the
node overlaps the period, no live allocation of the GPU overlaps it, and no grid curtailment of
the site overlaps it unless the curtailment shed more than asked by at least the request's
draw (CURTAILMENT_BLOCKS, docs/grid.md). The allocation service
uses the same SQL (under node locks), so what is listed here can be reserved at that moment.

Placement rule shared with marketplace.services.allocation: a request no larger than the
biggest node of that model at a site goes on ONE node (best fit); a larger request takes whole
free nodes at one site (a cluster), never GPUs spread over partly used nodes or several sites.
"""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db.models import Q
from django.utils import timezone

from config.errors import ValidationFailed
from config.replica import read_connection
from inventory.models import GpuModel, Node, Site
from marketplace.models import Curtailment, RateCard, ResaleListing, Tier
from marketplace.rules import NodeCapacity, validate_period_length, validate_request_period
from marketplace.selectors.catalogue import CurtailmentHistory, site_curtailment_history
from marketplace.selectors.reference import gpu_models_by_id, rate_card_for, sites_by_id
from marketplace.selectors.resale import resale_breakdown, resale_offer_rows
from marketplace.services.energy import EnergyEstimate, energy_for
from marketplace.services.pricing import (
    PriceBreakdown,
    current_policy,
    power_series_for,
    price_quote,
    pricing_inputs_from,
    validate_tier_term,
)

__all__ = [
    "AvailabilityQuery",
    "NodeFit",
    "Offer",
    "SiteModelAvailability",
    "availability_search",
    "site_availability",
    "node_free_capacity",
    "NodeCapacity",
    "site_model_offer",
    "curtailment_overlapping",
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
    # The least reliable of the offered nodes over 30 days (0-1); None before it is computed.
    reliability: Decimal | None = None
    # The grid behind the offer (searches fill it): the site's price zone, if any, and how
    # often it was curtailed over the last 90 days. The expected energy price over the window
    # is the breakdown's window_energy_price_per_mwh.
    price_zone: str | None = None
    curtailments: CurtailmentHistory | None = None
    # Resold time: the listing it comes from (booked with reservation_create(listing=…)).
    listing: ResaleListing | None = None

    @property
    def reliability_pct(self) -> Decimal | None:
        """The reliability in per cent, one decimal place (for pages)."""
        if self.reliability is None:
            return None
        return (self.reliability * 100).quantize(Decimal("0.1"))

    def energy(self) -> EnergyEstimate:
        """The estimated energy and emissions of the offered GPU time."""
        seconds = round(self.breakdown.hours * 3600)  # hours are exact to the second
        return energy_for(
            site=self.site, gpu_model=self.gpu_model, gpu_count=self.gpu_count, seconds=seconds
        )


@dataclass(frozen=True)
class SiteModelAvailability:
    gpu_model: GpuModel
    nodes: int
    healthy_gpus: int
    free_gpus: int
    largest_free_on_one_node: int
    whole_free_nodes: int


@dataclass(frozen=True, kw_only=True)
class AvailabilityQuery:
    """What a search asks for: GPUs for a period at a tier, with the filters that choose sites
    and nodes. Built once by the caller (the API, the portal, a quote, a booking); the search's
    phases read it instead of a dozen arguments each.

    The grid filters select sites: renewable share at least (0-1), grid carbon intensity at
    most (gCO2e/kWh; a site without the figure does not qualify), PUE at most.

    `currency`: only offers priced in it (an organisation books in the currency it is billed
    in; `max_price_per_gpu_hour` is in each offer's currency). Without it offers in different
    currencies are listed side by side, sorted by their figures alone.

    `include_resale`: also resold time (one offer per listing that fits, `listing` set), which
    is booked by naming the listing; quotes and direct bookings leave it out.

    `with_history`: each offer's site curtailment history (for display; a booking or a quote
    that only takes the offer's price and placement leaves it out, one query less).
    """

    gpu_count: int
    starts_at: datetime
    ends_at: datetime
    tier: str
    term: str = "none"
    gpu_model: str | None = None
    min_gpu_memory_gb: int | None = None
    region: str | None = None
    site: str | None = None
    max_price_per_gpu_hour: Decimal | None = None
    min_reliability: Decimal | None = None
    min_renewable_share: Decimal | None = None
    max_grid_carbon_g_per_kwh: int | None = None
    max_pue: Decimal | None = None
    currency: str | None = None
    include_resale: bool = False
    with_history: bool = True

    def validate(self, *, as_booked: bool = True) -> None:
        """A window and tier that can be priced; with `as_booked`, also a period a reservation
        could have (not in the past, too long or too far ahead), refused with the same error
        reserving it would get rather than answered with offers nobody can book."""
        if self.gpu_count < 1:
            raise ValidationFailed("gpu_count must be at least 1.", field="gpu_count")
        _validate_window(starts_at=self.starts_at, ends_at=self.ends_at)
        if as_booked:
            validate_request_period(
                starts_at=self.starts_at, ends_at=self.ends_at, gpu_count=self.gpu_count
            )
        validate_tier_term(
            tier=self.tier, term=self.term, starts_at=self.starts_at, ends_at=self.ends_at
        )


# The candidate nodes and, per node, its GPUs, healthy GPUs and GPUs free for the window.
# Free GPUs are read from each GPU's `busy` multirange (the union of its live allocation
# periods, kept by triggers: see inventory.models.Gpu) against the window, so the cost follows
# the candidate nodes' GPUs whatever the window's length or how booked it is (the allocation
# service re-reads the allocations themselves under its node locks). The GPUs are read per
# node (a lateral probe of inventory_gpu's node index): joined as a set, the planner prices the
# index by the table's physical order, and once updates have scattered the rows it scans all
# 100,000 GPUs for one site's 1,400 (14 ms against 1.7 ms).
_CANDIDATE_NODES_SQL = """
WITH node_c AS (
    SELECT n.id, n.site_id, n.gpu_model_id
    FROM inventory_node n
    JOIN inventory_site s ON s.id = n.site_id
    JOIN inventory_gpumodel m ON m.id = n.gpu_model_id
    WHERE n.status = 'available' AND s.status = 'active' {filters}
      AND NOT EXISTS (
          SELECT 1 FROM inventory_maintenancewindow w
          WHERE w.node_id = n.id AND w.period && {window})
      AND NOT {curtailed}
),
nodes AS MATERIALIZED (
    SELECT c.id, c.site_id, c.gpu_model_id, gc.gpus, gc.healthy, gc.free
    FROM node_c c
    CROSS JOIN LATERAL (
        SELECT count(*) AS gpus,
               count(*) FILTER (WHERE g.health <> 'failed') AS healthy,
               count(*) FILTER (WHERE g.health <> 'failed' AND NOT (g.busy && {window})) AS free
        FROM inventory_gpu g WHERE g.node_id = c.id) gc
    WHERE gc.gpus > 0
)"""

# The window is written out where it is used (not a CTE), so the planner sees the range.
_WINDOW = "tstzrange(%(starts_at)s, %(ends_at)s, '[)')"

# A grid curtailment of site `s` (in effect: not called off) whose window overlaps {window}
# and whose unsold over-shed over that overlap (headroom_kw less the most sold at once there,
# marketplace_curtailment_sold_kw) is less than the draw of {gpus} GPUs of model `m` at the
# site's PUE, or that overlap begins before its victims' notice ends: that capacity is not
# sold (placement takes the headroom under the curtailment's row lock,
# marketplace.services.allocation.curtailment_headroom_take).
CURTAILMENT_BLOCKS = """EXISTS (
          SELECT 1 FROM marketplace_curtailment c
          WHERE c.site_id = s.id AND c.called_off_at IS NULL
            AND tstzrange(c.shed_at, c.until, '[)') && {window}
            AND (c.headroom_kw - marketplace_curtailment_sold_kw(
                    c.id, greatest(c.shed_at, lower({window})),
                    least(coalesce(c.until, 'infinity'), upper({window})))
                < {gpus} * m.tdp_watts * s.pue / 1000.0
                 OR (c.preempt_at > c.shed_at
                     AND tstzrange(c.shed_at, c.preempt_at, '[)') && {window})))"""


def _sql(tail: str, *, filters: str) -> str:
    curtailed = CURTAILMENT_BLOCKS.format(window=_WINDOW, gpus="%(curtail_gpus)s")
    return _CANDIDATE_NODES_SQL.format(filters=filters, window=_WINDOW, curtailed=curtailed) + tail


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

_NODES_TAIL = "SELECT id, gpus, free, healthy FROM nodes"


def _filters(
    *,
    gpu_model: str | None = None,
    gpu_model_id: int | None = None,
    min_gpu_memory_gb: int | None = None,
    region: str | None = None,
    site: str | None = None,
    site_id: int | None = None,
    min_reliability: Decimal | None = None,
    min_renewable_share: Decimal | None = None,
    max_grid_carbon_g_per_kwh: int | None = None,
    max_pue: Decimal | None = None,
) -> tuple[str, dict]:
    clauses, params = [], {}
    if min_renewable_share is not None:
        clauses.append("s.renewable_share >= %(min_renewable_share)s")
        params["min_renewable_share"] = min_renewable_share
    if max_grid_carbon_g_per_kwh is not None:
        # A site whose grid intensity is unknown does not qualify.
        clauses.append("s.grid_carbon_g_per_kwh <= %(max_grid_carbon)s")
        params["max_grid_carbon"] = max_grid_carbon_g_per_kwh
    if max_pue is not None:
        clauses.append("s.pue <= %(max_pue)s")
        params["max_pue"] = max_pue
    if min_reliability is not None:
        # A node without a figure yet (computed hourly) does not qualify.
        clauses.append("n.reliability_30d >= %(min_reliability)s")
        params["min_reliability"] = min_reliability
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
    validate_period_length(starts_at=starts_at, ends_at=ends_at)


def node_free_capacity(
    *,
    site_id: int,
    gpu_model_id: int,
    starts_at: datetime,
    ends_at: datetime,
    min_reliability: Decimal | None = None,
    gpu_count: int = 1,
) -> list[NodeCapacity]:
    """Per node of one model at one site (at or above the reliability floor, if any): GPUs,
    and GPUs free for the whole window (none where a grid curtailment leaves no room for
    `gpu_count` GPUs' draw; 0 for a move, which adds none)."""
    filters, params = _filters(
        site_id=site_id, gpu_model_id=gpu_model_id, min_reliability=min_reliability
    )
    with read_connection().cursor() as cur:
        cur.execute(
            _sql(_NODES_TAIL, filters=filters),
            {**params, "starts_at": starts_at, "ends_at": ends_at, "curtail_gpus": gpu_count},
        )
        return list(map(NodeCapacity._make, cur.fetchall()))  # id, gpus, free, healthy


def _price(
    *,
    query: AvailabilityQuery,
    card: RateCard,
    site: Site,
    gpu_model: GpuModel,
    series: dict,
    power_prices: dict,
    policy,
    healthy: int,
    free: int,
) -> PriceBreakdown:
    """The offer's price: the card and policy, with the utilisation of the model at the site
    (busy over healthy GPUs for the window) for the multiplier, and the site's zone prices
    (`series`: every zone of the search, read in one query) for the energy price and floor."""
    inputs = pricing_inputs_from(
        card=card,
        site=site,
        policy=policy,
        gpu_model=gpu_model,
        series=series.get(site.price_zone_id),
        power_prices=power_prices,
    )
    return price_quote(
        rate=inputs.rate,
        tier=query.tier,
        term=query.term,
        gpu_count=query.gpu_count,
        starts_at=query.starts_at,
        ends_at=query.ends_at,
        utilisation=Decimal(healthy - free) / Decimal(healthy),
        bounds=inputs.bounds,
        power=inputs.power,
    )


def availability_search(query: AvailabilityQuery) -> list[Offer]:
    """Offers that can be reserved right now, cheapest first (one per site and GPU model, and
    with `query.include_resale` one per resale listing that fits).

    In phases: the query is checked; one statement reads, per site and model, the candidate
    nodes' free GPUs; resold time is read; the sites where the request fits are kept, priced
    into offers (after one read of what pricing and the offers show), and sorted.
    """
    query.validate()
    rows = _candidate_rows(query)
    resale = _resale_offers(query) if query.include_resale else []
    fits = _fits(query.gpu_count, rows)
    if not fits:
        return _cheapest_first(resale)
    return _cheapest_first(_offers_priced(query, fits, _offer_context(query, fits)) + resale)


def _candidate_rows(query: AvailabilityQuery) -> list[tuple]:
    """Per site and model with candidate nodes (_SEARCH_TAIL, one statement): node size,
    healthy and free GPUs, the nodes that fit, the best-fit nodes, the whole free nodes."""
    filters, params = _filters(
        gpu_model=query.gpu_model,
        min_gpu_memory_gb=query.min_gpu_memory_gb,
        region=query.region,
        site=query.site,
        min_reliability=query.min_reliability,
        min_renewable_share=query.min_renewable_share,
        max_grid_carbon_g_per_kwh=query.max_grid_carbon_g_per_kwh,
        max_pue=query.max_pue,
    )
    params.update(
        starts_at=query.starts_at,
        ends_at=query.ends_at,
        gpu_count=query.gpu_count,
        curtail_gpus=query.gpu_count,
        node_limit=_OFFER_NODE_LIMIT,
    )
    with read_connection().cursor() as cur:
        cur.execute(_sql(_SEARCH_TAIL, filters=filters), params)
        return cur.fetchall()


def _fits(gpu_count: int, rows: list[tuple]) -> list[tuple]:
    """The rows where the request fits, with its placement: on one node (best fit) when it is
    no larger than the site's biggest node of the model, else on whole free nodes (a cluster).
    Each fit is (site_id, model_id, healthy, free, placement, node_count, nodes, fitting)."""
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
    return fits


@dataclass(frozen=True)
class _OfferContext:
    """What pricing the fits and showing their offers reads, once per search."""

    sites: dict
    models: dict
    policy: object
    series: dict
    curtailments: dict
    reliability: dict


def _offer_context(query: AvailabilityQuery, fits: list[tuple]) -> _OfferContext:
    """The fits' sites and models, the pricing policy, every zone's prices for the window,
    the sites' curtailment history (when the query shows it) and the offered nodes'
    reliability."""
    sites = sites_by_id({f[0] for f in fits})
    models = gpu_models_by_id({f[1] for f in fits})
    policy = current_policy()
    series = power_series_for(
        sites.values(),
        starts_at=query.starts_at,
        ends_at=query.ends_at,
        tier=query.tier,
        policy=policy,
    )
    curtailments = (
        site_curtailment_history(site_ids=sites, now=timezone.now()) if query.with_history else {}
    )
    reliability = dict(
        Node.objects.filter(pk__in={n.node_id for f in fits for n in f[6]}).values_list(
            "pk", "reliability_30d"
        )
    )
    return _OfferContext(sites, models, policy, series, curtailments, reliability)


def _offers_priced(
    query: AvailabilityQuery, fits: list[tuple], context: _OfferContext
) -> list[Offer]:
    """One offer per fit that has a rate card and is within the query's price cap."""
    sites, models, series = context.sites, context.models, context.series
    power_prices: dict = {}  # per site, for all its models
    offers = []
    for site_id, model_id, healthy, free, placement, node_count, nodes, fitting in fits:
        card = rate_card_for(site_id=site_id, gpu_model_id=model_id)
        if card is None or site_id not in sites or model_id not in models:
            continue  # no rate card: not for sale
        if query.currency is not None and card.currency != query.currency:
            continue
        breakdown = _price(
            query=query,
            card=card,
            site=sites[site_id],
            gpu_model=models[model_id],
            series=series,
            power_prices=power_prices,
            policy=context.policy,
            healthy=healthy,
            free=free,
        )
        if (
            query.max_price_per_gpu_hour is not None
            and breakdown.price_per_gpu_hour > query.max_price_per_gpu_hour
        ):
            continue
        offers.append(
            Offer(
                site=sites[site_id],
                gpu_model=models[model_id],
                gpu_count=query.gpu_count,
                placement=placement,
                node_count=node_count,
                nodes=nodes,
                fitting_node_count=fitting,
                free_gpus=free,
                currency=breakdown.currency,
                price_per_gpu_hour=breakdown.price_per_gpu_hour,
                total=breakdown.total,
                breakdown=breakdown,
                reliability=_least(context.reliability.get(n.node_id) for n in nodes),
                price_zone=_zone_code(series, sites[site_id]),
                curtailments=context.curtailments.get(site_id, CurtailmentHistory())
                if query.with_history
                else None,
            )
        )
    return offers


def _cheapest_first(offers: list[Offer]) -> list[Offer]:
    offers.sort(
        key=lambda o: (
            o.price_per_gpu_hour,
            o.total,
            o.site.slug,
            o.gpu_model.slug,
            o.listing is not None,
            o.listing.pk if o.listing is not None else 0,
        )
    )
    return offers


def _resale_offers(query: AvailabilityQuery) -> list[Offer]:
    """One offer per listing that fits: its node, its GPUs, at the seller's asking price, with
    its site's grid as every offer has it."""
    if query.tier == Tier.RESERVED:
        return []  # resold time is sold by the hour (on-demand or interruptible), not as terms
    gpu_count, starts_at, ends_at = query.gpu_count, query.starts_at, query.ends_at
    listings = resale_offer_rows(
        gpu_count=gpu_count,
        starts_at=starts_at,
        ends_at=ends_at,
        tier=query.tier,
        gpu_model=query.gpu_model,
        min_gpu_memory_gb=query.min_gpu_memory_gb,
        region=query.region,
        site=query.site,
        max_price_per_gpu_hour=query.max_price_per_gpu_hour,
        min_reliability=query.min_reliability,
        min_renewable_share=query.min_renewable_share,
        max_grid_carbon_g_per_kwh=query.max_grid_carbon_g_per_kwh,
        max_pue=query.max_pue,
    )
    if query.currency is not None:
        listings = [listing for listing in listings if listing.currency == query.currency]
    if not listings:
        return []
    sites = {listing.site_id: listing.site for listing in listings}
    series = power_series_for(sites.values(), starts_at=starts_at, ends_at=ends_at)
    curtailments = site_curtailment_history(site_ids=sites, now=timezone.now())
    offers = []
    for listing in listings:
        breakdown = resale_breakdown(
            listing=listing, gpu_count=gpu_count, starts_at=starts_at, ends_at=ends_at
        )
        offers.append(
            Offer(
                site=listing.site,
                gpu_model=listing.gpu_model,
                gpu_count=gpu_count,
                placement="single_node",
                node_count=1,
                nodes=[NodeFit(node_id=listing.node_id, free_gpus=listing.gpu_count)],
                fitting_node_count=1,
                free_gpus=listing.gpu_count,
                currency=breakdown.currency,
                price_per_gpu_hour=breakdown.price_per_gpu_hour,
                total=breakdown.total,
                breakdown=breakdown,
                reliability=listing.node.reliability_30d,
                price_zone=_zone_code(series, listing.site),
                curtailments=curtailments.get(listing.site_id, CurtailmentHistory()),
                listing=listing,
            )
        )
    return offers


def _zone_code(series: dict, site: Site) -> str | None:
    zone = series.get(site.price_zone_id)
    return zone.code if zone is not None else None


def _least(figures) -> Decimal | None:
    figures = list(figures)
    return None if not figures or None in figures else min(figures)


def site_model_offer(*, query: AvailabilityQuery, site: Site, gpu_model: GpuModel) -> Offer | None:
    """The offer of one site for one model, or None if the request does not fit there (or
    the model has no rate card there). The query's own site and model filters are not read:
    `site` and `gpu_model` are asked.

    The same answer as availability_search(site=…, gpu_model=…), from the same statement
    (_SEARCH_TAIL: the nodes' figures summed and the best-fit or cluster nodes chosen in the
    database, one row back), without reading the site, model and reliability again: the
    utilisation priced is the same figure (GPUs of the model at the site, busy over healthy,
    for the window) and the offer's nodes are the plan placement tries first.
    """
    query.validate(as_booked=False)
    filters, params = _filters(
        site_id=site.pk, gpu_model_id=gpu_model.pk, min_reliability=query.min_reliability
    )
    params.update(
        starts_at=query.starts_at,
        ends_at=query.ends_at,
        gpu_count=query.gpu_count,
        curtail_gpus=query.gpu_count,
        node_limit=_OFFER_NODE_LIMIT,
    )
    with read_connection().cursor() as cur:
        cur.execute(_sql(_SEARCH_TAIL, filters=filters), params)
        fits = _fits(query.gpu_count, cur.fetchall())
    if not fits:
        return None
    (_, _, healthy, free, placement, node_count, nodes, fitting) = fits[0]
    card = rate_card_for(site_id=site.pk, gpu_model_id=gpu_model.pk)
    if card is None:
        return None  # no rate card: not for sale
    policy = current_policy()
    breakdown = _price(
        query=query,
        card=card,
        site=site,
        gpu_model=gpu_model,
        series=power_series_for(
            [site], starts_at=query.starts_at, ends_at=query.ends_at, tier=query.tier, policy=policy
        ),
        power_prices={},
        policy=policy,
        healthy=healthy,
        free=free,
    )
    return Offer(
        site=site,
        gpu_model=gpu_model,
        gpu_count=query.gpu_count,
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


def site_availability(
    *, site: Site, starts_at: datetime, ends_at: datetime
) -> list[SiteModelAvailability]:
    """Free GPUs by model at one site for the period (empty unless the site is active)."""
    _validate_window(starts_at=starts_at, ends_at=ends_at)
    filters, params = _filters(site_id=site.pk)
    with read_connection().cursor() as cur:
        cur.execute(
            _sql(_SITE_TAIL, filters=filters),
            {**params, "starts_at": starts_at, "ends_at": ends_at, "curtail_gpus": 1},
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


def curtailment_overlapping(
    *, site_id: int, starts_at: datetime, ends_at: datetime
) -> Curtailment | None:
    """The site's first grid curtailment in effect whose window overlaps the period (why
    nothing is offered there), or None."""
    return (
        Curtailment.objects.filter(site_id=site_id, called_off_at__isnull=True, shed_at__lt=ends_at)
        .filter(Q(until__isnull=True) | Q(until__gt=starts_at))
        .order_by("shed_at", "pk")
        .first()
    )
