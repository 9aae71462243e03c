"""Reads of resale listings: an organisation's own listings and sales, and the listings a
search offers (marketplace.services.resale writes them)."""

from datetime import datetime
from decimal import Decimal
from itertools import pairwise

from django.db.models import QuerySet
from django.utils import timezone

from config.errors import NotFound
from config.replica import read_connection
from marketplace.models import (
    LIVE_STATUSES,
    ListingStatus,
    Organization,
    ResaleListing,
    ReservationStatus,
)
from marketplace.services.pricing import PriceBreakdown, period_total

__all__ = [
    "listings_for_org",
    "listing_get_for_org",
    "listing_get_for_sale",
    "listing_for_sale",
    "listings_for_reservation",
    "resale_offer_rows",
    "resale_breakdown",
    "sold_gpu_seconds",
    "sold_whole_windows",
    "term_unused_amount",
]


def listings_for_org(*, organization: Organization) -> QuerySet[ResaleListing]:
    """The organisation's listings, newest first: open, withdrawn and sold (its sales)."""
    return ResaleListing.objects.filter(organization=organization).select_related(
        "organization", "reservation", "site", "gpu_model", "node"
    )


def listing_get_for_org(*, organization: Organization, public_id: str) -> ResaleListing:
    listing = listings_for_org(organization=organization).filter(public_id=public_id).first()
    if listing is None:
        raise NotFound("No such listing.", field="listing")
    return listing


def listing_get_for_sale(*, public_id: str) -> ResaleListing:
    """A listing as a buyer names it (any organisation's: listings are published offers;
    whether it can still be sold is decided when it is booked)."""
    listing = (
        ResaleListing.objects.filter(public_id=public_id)
        .select_related("organization", "site", "gpu_model")
        .first()
    )
    if listing is None:
        raise NotFound("No such listing.", field="listing")
    return listing


def listing_for_sale(listing: ResaleListing, *, now: datetime | None = None) -> bool:
    """Whether `listing` is for sale now, as the search offers it: open, its window not begun,
    and its seller's organisation not suspended by staff (a buyer is not told which). Whether
    its GPUs can still be sold is decided when it is booked."""
    return (
        listing.status == ListingStatus.OPEN
        and listing.starts_at > (now or timezone.now())
        and listing.organization.suspended_at is None
    )


def listings_for_reservation(*, reservation) -> list[ResaleListing]:
    """A term's listings (its reservation page), window order."""
    return list(
        ResaleListing.objects.filter(reservation=reservation)
        .select_related("node")
        .order_by("starts_at", "id")
    )


# Listings a buyer could book for [s, e) right now: open, not begun, covering the period, with
# enough GPUs, at the tier asked, from a term still live whose organisation is not suspended,
# on a node and site in service with no maintenance in the period and none of the listed GPUs
# failed (the transfer's checks).
_OFFERS_SQL = """
SELECT l.id
FROM marketplace_resalelisting l
JOIN marketplace_reservation r ON r.id = l.reservation_id
JOIN marketplace_organization o ON o.id = l.organization_id
JOIN inventory_node n ON n.id = l.node_id
JOIN inventory_site s ON s.id = l.site_id
JOIN inventory_gpumodel m ON m.id = l.gpu_model_id
WHERE l.status = 'open' AND l.starts_at > %(now)s AND o.suspended_at IS NULL
  AND l.starts_at <= %(s)s AND l.ends_at >= %(e)s
  AND l.gpu_count >= %(n)s AND l.tier = %(tier)s
  AND r.status = ANY(%(live)s) AND r.ends_at >= l.ends_at
  AND n.status = 'available' AND s.status = 'active'
  AND NOT EXISTS (SELECT 1 FROM inventory_maintenancewindow w
                  WHERE w.node_id = n.id AND w.period && tstzrange(%(s)s, %(e)s, '[)'))
  AND NOT EXISTS (SELECT 1 FROM inventory_gpu g
                  WHERE g.id = ANY(l.gpu_ids[1:%(n)s]) AND g.health = 'failed')
  {filters}
ORDER BY l.price_per_gpu_hour, l.starts_at, l.id
LIMIT 50
"""


def resale_offer_rows(
    *,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
    tier: str,
    gpu_model: str | None = None,
    min_gpu_memory_gb: int | None = None,
    region: str | None = None,
    site: str | None = None,
    max_price_per_gpu_hour: Decimal | None = None,
    min_reliability: Decimal | None = None,
    min_renewable_share: Decimal | None = None,
    max_grid_carbon_g_per_kwh: int | None = None,
    max_pue: Decimal | None = None,
    now: datetime | None = None,
) -> list[ResaleListing]:
    """The listings that fit a search, cheapest first (with site, model and node loaded)."""
    clauses, params = [], {}
    for column, name, value in (
        ("m.slug =", "gpu_model", gpu_model),
        ("m.memory_gb >=", "min_gpu_memory_gb", min_gpu_memory_gb),
        ("s.region =", "region", region),
        ("s.slug =", "site", site),
        ("l.price_per_gpu_hour <=", "max_price", max_price_per_gpu_hour),
        ("n.reliability_30d >=", "min_reliability", min_reliability),
        ("s.renewable_share >=", "min_renewable_share", min_renewable_share),
        ("s.grid_carbon_g_per_kwh <=", "max_grid_carbon", max_grid_carbon_g_per_kwh),
        ("s.pue <=", "max_pue", max_pue),
    ):
        if value is not None:
            clauses.append(f"AND {column} %({name})s")
            params[name] = value
    params.update(
        now=now or timezone.now(),
        s=starts_at,
        e=ends_at,
        n=gpu_count,
        tier=tier,
        # A releasing term is ending: what it listed is no longer sold (services.resale).
        live=[str(s) for s in LIVE_STATUSES if s != ReservationStatus.RELEASING],
    )
    with read_connection().cursor() as cur:
        cur.execute(_OFFERS_SQL.format(filters=" ".join(clauses)), params)
        ids = [row[0] for row in cur.fetchall()]
    by_id = ResaleListing.objects.select_related("site", "gpu_model", "node").in_bulk(ids)
    return [by_id[i] for i in ids if i in by_id and by_id[i].status == ListingStatus.OPEN]


def resale_breakdown(
    *, listing: ResaleListing, gpu_count: int, starts_at: datetime, ends_at: datetime
) -> PriceBreakdown:
    """A resale offer's price: the seller's asking price, no discount or multiplier
    (rate_source names the listing)."""
    seconds = int((ends_at - starts_at).total_seconds())
    one = Decimal("1")
    return PriceBreakdown(
        currency=listing.currency,
        list_price_per_gpu_hour=listing.price_per_gpu_hour,
        rate_source=f"resale:{listing.public_id}",
        tier=listing.tier,
        term="none",
        tier_discount_pct=Decimal("0"),
        utilisation=Decimal("0"),
        utilisation_multiplier=one,
        energy_price_per_mwh=None,
        energy_multiplier=one,
        multiplier_unbounded=one,
        multiplier=one,
        clamped=None,
        price_per_gpu_hour=listing.price_per_gpu_hour,
        gpu_count=gpu_count,
        hours=(Decimal(seconds) / Decimal(3600)).quantize(Decimal("0.000001")),
        total=period_total(
            price_per_gpu_hour=listing.price_per_gpu_hour,
            gpu_count=gpu_count,
            seconds=seconds,
            currency=listing.currency,
        ),
    )


def sold_gpu_seconds(*, reservation, since: datetime) -> int:
    """GPU-seconds of a term from `since` on that were resold (no longer the holder's): its
    sold listings' windows, which a buyer leaving early narrows to the time it held (one that
    held none is `returned`, not sold), so time given back counts as the holder's again."""
    total = 0
    for gpu_count, starts_at, ends_at in ResaleListing.objects.filter(
        reservation=reservation, status=ListingStatus.SOLD, ends_at__gt=since
    ).values_list("gpu_count", "starts_at", "ends_at"):
        total += gpu_count * int((ends_at - max(starts_at, since)).total_seconds())
    return total


def sold_whole_windows(*, reservation) -> list[tuple[datetime, datetime]]:
    """The windows in which every GPU of a term was resold, in order and merged: its sold
    listings' windows (as sold_gpu_seconds counts them) where the GPUs sold reach its GPU
    count. The term holds no GPU then: that time is its buyers', not its own."""
    sold = list(
        ResaleListing.objects.filter(reservation=reservation, status=ListingStatus.SOLD)
        .order_by()
        .values_list("gpu_count", "starts_at", "ends_at")
    )
    edges = sorted({at for _, starts_at, ends_at in sold for at in (starts_at, ends_at)})
    windows: list[tuple[datetime, datetime]] = []
    for lo, hi in pairwise(edges):  # the count sold is constant between two edges
        resold = sum(n for n, starts_at, ends_at in sold if starts_at <= lo < ends_at)
        if resold < reservation.gpu_count:
            continue
        if windows and windows[-1][1] == lo:
            windows[-1] = (windows[-1][0], hi)
        else:
            windows.append((lo, hi))
    return windows


def term_unused_amount(reservation, *, since: datetime) -> Decimal:
    """The term's price for its GPU-seconds from `since` to its end that are still the
    holder's (not resold: a buyer pays the holder for those), at its price per GPU-hour and
    never more than its total: what cancelling, a failure or an undelivered rest gives back
    before the refund rule's share. Rounded to the currency's minor unit."""
    unused_from = max(since, reservation.starts_at)
    seconds = max(0, int((reservation.ends_at - unused_from).total_seconds()))
    held = max(
        0,
        reservation.gpu_count * seconds
        - sold_gpu_seconds(reservation=reservation, since=unused_from),
    )
    return min(
        reservation.total_amount,
        period_total(
            price_per_gpu_hour=reservation.price_per_gpu_hour,
            gpu_count=1,
            seconds=held,
            currency=reservation.currency,
        ),
    )
