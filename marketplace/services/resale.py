"""Resale of reserved time: list, withdraw, and the transfer a buyer's booking makes.

A reserved term's holder lists whole GPUs of one node of its allocation for a window inside
the term that has not started, at an asking price per GPU-hour not below the floor, offered
at the on-demand or interruptible tier. A buyer books it through the booking service
(services/reservations.py, `listing=`); the GPUs then move in that transaction: the seller's
allocation row of each GPU is split around the window (the sold piece kept, not live, as the
record), the buyer's rows are inserted, and the exclusion constraint still has the last word.

Sold in parts: a buyer takes any whole number of the listed GPUs (the first ones by index)
for any window inside the listing's; the listing row is narrowed to what was sold and what is
left stays listed as new open listings (parent = the sold row).

A buyer that leaves the live statuses before its window is over (cancelled before the
start, stopped early, failed, preempted) gives the rest back: in the transition that frees
its GPUs, the seller's allocation of each GPU (each healthy one: a failed one stays gone) is
live again from max(now, window start) to the window's end, and the sale is narrowed to the time the buyer held (`returned` when it
held none), so the term's refund, extension and provisioning see that time as the seller's.

Room the seller's term took in a grid curtailment's window (CurtailmentTake) goes with the
hours sold: the buyer takes its GPUs' draw there, the seller's take is cut by as much, and a
buyer giving the time back gives it back (services.curtailment counts the takes as sold).

While staff suspend the seller's organisation its open listings stay open but are not sold
(nor offered by search): a sale reads the seller's organisation row FOR SHARE, so a suspension
committed first refuses it and one being written waits for it; once lifted they sell again
if still valid. A suspended organisation lists nothing new.

Locks, in the order every path takes them: the seller's reservation row, then listing rows,
then the seller's organisation row (shared), then nodes (as placement and extensions), then
curtailments (id order, as placement), then a billing account (the buyer's funding gate).
A buyer giving time back holds its own row (the transition's) and takes the seller's, the
listing and the node next, before its move frees (and so locks) its GPUs; no path holding a
seller's row waits for a buyer's.
"""

import logging
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from psycopg.types.range import Range

from config.dates import iso_utc
from config.errors import Conflict, NotAvailable, NotFound, ValidationFailed
from inventory.models import Gpu, GpuHealth, Node
from marketplace.funding import funding_gate
from marketplace.models import (
    LIVE_STATUSES,
    RESALE_TIERS,
    Allocation,
    CurtailmentTake,
    EventType,
    ListingStatus,
    Organization,
    ResaleFee,
    ResaleListing,
    Reservation,
    ReservationStatus,
    Tier,
)
from marketplace.rules import validate_period_length
from marketplace.services.allocation import allocation_place
from marketplace.services.audit import audit_record
from marketplace.services.events import listing_events_record
from marketplace.services.organizations import organization_active_check, organization_share_lock
from marketplace.services.pricing import PriceFloor, price_floor

__all__ = [
    "DEFAULT_RESALE_FEE_PCT",
    "resale_fee_pct",
    "resale_price_floor",
    "listing_create",
    "listing_withdraw",
    "listings_withdraw_for_reservation",
    "listings_withdraw_for_ended_terms",
    "listings_withdraw_unheld",
    "resale_allocations_transfer",
    "resale_return_lock",
    "resale_unused_return",
]

logger = logging.getLogger(__name__)

DEFAULT_RESALE_FEE_PCT = Decimal("10")
_PRICE_QUANTUM = Decimal("0.0001")
# The statuses in which a term can list, sell and take back time (a releasing one is ending).
_TAKES_BACK = frozenset(LIVE_STATUSES) - {ReservationStatus.RELEASING}
# Ended terms whose unused rest was refunded less the windows they resold: a window a buyer
# gives back unused is refunded to them on the same terms (billing's funding gate).
_REFUNDED_ENDS = frozenset({ReservationStatus.CANCELLED, ReservationStatus.FAILED})


def resale_fee_pct() -> Decimal:
    """The fee in force: the newest ResaleFee row staff saved, else the default."""
    fee = ResaleFee.objects.order_by("-created_at", "-id").values_list("fee_pct", flat=True).first()
    return DEFAULT_RESALE_FEE_PCT if fee is None else fee


def resale_price_floor(
    *, site, gpu_model, starts_at: datetime, ends_at: datetime, tier: str, currency: str
) -> PriceFloor:
    """The lowest asking price per GPU-hour for that window: the floor every price keeps
    (services.pricing.price_floor: the marginal energy cost of the GPU-hour plus the policy's
    margin), as offers of that tier get it."""
    return price_floor(
        site=site,
        gpu_model=gpu_model,
        starts_at=starts_at,
        ends_at=ends_at,
        tier=tier,
        currency=currency,
    )


# The seller's GPUs that are theirs for the whole window and not already listed for any of it:
# its live allocation rows containing the window (a GPU sold for part of it no longer has one).
_LISTABLE_SQL = """
SELECT a.gpu_id, a.node_id, n.hostname
FROM marketplace_allocation a
JOIN inventory_gpu g ON g.id = a.gpu_id
JOIN inventory_node n ON n.id = a.node_id
WHERE a.reservation_id = %(rid)s AND a.is_live
  AND a.period @> tstzrange(%(s)s, %(e)s, '[)')
  AND NOT EXISTS (
      SELECT 1 FROM marketplace_resalelisting l
      WHERE l.reservation_id = a.reservation_id AND l.status = 'open'
        AND a.gpu_id = ANY(l.gpu_ids)
        AND tstzrange(l.starts_at, l.ends_at, '[)') && tstzrange(%(s)s, %(e)s, '[)'))
ORDER BY a.node_id, g.index
"""


def _aware(value, field: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValidationFailed(f"{field} must be a time with a time zone.", field=field)
    return value


def _price(value) -> Decimal:
    if isinstance(value, float) or isinstance(value, bool):
        raise ValidationFailed(
            "price_per_gpu_hour must be a decimal string.", field="price_per_gpu_hour"
        )
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        price = None
    if (
        price is None
        or not price.is_finite()
        or price <= 0
        or price != price.quantize(_PRICE_QUANTUM)
    ):
        raise ValidationFailed(
            "price_per_gpu_hour must be a positive amount with at most 4 decimal places.",
            code="invalid_price",
            field="price_per_gpu_hour",
        )
    return price


@transaction.atomic
def listing_create(
    *,
    organization: Organization,
    reservation: Reservation,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
    price_per_gpu_hour,
    tier: str = Tier.ON_DEMAND,
    node: str | None = None,
    user=None,
) -> ResaleListing:
    """List `gpu_count` GPUs of one node of a reserved term for [starts_at, ends_at).

    Refused, changing nothing: not the holder (404), not a live reserved term (409), a window
    outside the term or already begun, a price below the floor, a tier other than on-demand
    or interruptible, more GPUs than the node has free of other listings (400/409), an
    organisation staff suspended (403 organization_suspended).
    """
    now = timezone.now()
    locked = _term_lock_for_resale(organization=organization, reservation=reservation)
    organization_active_check(organization_id=organization.pk)  # after the term, as a sale
    starts_at, ends_at = _listing_window_check(
        locked, tier=tier, gpu_count=gpu_count, starts_at=starts_at, ends_at=ends_at, now=now
    )
    price = _listing_price_check(
        locked, price_per_gpu_hour, tier=tier, starts_at=starts_at, ends_at=ends_at
    )
    node_id, gpu_ids = _listing_gpus_choose(
        locked, node=node, gpu_count=gpu_count, starts_at=starts_at, ends_at=ends_at
    )
    listing = ResaleListing.objects.create(
        organization=organization,
        reservation=locked,
        site=locked.site,
        gpu_model=locked.gpu_model,
        node_id=node_id,
        gpu_ids=gpu_ids,
        gpu_count=gpu_count,
        tier=tier,
        starts_at=starts_at,
        ends_at=ends_at,
        currency=locked.currency,
        price_per_gpu_hour=price,
        created_by=user,
    )
    _audit(listing, "resale_listing.create", {"after": _listing_fields(listing)})
    listing_events_record(events=[(EventType.LISTING_CREATED, listing)])
    return listing


def _term_lock_for_resale(*, organization: Organization, reservation: Reservation) -> Reservation:
    """The seller's reserved term, locked, if it is theirs and live."""
    # The seller's row first: every listing write and the buyer's transfer take it first.
    locked = (
        Reservation.objects.select_for_update()
        .filter(pk=reservation.pk, organization=organization)
        .select_related("site", "gpu_model")
        .first()
    )
    if locked is None:
        raise NotFound("No such reservation.", field="reservation")
    if locked.tier != Tier.RESERVED:
        raise Conflict(
            f"Only a reserved term can be resold; this reservation is {locked.tier}.",
            code="not_reserved_term",
            field="reservation",
        )
    # A releasing term is ending (stopped, or its whole rest sold): a stop withdrew its
    # listings and gave up the rest, so none is listed again meanwhile.
    if locked.status not in _TAKES_BACK:
        raise Conflict(
            f"A {locked.status} reservation has no time left to resell.",
            code="reservation_not_live",
            field="reservation",
        )
    return locked


def _listing_window_check(
    locked: Reservation, *, tier: str, gpu_count: int, starts_at, ends_at, now: datetime
) -> tuple[datetime, datetime]:
    """A resale tier, a whole number of GPUs and a window inside the term, not begun yet."""
    if tier not in RESALE_TIERS:
        raise ValidationFailed(
            "Resold time is offered at the on_demand or interruptible tier.",
            code="invalid_tier",
            field="tier",
        )
    if isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or gpu_count < 1:
        raise ValidationFailed("gpu_count must be a whole number of at least 1.", field="gpu_count")
    starts_at, ends_at = _aware(starts_at, "starts_at"), _aware(ends_at, "ends_at")
    validate_period_length(starts_at=starts_at, ends_at=ends_at)
    if starts_at < locked.starts_at or ends_at > locked.ends_at:
        raise ValidationFailed(
            f"The window must lie inside the term ({locked.starts_at.isoformat()} to "
            f"{locked.ends_at.isoformat()}).",
            code="window_outside_term",
            field="starts_at" if starts_at < locked.starts_at else "ends_at",
        )
    if starts_at <= now:
        raise ValidationFailed(
            "Only time that has not started can be resold; the window must start later.",
            code="window_started",
            field="starts_at",
        )
    return starts_at, ends_at


def _listing_price_check(
    locked: Reservation, price_per_gpu_hour, *, tier: str, starts_at: datetime, ends_at: datetime
) -> Decimal:
    """The asking price, if it is a valid amount at or above the floor for the window."""
    price = _price(price_per_gpu_hour)
    floor = resale_price_floor(
        site=locked.site,
        gpu_model=locked.gpu_model,
        starts_at=starts_at,
        ends_at=ends_at,
        tier=tier,
        currency=locked.currency,
    )
    if price < floor.price_per_gpu_hour:
        raise ValidationFailed(
            f"The asking price must be at least the floor of {floor.price_per_gpu_hour} "
            f"{locked.currency.upper()} per GPU-hour (the GPU-hour's energy cost, "
            f"{floor.energy_cost_per_gpu_hour}, plus the margin, {floor.margin_per_gpu_hour}; "
            f"{floor.energy_price_note}).",
            code="price_below_floor",
            field="price_per_gpu_hour",
        )
    return price


def _listing_gpus_choose(
    locked: Reservation, *, node: str | None, gpu_count: int, starts_at: datetime, ends_at: datetime
) -> tuple[int, list[int]]:
    """The node and GPUs to list: the term's GPUs held for the whole window and not listed
    already, on the node asked for or else the best fit (fewest such GPUs that are enough)."""
    with connection.cursor() as cur:
        cur.execute(_LISTABLE_SQL, {"rid": locked.pk, "s": starts_at, "e": ends_at})
        rows = cur.fetchall()
    by_node: dict[int, list[int]] = {}
    hostnames: dict[int, str] = {}
    for gpu_id, node_id, hostname in rows:
        by_node.setdefault(node_id, []).append(gpu_id)
        hostnames[node_id] = hostname
    if node is not None:
        chosen = [n for n, h in hostnames.items() if h == node]
        if not chosen and not Node.objects.filter(hostname=node).exists():
            raise ValidationFailed(f"Unknown node {node!r}.", code="unknown_node", field="node")
        candidates = [n for n in chosen if len(by_node[n]) >= gpu_count]
    else:
        # Best fit: the node with the fewest listable GPUs that still has enough.
        candidates = sorted(
            (n for n, gpus in by_node.items() if len(gpus) >= gpu_count),
            key=lambda n: (len(by_node[n]), n),
        )
    if not candidates:
        if node is None:
            have, where = max((len(g) for g in by_node.values()), default=0), "Any one node"
        else:
            have, where = (len(by_node[chosen[0]]) if chosen else 0), f"Node {node}"
        raise Conflict(
            f"{where} of this reservation has {have} GPU(s) to list for that window; "
            f"{gpu_count} asked (a listing is GPUs of one node, held by the term for the whole "
            "window and not listed already).",
            code="not_enough_gpus",
            field="gpu_count",
        )
    return candidates[0], by_node[candidates[0]][:gpu_count]


@transaction.atomic
def listing_withdraw(*, organization: Organization, listing: ResaleListing) -> ResaleListing:
    """Take an open listing off sale (twice is harmless: one event; so is an expired or a
    returned one, already off sale); a sold one is 409."""
    locked = (
        ResaleListing.objects.select_for_update(of=("self",))
        .filter(pk=listing.pk, organization=organization)
        .select_related(*_SHOWN_WITH)
        .first()
    )
    if locked is None:
        raise NotFound("No such listing.", field="listing")
    if locked.status in (ListingStatus.WITHDRAWN, ListingStatus.EXPIRED, ListingStatus.RETURNED):
        return locked  # already off sale (a returned one is the record of a sale given back)
    if locked.status == ListingStatus.SOLD:
        raise Conflict("This listing is sold; it cannot be withdrawn.", code="listing_sold")
    locked.status = ListingStatus.WITHDRAWN
    locked.withdrawn_at = timezone.now()
    locked.save(update_fields=["status", "withdrawn_at", "updated_at"])
    _audit(locked, "resale_listing.withdraw", {"after": {"status": locked.status}})
    listing_events_record(events=[(EventType.LISTING_WITHDRAWN, locked)])
    return locked


def listings_withdraw_for_reservation(*, reservation: Reservation) -> int:
    """Withdraw the open listings of a term that is ending (cancelled), each with its event;
    the caller holds the reservation's row lock, so no buyer is transferring from it
    meanwhile. The listings are locked too (by id), as the seller's own withdrawal locks
    one: a listing that was withdrawn meanwhile is no longer open here, so it gets no second
    event."""
    return _open_listings_close(
        reservation_id=reservation.pk, status=ListingStatus.WITHDRAWN, stamp="withdrawn_at"
    )


# The term's open listings naming a GPU it no longer holds (live) over the whole window: it
# was moved off that GPU (its node or the GPU failed), so none of them can be sold.
_UNHELD_OPEN_SQL = """
SELECT l.id FROM marketplace_resalelisting l
WHERE l.reservation_id = %(rid)s AND l.status = 'open'
  AND EXISTS (
      SELECT 1 FROM unnest(l.gpu_ids) AS g(gpu_id)
      WHERE NOT EXISTS (
          SELECT 1 FROM marketplace_allocation a
          WHERE a.reservation_id = l.reservation_id AND a.gpu_id = g.gpu_id AND a.is_live
            AND a.period @> tstzrange(l.starts_at, l.ends_at, '[)')))
"""


def listings_withdraw_unheld(*, reservation: Reservation) -> int:
    """Withdraw, each with its event, the term's open listings of GPUs it no longer holds for
    the window: it was moved off them (a failed node or GPU), so a buyer could never get them
    and search must not offer them; the seller may list the time again on the GPUs it holds
    now. The caller holds the term's row lock (no sale of them meanwhile)."""
    with connection.cursor() as cur:
        cur.execute(_UNHELD_OPEN_SQL, {"rid": reservation.pk})
        ids = [row[0] for row in cur.fetchall()]
    if not ids:
        return 0
    return _open_listings_close(
        reservation_id=reservation.pk,
        status=ListingStatus.WITHDRAWN,
        stamp="withdrawn_at",
        pk__in=ids,
    )


def listings_withdraw_for_ended_terms(*, limit: int = 500) -> int:
    """Withdraw, each with its event, the open listings of terms no longer live: failed,
    preempted or completed (a cancel withdraws its own at once). None of them can be sold,
    so the seller sees them withdrawn rather than open. Beat runs it every minute; returns
    how many listings were withdrawn (at most `limit` terms a run)."""
    ended = ResaleListing.objects.filter(status=ListingStatus.OPEN).exclude(
        reservation__status__in=LIVE_STATUSES
    )

    def withdraw(locked: Reservation) -> int:
        if locked.status in LIVE_STATUSES:
            return 0
        return listings_withdraw_for_reservation(reservation=locked)

    return _for_each_term_locked(ended, withdraw, limit=limit)


def listings_expire_begun(*, now: datetime | None = None, limit: int = 500) -> int:
    """Mark `expired`, each with its listing.expired event, the open listings whose window
    has begun unsold: none can be sold any more (a sale refuses a begun window) and the
    seller keeps the time. Beat runs it every minute; returns how many expired (at most
    `limit` terms a run)."""
    now = now or timezone.now()
    begun = ResaleListing.objects.filter(status=ListingStatus.OPEN, starts_at__lte=now)

    def expire(locked: Reservation) -> int:
        return _open_listings_close(
            reservation_id=locked.pk,
            status=ListingStatus.EXPIRED,
            stamp="expired_at",
            starts_at__lte=now,
        )

    return _for_each_term_locked(begun, expire, limit=limit)


def _for_each_term_locked(listings, change, *, limit: int) -> int:
    """change(term) for the terms of `listings` (at most `limit`), each in its own
    transaction under the term's row lock, which a sale and a cancel take first too: a
    listing is never both changing here and selling. Returns the sum of what change returns;
    it must check again what it reads, under the lock."""
    term_ids = list(
        listings.values_list("reservation_id", flat=True)
        .distinct()
        .order_by("reservation_id")[:limit]
    )
    changed = 0
    for term_id in term_ids:
        with transaction.atomic():
            changed += change(Reservation.objects.select_for_update().get(pk=term_id))
    return changed


def _open_listings_close(*, reservation_id: int, status: str, stamp: str, **also) -> int:
    """Give the term's open listings (those also matching `also`) `status` and the time in
    `stamp`, locked by id, each with its listing event; the caller holds the term's lock."""
    listings = list(
        ResaleListing.objects.select_for_update(of=("self",))
        .filter(reservation_id=reservation_id, status=ListingStatus.OPEN, **also)
        .select_related(*_SHOWN_WITH)
        .order_by("pk")
    )
    if not listings:
        return 0
    now = timezone.now()
    ResaleListing.objects.filter(pk__in=[listing.pk for listing in listings]).update(
        status=status, updated_at=now, **{stamp: now}
    )
    for listing in listings:
        listing.status, listing.updated_at = status, now
        setattr(listing, stamp, now)
    event = {
        ListingStatus.WITHDRAWN: EventType.LISTING_WITHDRAWN,
        ListingStatus.EXPIRED: EventType.LISTING_EXPIRED,
    }[status]
    listing_events_record(events=[(event, listing) for listing in listings])
    return len(listings)


# What a listing's event shows besides the row (ListingOutput), loaded with it.
_SHOWN_WITH = ("organization", "reservation", "parent", "site", "gpu_model", "node")


# Sold GPUs: the seller's row of each becomes the record of the sold piece (not live), then
# the seller's pieces before and after the window and the buyer's rows are inserted.
_SELLER_ROWS_SQL = """
SELECT a.id, a.gpu_id, lower(a.period), upper(a.period)
FROM marketplace_allocation a
WHERE a.reservation_id = %(rid)s AND a.is_live AND a.gpu_id = ANY(%(gpus)s)
  AND a.period @> tstzrange(%(s)s, %(e)s, '[)')
ORDER BY a.id
FOR UPDATE
"""
_NODE_USABLE_SQL = """
SELECT n.status = 'available' AND s.status = 'active'
   AND NOT EXISTS (SELECT 1 FROM inventory_maintenancewindow w
                   WHERE w.node_id = n.id AND w.period && tstzrange(%(s)s, %(e)s, '[)'))
   AND NOT EXISTS (SELECT 1 FROM inventory_gpu g
                   WHERE g.id = ANY(%(gpus)s) AND g.health = 'failed')
FROM inventory_node n JOIN inventory_site s ON s.id = n.site_id
WHERE n.id = %(node)s
FOR UPDATE OF n
"""
# Stamped by the database's clock, after the node lock (marketplace.services.allocation).
_INSERT_SQL = """
INSERT INTO marketplace_allocation (reservation_id, gpu_id, node_id, period, is_live, created_at)
SELECT t.rid, t.gpu_id, %(node)s, tstzrange(t.lo, t.hi, '[)'), true, statement_timestamp()
FROM unnest(%(rids)s::bigint[], %(gpu_ids)s::bigint[], %(los)s::timestamptz[],
            %(his)s::timestamptz[]) AS t(rid, gpu_id, lo, hi)
RETURNING id, reservation_id, gpu_id, created_at
"""


def resale_allocations_transfer(
    *,
    buyer: Reservation,
    listing_id: int,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
    now: datetime,
) -> list[Allocation]:
    """Move `gpu_count` listed GPUs for [starts_at, ends_at) from the seller to `buyer` (just
    inserted, in the caller's transaction); returns the buyer's allocations.

    Raises NotAvailable (409) when the listing can no longer be sold (sold, withdrawn, its
    window begun, the seller's term ended, a node out of service), ValidationFailed (400)
    for a request that does not fit it. The caller's transaction rolls everything back.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("resale_allocations_transfer must run inside a transaction")
    seller, listing, now = _listing_lock_for_sale(buyer=buyer, listing_id=listing_id, now=now)
    _listing_request_check(
        listing, buyer=buyer, gpu_count=gpu_count, starts_at=starts_at, ends_at=ends_at
    )
    gpus = listing.gpu_ids[:gpu_count]
    inserted = _listed_gpus_move(
        seller=seller, buyer=buyer, listing=listing, gpus=gpus, gpu_count=gpu_count,
        starts_at=starts_at, ends_at=ends_at, now=now,
    )  # fmt: skip
    _takes_split(
        seller=seller, buyer=buyer, node_id=listing.node_id, gpu_count=gpu_count,
        starts_at=starts_at, ends_at=ends_at,
    )  # fmt: skip
    listing.node = Node.objects.get(pk=listing.node_id)  # read under the node's lock
    _listing_sell(listing, buyer=buyer, gpus=gpus, starts_at=starts_at, ends_at=ends_at, now=now)
    return _buyer_allocations(
        buyer=buyer, listing=listing, inserted=inserted, gpus=gpus,
        starts_at=starts_at, ends_at=ends_at, now=now,
    )  # fmt: skip


def _listing_lock_for_sale(
    *, buyer: Reservation, listing_id: int, now: datetime
) -> tuple[Reservation, ResaleListing, datetime]:
    """The seller's term and the listing, locked in that order, if the listing can still be
    sold to this buyer; and the clock read under the seller's lock."""
    seller_id = (
        ResaleListing.objects.filter(pk=listing_id).values_list("reservation_id", flat=True).first()
    )
    if seller_id is None:
        raise NotFound("No such listing.", field="listing")
    seller = Reservation.objects.select_for_update().get(pk=seller_id)
    listing = (
        ResaleListing.objects.select_for_update(of=("self",))
        .select_related("parent", "site", "gpu_model")
        .get(pk=listing_id)
    )
    listing.reservation = seller  # the same row, locked: its events show it
    # The clock read under the seller's lock: the seller's provisioning takes that lock too
    # before it starts the term, so the two are ordered by it.
    now = max(now, timezone.now())
    if listing.organization_id == buyer.organization_id:
        raise Conflict(
            "This is your own listing: withdraw it to use the time yourself.",
            code="own_listing",
            field="listing",
        )
    if listing.status != ListingStatus.OPEN:
        raise NotAvailable(f"This listing is {listing.status}.", code="listing_not_available")
    seller_organization = organization_share_lock(organization_id=listing.organization_id)
    if seller_organization is None or seller_organization.suspended_at is not None:
        # The buyer is told it is not for sale now, not why (the seller's suspension is theirs).
        raise NotAvailable(
            "This listing is not for sale at the moment.", code="listing_not_available"
        )
    if seller.status not in _TAKES_BACK or seller.ends_at < listing.ends_at:
        raise NotAvailable(
            "The reserved term this listing came from has ended or is ending.",
            code="listing_not_available",
        )
    if listing.starts_at <= now:
        # The seller may be using the time from its start: a listing sells before it begins.
        raise NotAvailable(
            "This listing's window has begun; it is no longer for sale.",
            code="listing_not_available",
        )
    return seller, listing, now


def _listing_request_check(
    listing: ResaleListing,
    *,
    buyer: Reservation,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
) -> None:
    """The buyer's tier, period and GPU count fit the listing."""
    if buyer.tier != listing.tier:
        raise ValidationFailed(
            f"This listing is offered at the {listing.tier} tier.",
            code="invalid_tier",
            field="tier",
        )
    if starts_at < listing.starts_at or ends_at > listing.ends_at:
        raise ValidationFailed(
            f"The period must lie inside the listing's window ({listing.starts_at.isoformat()} "
            f"to {listing.ends_at.isoformat()}).",
            code="window_outside_listing",
            field="starts_at" if starts_at < listing.starts_at else "ends_at",
        )
    if gpu_count > listing.gpu_count:
        raise ValidationFailed(
            f"This listing has {listing.gpu_count} GPU(s).", code="too_many_gpus", field="gpu_count"
        )


def _listed_gpus_move(
    *,
    seller: Reservation,
    buyer: Reservation,
    listing: ResaleListing,
    gpus: list[int],
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
    now: datetime,
) -> list[tuple]:
    """Under the node lock: end the seller's allocations of the GPUs over the period and write
    them again as the seller's before and after it and the buyer's during it. Returns the new
    rows (id, reservation id, GPU id)."""
    params = {"rid": seller.pk, "gpus": gpus, "s": starts_at, "e": ends_at, "node": listing.node_id}
    with connection.cursor() as cur:
        # The node lock placement and extensions take (in the same order: after the rows).
        cur.execute(_NODE_USABLE_SQL, params)
        usable = cur.fetchone()
        if not usable or not usable[0]:
            raise NotAvailable(
                "The listed GPUs' node is out of service for that period.",
                code="listing_not_available",
            )
        cur.execute(_SELLER_ROWS_SQL, params)
        rows = cur.fetchall()
        if len(rows) != gpu_count:
            raise NotAvailable(
                "The listed GPUs are no longer the seller's for that period.",
                code="listing_not_available",
            )
        cur.execute(
            "UPDATE marketplace_allocation SET is_live = false, period = %s WHERE id = ANY(%s)",
            [Range(starts_at, ends_at, "[)"), [r[0] for r in rows]],
        )
        rids, gpu_ids, los, his = [], [], [], []
        for _id, gpu_id, lo, hi in rows:
            for owner, a, b in (
                (seller.pk, lo, starts_at),
                (buyer.pk, starts_at, ends_at),
                (seller.pk, ends_at, hi),
            ):
                if a < b:
                    rids.append(owner)
                    gpu_ids.append(gpu_id)
                    los.append(a)
                    his.append(b)
        cur.execute(
            _INSERT_SQL,
            {
                "node": listing.node_id,
                "rids": rids,
                "gpu_ids": gpu_ids,
                "los": los,
                "his": his,
            },
        )
        return cur.fetchall()


# The site's grid curtailments where the seller's term took room (CurtailmentTake) over the
# sold period, locked in id order after the node (as placement takes them).
_TAKEN_CURTAILMENTS_SQL = """
SELECT c.id FROM marketplace_curtailment c
WHERE EXISTS (SELECT 1 FROM marketplace_curtailmenttake t
              WHERE t.curtailment_id = c.id AND t.reservation_id = %(seller)s
                AND t.period && tstzrange(%(s)s, %(e)s, '[)'))
ORDER BY c.id FOR UPDATE
"""
# Each take of the seller meeting the sold period is cut there: the sold GPUs' draw (as
# placement computes it, never more than the take) becomes the buyer's take over the sold
# hours, and the seller keeps the rest of it then and all of it before and after. What is
# sold in the window at any instant is unchanged.
_TAKES_SPLIT_SQL = """
WITH draw AS (
    SELECT round(%(gpus)s * m.tdp_watts * s.pue / 1000.0, 3) AS kw
    FROM inventory_node n
    JOIN inventory_site s ON s.id = n.site_id
    JOIN inventory_gpumodel m ON m.id = n.gpu_model_id
    WHERE n.id = %(node)s),
hit AS (
    DELETE FROM marketplace_curtailmenttake t
    WHERE t.reservation_id = %(seller)s AND t.curtailment_id = ANY(%(cids)s)
      AND t.period && tstzrange(%(s)s, %(e)s, '[)')
    RETURNING t.curtailment_id, t.kw, t.period),
pieces AS (
    SELECT curtailment_id, %(seller)s::bigint AS rid, kw,
           period * tstzrange(NULL, %(s)s, '[)') AS period FROM hit
    UNION ALL
    SELECT curtailment_id, %(seller)s, kw, period * tstzrange(%(e)s, NULL, '[)') FROM hit
    UNION ALL
    SELECT curtailment_id, %(seller)s, hit.kw - least(hit.kw, draw.kw),
           period * tstzrange(%(s)s, %(e)s, '[)') FROM hit, draw
    UNION ALL
    SELECT curtailment_id, %(buyer)s, least(hit.kw, draw.kw),
           period * tstzrange(%(s)s, %(e)s, '[)') FROM hit, draw)
INSERT INTO marketplace_curtailmenttake (curtailment_id, reservation_id, kw, period, created_at)
SELECT curtailment_id, rid, kw, period, now() FROM pieces
WHERE kw > 0 AND NOT isempty(period)
"""


def _takes_split(
    *,
    seller: Reservation,
    buyer: Reservation,
    node_id: int,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
) -> None:
    """The room the seller's term took in grid curtailments' windows goes with the hours
    sold: the buyer takes its GPUs' draw there, the seller's take is cut by as much, so a
    cancelled term gives back only its own room (marketplace.services.curtailment)."""
    params = {
        "seller": seller.pk,
        "buyer": buyer.pk,
        "node": node_id,
        "gpus": gpu_count,
        "s": starts_at,
        "e": ends_at,
    }
    with connection.cursor() as cur:
        cur.execute(_TAKEN_CURTAILMENTS_SQL, params)
        params["cids"] = [row[0] for row in cur.fetchall()]
        if params["cids"]:
            cur.execute(_TAKES_SPLIT_SQL, params)


def _buyer_allocations(
    *,
    buyer: Reservation,
    listing: ResaleListing,
    inserted: list[tuple],
    gpus: list[int],
    starts_at: datetime,
    ends_at: datetime,
    now: datetime,
) -> list[Allocation]:
    """The buyer's new allocations as model instances (with their node and GPU), by GPU index,
    from the rows just written instead of read back."""
    node = listing.node
    gpus_by_id = Gpu.objects.in_bulk(gpus)
    names = [f.attname for f in Allocation._meta.concrete_fields]
    allocations = []
    for allocation_id, reservation_id, gpu_id, created_at in inserted:
        if reservation_id != buyer.pk:
            continue
        row = {
            "id": allocation_id,
            "reservation_id": buyer.pk,
            "gpu_id": gpu_id,
            "node_id": node.pk,
            "period": Range(starts_at, ends_at, "[)"),
            "is_live": True,
            "created_at": created_at,
        }
        allocation = Allocation.from_db(connection.alias, names, [row[n] for n in names])
        allocation.reservation, allocation.node, allocation.gpu = buyer, node, gpus_by_id[gpu_id]
        allocations.append(allocation)
    allocations.sort(key=lambda a: a.gpu.index)
    return allocations


def _listing_sell(
    listing: ResaleListing,
    *,
    buyer: Reservation,
    gpus: list[int],
    starts_at: datetime,
    ends_at: datetime,
    now: datetime,
) -> None:
    """Narrow the listing to what was sold and list what is left as new open listings; the
    seller's organisation gets listing.sold and a listing.created for each new one (in the
    buyer's transaction: a booking that rolls back records none of them)."""
    rest = [g for g in listing.gpu_ids if g not in gpus]
    pieces = [
        (listing.gpu_ids, listing.starts_at, starts_at),
        (listing.gpu_ids, ends_at, listing.ends_at),
        (rest, starts_at, ends_at),
    ]
    # A piece shorter than any booking may be could never be bought: the seller keeps it.
    shortest = timedelta(seconds=settings.RESERVATION_MIN_SECONDS)
    remainders = [
        _listing_piece(listing, gpus=piece_gpus, starts_at=a, ends_at=b)
        for piece_gpus, a, b in pieces
        if piece_gpus and b - a >= shortest
    ]
    listing.gpu_ids = list(gpus)
    listing.gpu_count = len(gpus)
    listing.starts_at, listing.ends_at = starts_at, ends_at
    listing.status = ListingStatus.SOLD
    listing.buyer_reservation = buyer
    listing.fee_pct = resale_fee_pct()
    listing.sold_at = now
    listing.save()
    remainders = ResaleListing.objects.bulk_create(remainders)
    # No audit entry here: this runs in the buyer's request, and the seller's audit log must
    # not name the buyer; the seller sees the sale on the listing (sold_at, its sales) and in
    # its events, which show the listing as the seller's API does (never the buyer).
    listing_events_record(
        events=[
            (EventType.LISTING_SOLD, listing),
            *((EventType.LISTING_CREATED, remainder) for remainder in remainders),
        ]
    )


def _listing_fields(listing: ResaleListing) -> dict:
    return {
        "status": listing.status,
        "reservation": listing.reservation.public_id,
        "gpu_count": listing.gpu_count,
        "tier": listing.tier,
        "starts_at": iso_utc(listing.starts_at),
        "ends_at": iso_utc(listing.ends_at),
        "price_per_gpu_hour": str(listing.price_per_gpu_hour),
        "currency": listing.currency,
    }


def _audit(listing: ResaleListing, action: str, changes: dict) -> None:
    audit_record(
        organization_id=listing.organization_id,
        action=action,
        object_type="resale_listing",
        object_id=listing.public_id,
        changes=changes,
    )


# --- a buyer leaving early gives the rest of its window back to the seller ----------------

# Per GPU: the seller's record of the sold window (not live, the window's exact period) and
# its live rows that meet the returned time ([r, e)) at either end, to be joined to it.
_RETURN_ROWS_SQL = """
SELECT a.id, a.gpu_id, a.is_live, lower(a.period), upper(a.period)
FROM marketplace_allocation a
WHERE a.reservation_id = %(rid)s AND a.gpu_id = ANY(%(gpus)s)
  AND ((NOT a.is_live AND a.period = tstzrange(%(s)s, %(e)s, '[)'))
       OR (a.is_live AND (upper(a.period) = %(r)s OR lower(a.period) = %(e)s)))
ORDER BY a.id
FOR UPDATE
"""
# The term's other GPUs it holds during the returned time: with the returned ones, never more
# than it booked (a term moved off a failed GPU holds its replacement instead).
_OTHER_GPUS_HELD_SQL = """
SELECT count(DISTINCT a.gpu_id)
FROM marketplace_allocation a
WHERE a.reservation_id = %(rid)s AND a.is_live AND NOT a.gpu_id = ANY(%(gpus)s)
  AND a.period && tstzrange(%(r)s, %(e)s, '[)')
"""
_NODE_LOCK_SQL = "SELECT 1 FROM inventory_node WHERE id = %(node)s FOR UPDATE"
_PERIODS_SET_SQL = """
UPDATE marketplace_allocation a SET period = tstzrange(t.lo, t.hi, '[)')
FROM unnest(%(ids)s::bigint[], %(los)s::timestamptz[], %(his)s::timestamptz[]) AS t(id, lo, hi)
WHERE a.id = t.id
"""


def resale_return_lock(*, buyer: Reservation, now: datetime) -> ResaleListing | None:
    """Before `buyer` (its row locked) leaves the live statuses at `now`: if it was bought from
    a listing whose window is not over, and the seller's term can still use time given back,
    lock the seller's term, the listing and its node, in the module's order, and return the
    listing (with the term as its `reservation`) for resale_unused_return after the move.

    Taken before the move frees the buyer's GPUs, as that write locks their rows (the
    allocations' busy trigger) and every seller's own move takes its row before its GPUs'.
    """
    if buyer.tier == Tier.RESERVED or not str(
        (buyer.breakdown or {}).get("rate_source", "")
    ).startswith("resale:"):
        return None
    sale = (
        ResaleListing.objects.filter(buyer_reservation_id=buyer.pk, status=ListingStatus.SOLD)
        .values_list("pk", "reservation_id", "ends_at")
        .first()
    )
    if sale is None or now >= sale[2]:
        return None
    seller = Reservation.objects.select_for_update().get(pk=sale[1])
    if seller.status not in _TAKES_BACK and seller.status not in _REFUNDED_ENDS:
        return None
    listing = ResaleListing.objects.select_for_update().get(pk=sale[0])
    if listing.status != ListingStatus.SOLD or now >= listing.ends_at:
        return None
    with connection.cursor() as cur:
        cur.execute(_NODE_LOCK_SQL, {"node": listing.node_id})
    listing.reservation = seller
    # The room the buyer took in curtailments' windows from now on, read before the move
    # ends it: the seller's term takes it back with the time (resale_unused_return).
    listing.buyer_takes = list(
        CurtailmentTake.objects.filter(
            reservation_id=buyer.pk, period__overlap=Range(now, listing.ends_at, "[)")
        )
        .exclude(period__isempty=True)
        .values_list("curtailment_id", "kw", "period")
    )
    return listing


def resale_unused_return(*, listing: ResaleListing, now: datetime) -> bool:
    """The listing's buyer has just left the live statuses at `now`, in this transaction,
    under the locks resale_return_lock took: the window's time from max(now, window start)
    goes back to the seller's term. The seller's allocation of each GPU is live again over it
    (joined to the seller's pieces around it), and the sale is narrowed to the time the buyer
    held, or marked `returned` when it held none, and then, if its window has not begun, the
    GPUs given back are listed again on the same terms (a new open listing, parent = it). The
    exclusion constraint has the last word: if someone else holds any of that time meanwhile,
    nothing is returned. Returns whether time was returned."""
    seller = listing.reservation
    returned_from = max(now, listing.starts_at)
    if seller.status not in _TAKES_BACK:
        return _ended_term_window_return(listing, returned_from=returned_from)
    try:
        with transaction.atomic():
            returned = _sold_gpus_return(
                seller=seller, listing=listing, returned_from=returned_from
            )
    except IntegrityError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != "23P01":
            raise
        returned = None
    if returned is None:
        logger.warning(
            "resale: the buyer of %s left early; its time is not returned to %s (held)",
            listing.public_id,
            seller.public_id,
        )
        return False
    _failed_sold_gpus_replace(
        seller=seller, listing=listing, returned=returned, returned_from=returned_from
    )
    _takes_return(
        seller=seller, takes=getattr(listing, "buyer_takes", []), returned_from=returned_from
    )
    events = []
    if returned_from == listing.starts_at:
        listing.status = ListingStatus.RETURNED
    else:
        listing.ends_at = returned_from
    listing.save(update_fields=["status", "ends_at", "updated_at"])
    # The seller is told: the sale as it now stands (narrowed, or `returned`), the time back.
    events.append((EventType.LISTING_RETURNED, listing))
    if listing.status == ListingStatus.RETURNED and listing.starts_at > now and returned:
        # Its window has not begun: the GPUs given back are for sale again, as the seller
        # listed them (a buyer booking and cancelling takes nothing off sale for good).
        events.append((EventType.LISTING_CREATED, _relist(listing, gpus=returned)))
    listing_events_record(events=events)
    return True


def _failed_sold_gpus_replace(
    *, seller: Reservation, listing: ResaleListing, returned: list[int], returned_from: datetime
) -> None:
    """A sold GPU that failed is not given back, and the term was replaced only for the hours
    it held (marketplace.services.gpu_failures): it gets as many GPUs at the site for the time
    returned, never more than it booked; none free, it goes without (logged)."""
    count = len(listing.gpu_ids) - len(returned)
    if not count:
        return
    params = {"rid": seller.pk, "gpus": [], "r": returned_from, "e": listing.ends_at}
    with connection.cursor() as cur:
        cur.execute(_OTHER_GPUS_HELD_SQL, params)
        count = min(count, seller.gpu_count - cur.fetchone()[0])
    if count <= 0:
        return
    try:
        with transaction.atomic():
            allocation_place(
                reservation=seller,
                site_id=listing.site_id,
                gpu_model_id=listing.gpu_model_id,
                gpu_count=count,
                starts_at=returned_from,
                ends_at=listing.ends_at,
                moved=True,  # the buyer's load there leaves as the term's comes back
            )
    except NotAvailable:
        logger.warning(
            "resale: %d failed GPU(s) of %s not replaced for %s's returned time (none free)",
            count,
            listing.public_id,
            seller.public_id,
        )


# The curtailments whose takes the buyer gave back, locked in id order (after the node).
_CURTAILMENTS_LOCK_SQL = (
    "SELECT id FROM marketplace_curtailment WHERE id = ANY(%s) ORDER BY id FOR UPDATE"
)


def _takes_return(*, seller: Reservation, takes: list, returned_from: datetime) -> None:
    """The room the buyer had taken in curtailments' windows for the time returned is the
    seller's term's again (it runs there once more): a take of the seller over it."""
    rows = [
        CurtailmentTake(
            curtailment_id=curtailment_id,
            reservation_id=seller.pk,
            kw=kw,
            period=Range(max(period.lower, returned_from), period.upper, "[)"),
        )
        for curtailment_id, kw, period in takes
        if max(period.lower, returned_from) < period.upper
    ]
    if not rows:
        return
    with connection.cursor() as cur:
        cur.execute(_CURTAILMENTS_LOCK_SQL, [sorted({t.curtailment_id for t in rows})])
    CurtailmentTake.objects.bulk_create(rows)


def _ended_term_window_return(listing: ResaleListing, *, returned_from: datetime) -> bool:
    """The seller's term ended (cancelled, failed) with its unused rest refunded less this
    window: the window the buyer gives back is no longer sold (narrowed, or `returned`), and
    the seller is refunded its GPU-seconds on the terms the term's own refund took (billing's
    funding gate, once). Its GPUs are not the term's again: it has ended."""
    seller = listing.reservation
    gpu_seconds = listing.gpu_count * int((listing.ends_at - returned_from).total_seconds())
    if returned_from == listing.starts_at:
        listing.status = ListingStatus.RETURNED
    else:
        listing.ends_at = returned_from
    listing.save(update_fields=["status", "ends_at", "updated_at"])
    funding_gate().resale_window_returned(
        seller=seller, listing_id=listing.pk, gpu_seconds=gpu_seconds
    )
    listing_events_record(events=[(EventType.LISTING_RETURNED, listing)])
    return True


def _relist(listing: ResaleListing, *, gpus: list[int]) -> ResaleListing:
    """A new open listing of `gpus` over the returned listing's window, on its terms."""
    relisted = _listing_piece(
        listing, gpus=gpus, starts_at=listing.starts_at, ends_at=listing.ends_at
    )
    relisted.save()
    return relisted


def _listing_piece(
    listing: ResaleListing, *, gpus: list[int], starts_at: datetime, ends_at: datetime
) -> ResaleListing:
    """An open listing (not saved) of `gpus` for [starts_at, ends_at) on `listing`'s terms,
    its child: what is left of a partial sale, or a returned window listed again."""
    return ResaleListing(
        organization_id=listing.organization_id,
        reservation=listing.reservation,
        parent=listing,
        site=listing.site,
        gpu_model=listing.gpu_model,
        node=listing.node,
        gpu_ids=list(gpus),
        gpu_count=len(gpus),
        tier=listing.tier,
        starts_at=starts_at,
        ends_at=ends_at,
        currency=listing.currency,
        price_per_gpu_hour=listing.price_per_gpu_hour,
        created_by_id=listing.created_by_id,
    )


def _sold_gpus_return(
    *, seller: Reservation, listing: ResaleListing, returned_from: datetime
) -> list[int] | None:
    """Under the node's lock: the seller's record of each sold GPU is cut to what the buyer held
    (gone if it held none) and the seller's live row of each healthy one covers
    [returned_from, window end) again, joined to its live pieces that meet it (a failed GPU
    stays gone: the term is moved off it, as the buyer was). Returns the GPUs that are the
    seller's again; None, changing nothing, if the seller's rows are not as the sale left them
    or it would hold more GPUs than it booked."""
    gpus = list(listing.gpu_ids)
    failed = set(
        Gpu.objects.filter(pk__in=gpus, health=GpuHealth.FAILED).values_list("pk", flat=True)
    )
    back = [gpu_id for gpu_id in gpus if gpu_id not in failed]
    s, e, r = listing.starts_at, listing.ends_at, returned_from
    params = {"rid": seller.pk, "gpus": gpus, "s": s, "e": e, "r": r}
    with connection.cursor() as cur:
        cur.execute(_OTHER_GPUS_HELD_SQL, params)
        if cur.fetchone()[0] + len(back) > seller.gpu_count:
            return None
        cur.execute(_RETURN_ROWS_SQL, params)
        records, before, after = {}, {}, {}
        for row_id, gpu_id, is_live, lo, hi in cur.fetchall():
            if not is_live:
                records[gpu_id] = row_id
            elif hi == r:
                before[gpu_id] = (row_id, lo)
            else:
                after[gpu_id] = (row_id, hi)
        if set(records) != set(gpus):
            return None
        deleted, set_ids, set_los, set_his = [], [], [], []
        new_gpus, new_los, new_his = [], [], []
        for gpu_id in gpus:
            if r == s:
                deleted.append(records[gpu_id])  # the buyer held none of it: no record
            else:
                set_ids.append(records[gpu_id])
                set_los.append(s)
                set_his.append(r)
            if gpu_id in failed:
                continue
            lo = before[gpu_id][1] if gpu_id in before else r
            hi = after[gpu_id][1] if gpu_id in after else e
            if gpu_id in before:
                set_ids.append(before[gpu_id][0])
                if gpu_id in after:
                    deleted.append(after[gpu_id][0])  # joined into the piece before
            elif gpu_id in after:
                set_ids.append(after[gpu_id][0])
            else:
                new_gpus.append(gpu_id)
                new_los.append(lo)
                new_his.append(hi)
                continue
            set_los.append(lo)
            set_his.append(hi)
        # Joined pieces go first, so no live row of the seller overlaps another meanwhile.
        cur.execute("DELETE FROM marketplace_allocation WHERE id = ANY(%s)", [deleted])
        cur.execute(_PERIODS_SET_SQL, {"ids": set_ids, "los": set_los, "his": set_his})
        cur.execute(
            _INSERT_SQL,
            {
                "node": listing.node_id,
                "rids": [seller.pk] * len(new_gpus),
                "gpu_ids": new_gpus,
                "los": new_los,
                "his": new_his,
            },
        )
    return back
