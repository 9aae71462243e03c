"""Metering: usage by the second from each reservation's delivered time, into the ledger.

Billable time of a reservation = [activated_at, min(released_at or now, ends_at)) minus every
outage that hit it: the reservation's own outages (marketplace ReservationOutage, recorded by
provisioning) and every inventory Outage of a node serving it, for the time its allocations
there held GPUs, as one union (open outages run to now; an interval in both sources is
excluded once). Time
before activation (provisioning), after release (including preemption) and during outages
is never charged. GPU-seconds = billable seconds × GPU count.

Each run writes one line per reservation with the difference between the correctly rounded
cumulative cost (money.usage_cost_minor) and what was already charged, so repeated runs never
double-charge and rounding happens once on the total. An outage recorded after its time was
metered makes the next difference negative: a usage correction that gives the money back.
The reservation row is locked while metering so two runs cannot both charge the same time.
Reserved-tier reservations are charged their whole term once (reserved_charge) and are not
metered by the second; outages against them are compensated by SLA credits.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection, models, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind, UsageAccrual
from billing.money import ZERO_DECIMAL_CURRENCIES, to_minor_units
from billing.services.holds import holds_charge
from billing.services.ledger import ledger_entry_add
from billing.services.resale import resale_proceeds_book
from inventory.models import Outage, OutageCause
from marketplace.models import (
    Allocation,
    ListingStatus,
    ResaleListing,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    Tier,
)
from marketplace.provisioning.services import WORKLOAD_LOST_CAUSE

__all__ = [
    "METERED_TIERS",
    "CHARGED_RESERVED_STATUSES",
    "RECENTLY_RELEASED",
    "BookedUsage",
    "interval_union",
    "interval_minus",
    "outage_intervals",
    "reservation_delivered_seconds",
    "usage_accruals_open",
    "usage_accrue",
    "usage_book",
    "usage_accruals_close",
    "usage_price_change",
    "reservations_book_now",
    "reservation_meter",
    "reservations_meter",
    "reserved_terms_to_charge",
    "reserved_base_charge",
    "reserved_extension_charge",
]

METERED_TIERS = (Tier.ON_DEMAND, Tier.INTERRUPTIBLE)
CHARGED_RESERVED_STATUSES = (
    ReservationStatus.PENDING,
    ReservationStatus.SCHEDULED,
    ReservationStatus.PROVISIONING,
    ReservationStatus.ACTIVE,
    ReservationStatus.RELEASING,
    ReservationStatus.COMPLETED,
)

Interval = tuple[datetime, datetime]


def interval_union(intervals: list[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def interval_minus(intervals: list[Interval], cut: list[Interval]) -> list[Interval]:
    """`intervals` (disjoint, in order) less every interval of `cut` (disjoint, in order)."""
    left: list[Interval] = []
    for start, end in intervals:
        for a, b in cut:
            if b <= start or end <= a:
                continue
            if start < a:
                left.append((start, a))
            start = max(start, b)
        if start < end:
            left.append((start, end))
    return left


def _overlap_seconds(intervals: list[Interval], start: datetime, end: datetime) -> int:
    total = 0
    for a, b in intervals:
        lo, hi = max(a, start), min(b, end)
        if hi > lo:
            total += int((hi - lo).total_seconds())
    return total


def outage_intervals(*, reservation: Reservation, until: datetime) -> list[Interval]:
    """Union of the reservation's outages and its nodes' (any node down = it is down), a
    node's only while the reservation held GPUs on it: so is its own outage recorded from a
    node's, which is not a term's while it has resold every GPU it had there (the buyer's)."""
    since = reservation.activated_at or until
    live = Q(started_at__lt=until) & (Q(ended_at__isnull=True) | Q(ended_at__gt=since))
    sold = list(
        ResaleListing.objects.filter(
            reservation=reservation, status=ListingStatus.SOLD
        ).values_list("node_id", "gpu_ids", "starts_at", "ends_at")
    )
    held = _held_on_nodes(reservation, sold)
    rows = []
    # Node outages only: a GPU's own outage (Outage.gpu) reaches the reservations on that GPU
    # as ReservationOutage rows (marketplace.services.gpu_failures), not every one on its node.
    for node_id, start, end in Outage.objects.filter(live, node_id__in=held, gpu=None).values_list(
        "node_id", "started_at", "ended_at"
    ):
        end = min(end or until, until)
        rows += [(max(start, a), min(end, b)) for a, b in held[node_id]]
    for node_id, start, end, cause in ReservationOutage.objects.filter(
        live, reservation=reservation
    ).values_list("node_id", "started_at", "ended_at", "cause"):
        row = [(start, min(end or until, until))]
        if cause not in _WORKLOAD_OUTAGE_CAUSES:
            sold_there = interval_union([(a, b) for n, _, a, b in sold if n == node_id])
            row = interval_minus(row, interval_minus(sold_there, held.get(node_id, [])))
        rows += row
    return interval_union(rows)


# A reservation's outages that last until its workload runs again wherever it is (a failed
# GPU's, a lost workload's), not only while it is on their node (provisioning closes them so).
_WORKLOAD_OUTAGE_CAUSES = (OutageCause.GPU_FAILURE, WORKLOAD_LOST_CAUSE)


def _held_on_nodes(reservation: Reservation, sold: list[tuple]) -> dict[int, list[Interval]]:
    """The periods the reservation held GPUs on each node: its allocations' periods, less the
    record a reserved term keeps of a GPU's sold window (held by the buyer, not by it); `sold`
    is its sold listings (node, GPUs, start, end)."""
    held: dict[int, list[Interval]] = {}
    for node_id, gpu_id, period, is_live in Allocation.objects.filter(
        reservation=reservation
    ).values_list("node_id", "gpu_id", "period", "is_live"):
        if period.isempty:  # ended before it began
            continue
        lo, hi = period.lower, period.upper
        if not is_live and any(gpu_id in gpus and a <= lo and hi <= b for _, gpus, a, b in sold):
            continue
        held.setdefault(node_id, []).append((lo, hi))
    return {node_id: interval_union(periods) for node_id, periods in held.items()}


def active_window(*, reservation: Reservation, until: datetime) -> Interval | None:
    if reservation.activated_at is None:
        return None
    end = min(reservation.released_at or until, reservation.ends_at, until)
    if end <= reservation.activated_at:
        return None
    return reservation.activated_at, end


def reservation_delivered_seconds(
    *, reservation: Reservation, until: datetime, start: datetime | None = None
) -> int:
    """Wall-clock seconds actually delivered in [start, until), outages excluded."""
    window = active_window(reservation=reservation, until=until)
    if window is None:
        return 0
    lo = max(window[0], start) if start else window[0]
    hi = window[1]
    if hi <= lo:
        return 0
    outages = outage_intervals(reservation=reservation, until=hi)
    return int((hi - lo).total_seconds()) - _overlap_seconds(outages, lo, hi)


# --- accrual: set-based, a few statements per run whatever the number of reservations ------

# Minor units per major unit, in SQL (money.minor_exponent): rounding happens in PostgreSQL with
# round(numeric), which rounds half away from zero, as ROUND_HALF_UP does.
_FACTOR_SQL = "(CASE WHEN lower({c}) = ANY(%(zero_decimal)s) THEN 1 ELSE 100 END)"

# Every outage that stops the clock of the reservations in `scope`, as one multirange each:
# its own outages and any outage of a node that served it, for the time an allocation of it
# held GPUs there (usage.outage_intervals, in SQL; a metered reservation sells no time, so no
# sold window is left out here).
_OUTAGES_CTE = """
outs AS (
    SELECT x.reservation_id, range_agg(x.r) AS mr FROM (
        SELECT ro.reservation_id, tstzrange(ro.started_at, ro.ended_at, '[)') AS r
        FROM marketplace_reservationoutage ro
        JOIN billing_usageaccrual oa
          ON oa.reservation_id = ro.reservation_id AND oa.closed_at IS NULL
        WHERE ro.started_at < %(now)s AND (ro.ended_at IS NULL OR ro.ended_at > ro.started_at)
          {only_ro}
        UNION ALL
        SELECT DISTINCT al.reservation_id, tstzrange(o.started_at, o.ended_at, '[)') * al.period
        FROM inventory_outage o
        JOIN marketplace_allocation al ON al.node_id = o.node_id
         AND al.period && tstzrange(o.started_at, o.ended_at, '[)')
        JOIN billing_usageaccrual oa
          ON oa.reservation_id = al.reservation_id AND oa.closed_at IS NULL
        JOIN marketplace_reservation orr ON orr.id = al.reservation_id
        WHERE o.gpu_id IS NULL AND o.started_at < %(now)s
          AND (o.ended_at IS NULL OR o.ended_at > orr.activated_at) {only_al}
    ) x GROUP BY x.reservation_id
)"""
# Outages are few: they are read from the outage side (through the allocations of their
# nodes), for every open accrual or only the given ones, never by joining every accrual.
_OUTS_ALL = {"only_ro": "", "only_al": ""}
_OUTS_IDS = {
    "only_ro": "AND ro.reservation_id IN (SELECT unnest(%(ids)s::bigint[]))",
    "only_al": "AND al.reservation_id IN (SELECT unnest(%(ids)s::bigint[]))",
}

# Whole seconds delivered in [activated_at, hi) outside the outages `mr` (NULL: none).
_DELIVERED_SQL = """(CASE
    WHEN {hi} <= {a} THEN 0
    WHEN {mr} IS NULL THEN floor(extract(epoch FROM {hi} - {a}))
    ELSE (SELECT coalesce(floor(sum(extract(epoch FROM upper(x) - lower(x)))), 0)
          FROM unnest(tstzmultirange(tstzrange({a}, {hi}, '[)')) - {mr}) x)
END)::bigint"""

# The cost of a cumulative number of GPU-seconds: what was priced before the last price change
# (price_from_*) plus the rest at the current price, rounded once on the total.
_COST_SQL = (
    "({a}.price_from_minor + round(({gs} - {a}.price_from_gpu_seconds) * {a}.price_per_gpu_hour"
    " * " + _FACTOR_SQL.format(c="{a}.currency") + " / 3600))::bigint"
)

_ACCRUE_SQL = (
    """
WITH scope AS (
    SELECT a.reservation_id, r.activated_at, r.gpu_count,
           least(coalesce(r.released_at, %(now)s), r.ends_at, %(now)s) AS hi,
           r.released_at IS NULL AND r.ends_at > %(now)s AS open
    FROM billing_usageaccrual a JOIN marketplace_reservation r ON r.id = a.reservation_id
    WHERE a.closed_at IS NULL AND a.accrued_until <= %(now)s {only}
    ORDER BY a.reservation_id
    FOR UPDATE OF a {skip}
),"""
    + _OUTAGES_CTE
    + """,
calc AS (
    SELECT s.reservation_id, s.gpu_count,
           """
    + _DELIVERED_SQL.format(hi="s.hi", a="s.activated_at", mr="o.mr")
    + """ * s.gpu_count AS gs,
           s.open AND s.hi > s.activated_at AND NOT coalesce(o.mr @> s.hi, false) AS running
    FROM scope s LEFT JOIN outs o USING (reservation_id)
)
UPDATE billing_usageaccrual a
SET gpu_seconds = c.gs, accrued_minor = """
    + _COST_SQL.format(a="a", gs="c.gs")
    + """,
    accrued_until = %(now)s, running = c.running, gpu_count = c.gpu_count
FROM calc c
WHERE a.reservation_id = c.reservation_id
"""
)

# Accruals for metered reservations that have started and have none yet (written by booking
# at the first state change, or here: the sweep behind it). Uses the status index.
_OPEN_SQL = """
INSERT INTO billing_usageaccrual (reservation_id, organization_id, currency, price_per_gpu_hour,
    price_from_gpu_seconds, price_from_minor, gpu_seconds, accrued_minor, accrued_until, running,
    gpu_count, booked_gpu_seconds, booked_minor, booked_until, closed_at)
SELECT r.id, r.organization_id, r.currency, r.price_per_gpu_hour, 0, 0, 0, 0, r.activated_at,
       false, r.gpu_count, 0, 0, r.activated_at, NULL
FROM marketplace_reservation r
WHERE r.tier = ANY(%(tiers)s) AND r.activated_at IS NOT NULL {where}
  AND NOT EXISTS (SELECT 1 FROM billing_usageaccrual a WHERE a.reservation_id = r.id)
ORDER BY r.id
{lock}
ON CONFLICT (reservation_id) DO NOTHING
"""

# Reservations a transition holds (FOR UPDATE) are skipped by the run's statements.
_SKIP_MOVING = "FOR KEY SHARE OF r SKIP LOCKED"

# The run's statements join whole sets (every open accrual with its reservation, the outages,
# the rows just computed): the planner cannot estimate a CTE's rows, and a nested loop over
# two of them is quadratic (seconds at 2,000 reservations). Hash joins keep them linear.
_SET_OPERATIONS = "SET LOCAL enable_nestloop = off"

_IDS_LOCK_SQL = """
SELECT a.reservation_id FROM billing_usageaccrual a
WHERE a.reservation_id IN (SELECT unnest(%(ids)s::bigint[])) AND a.closed_at IS NULL
ORDER BY a.reservation_id
FOR UPDATE OF a
"""
# Due at the hour: not booked since the hour began, at the reservation's minute of the hour
# (id % spread: the hour's lines are spread over the run's first `spread` minutes), or at once
# when even the hour before is unbooked (a run missed); at the end: anything still unbooked.
_DUE_HOURLY = """((a.booked_until < %(hour)s
        AND (a.reservation_id %% %(spread)s <= %(minute)s
             OR a.booked_until < %(hour)s - interval '1 hour'))
    OR ((r.released_at IS NOT NULL OR r.ends_at <= %(now)s)
        AND (a.accrued_minor <> a.booked_minor OR a.gpu_seconds <> a.booked_gpu_seconds
             OR a.booked_until < least(coalesce(r.released_at, r.ends_at), r.ends_at))))"""

# The most UTC days one call books a reservation across (a day a pass); past it the next run
# goes on from where this one stopped.
_MAX_DAYS_A_RUN = 400

# One usage line per locked accrual for what it accrued up to its bound and has not booked,
# and the accrual's booked figures moved by exactly the lines written, in one statement: a
# crash leaves both or neither. A line whose key exists already (a run racing another) is not
# written and moves nothing.
_BOOK_SQL = (
    """
WITH scope AS (
    SELECT a.reservation_id, a.organization_id, a.currency, a.price_per_gpu_hour,
           a.price_from_gpu_seconds, a.price_from_minor, a.booked_until, a.booked_gpu_seconds,
           a.booked_minor, r.activated_at, r.gpu_count, r.released_at, r.ends_at,
           CASE WHEN m.crosses THEN m.midnight ELSE m.target END AS bound,
           m.crosses AS cut
    FROM billing_usageaccrual a JOIN marketplace_reservation r ON r.id = a.reservation_id
    -- Where the line would end (the hour's bound, or now), and the first UTC midnight after
    -- what is booked: a line reaching past it is cut there (`cut`), and the caller books on.
    CROSS JOIN LATERAL (
        SELECT t.target, t.midnight,
               t.midnight < least(t.target, r.ends_at, coalesce(r.released_at, t.target))
                   AS crosses
        FROM (SELECT
                CASE WHEN NOT (%(to_now)s OR r.released_at IS NOT NULL OR r.ends_at <= %(now)s)
                     THEN greatest(a.booked_until, %(hour)s) ELSE %(now)s END AS target,
                (date_trunc('day', a.booked_until AT TIME ZONE 'UTC') + interval '1 day')
                    AT TIME ZONE 'UTC' AS midnight) t
    ) m
    WHERE a.closed_at IS NULL AND {scope}
),"""
    + _OUTAGES_CTE
    + """,
priced AS (
    SELECT s.*,
           greatest(s.booked_until,
                    least(s.bound, s.ends_at, coalesce(s.released_at, s.bound))) AS period_end,
           """
    + _DELIVERED_SQL.format(
        hi="least(coalesce(s.released_at, s.bound), s.ends_at, s.bound)",
        a="s.activated_at",
        mr="o.mr",
    )
    + """ * s.gpu_count AS gs
    FROM scope s LEFT JOIN outs o USING (reservation_id)
), costed AS (
    SELECT p.*, """
    + _COST_SQL.format(a="p", gs="p.gs")
    + """ AS minor
    FROM priced p
), lines AS (
    INSERT INTO billing_ledgerentry (organization_id, kind, amount_minor, currency,
        reservation_id, period_start, period_end, gpu_seconds, idempotency_key, description,
        created_at)
    SELECT p.organization_id, 'usage', p.booked_minor - p.minor, p.currency, p.reservation_id,
           p.booked_until, p.period_end, p.gs - p.booked_gpu_seconds,
           'usage:' || p.reservation_id || ':to:'
               || (extract(epoch FROM p.bound) * 1000000)::bigint,
           (p.gs - p.booked_gpu_seconds) || ' GPU-seconds at ' || p.price_per_gpu_hour
               || '/GPU-hour' || %(why)s,
           %(created)s
    FROM costed p
    WHERE p.minor <> p.booked_minor OR p.gs <> p.booked_gpu_seconds
    ORDER BY p.reservation_id
    ON CONFLICT (idempotency_key) DO NOTHING
    RETURNING id, reservation_id, organization_id, amount_minor, gpu_seconds, currency
), moved AS (
    UPDATE billing_usageaccrual a
    SET booked_minor = p.minor, booked_gpu_seconds = p.gs,
        booked_until = greatest(a.booked_until, p.period_end)
    FROM costed p
    WHERE a.reservation_id = p.reservation_id
      AND ((p.minor = p.booked_minor AND p.gs = p.booked_gpu_seconds)
           OR p.reservation_id IN (SELECT reservation_id FROM lines))
    RETURNING a.reservation_id
)
SELECT l.id, p.reservation_id, l.organization_id, l.amount_minor, l.gpu_seconds, l.currency,
       (SELECT count(*) FROM moved), p.cut
FROM costed p LEFT JOIN lines l USING (reservation_id)
WHERE l.id IS NOT NULL OR p.cut
ORDER BY p.reservation_id
"""
)
# The metering run's scope: every accrual due, locked by this statement (the columns read
# above are those of the locked row, however recently a state change wrote it), skipping what a
# state change holds — its reservation or its accrual: that one books itself, and the run then
# never waits on a transaction that waits on it. Held until the run commits, the key-share
# lock also keeps a transition from starting on a reservation the run is booking (the ledger's
# foreign keys would otherwise wait on it at commit while it waited on the accrual's lock).
_RUN_SCOPE = (
    "{due}\n    ORDER BY a.reservation_id\n"
    "    FOR UPDATE OF a SKIP LOCKED FOR KEY SHARE OF r SKIP LOCKED"
)
# A state change's scope: its reservations, whose rows the caller holds; their accruals are
# locked by the statement before this one, so this one sees them as last written.
_IDS_SCOPE = "a.reservation_id IN (SELECT unnest(%(ids)s::bigint[]))"

_CLOSE_SQL = """
UPDATE billing_usageaccrual a SET closed_at = %(now)s
FROM marketplace_reservation r
WHERE r.id = a.reservation_id AND a.closed_at IS NULL
  AND least(coalesce(r.released_at, r.ends_at), r.ends_at) < %(settled)s
  AND a.accrued_until >= least(coalesce(r.released_at, r.ends_at), r.ends_at)
  AND a.accrued_minor = a.booked_minor AND a.gpu_seconds = a.booked_gpu_seconds
"""

# Reservations released within this window are still accrued (an outage recorded late gives
# its money back) before their accrual is closed.
RECENTLY_RELEASED = timedelta(days=2)


@dataclass(frozen=True)
class BookedUsage:
    """One usage line written by usage_book (amount signed as in the ledger: a charge < 0)."""

    entry_id: int
    reservation_id: int
    organization_id: int
    amount_minor: int
    gpu_seconds: int
    currency: str


def _params(now: datetime, **more) -> dict:
    return {"now": now, "zero_decimal": sorted(ZERO_DECIMAL_CURRENCIES), **more}


def usage_accruals_open(*, reservation_ids: list[int] | None = None) -> int:
    """Open an accrual for every started metered reservation that has none (all running ones,
    or the given ones whatever their status). Returns how many were opened."""
    if reservation_ids is not None:
        where, lock = "AND r.id = ANY(%(ids)s)", ""
    else:
        # Reservations in a state change (their row locked) are left to it.
        where, lock = "AND r.status IN ('active', 'releasing')", _SKIP_MOVING
    with connection.cursor() as cur:
        cur.execute(
            _OPEN_SQL.format(where=where, lock=lock),
            {"tiers": [str(t) for t in METERED_TIERS], "ids": list(reservation_ids or [])},
        )
        return cur.rowcount


def usage_accrue(*, now: datetime, reservation_ids: list[int] | None = None) -> int:
    """Set every open accrual (or the given ones) to what was delivered up to `now`: one
    statement. Idempotent, and never moves an accrual back to an earlier instant."""
    if reservation_ids is not None:
        only, skip = "AND a.reservation_id = ANY(%(ids)s)", ""
    else:
        # The whole set: an accrual a state change is booking is left to it (it accrues and
        # books that one itself), so the run never waits on one.
        only, skip = "", "SKIP LOCKED"
    with transaction.atomic(), connection.cursor() as cur:
        if reservation_ids is None:
            cur.execute(_SET_OPERATIONS)
        cur.execute(
            _ACCRUE_SQL.format(
                only=only, skip=skip, **(_OUTS_ALL if reservation_ids is None else _OUTS_IDS)
            ),
            _params(now, ids=list(reservation_ids or [])),
        )
        return cur.rowcount


@transaction.atomic
def usage_book(
    *, now: datetime, reservation_ids: list[int] | None = None, reason: str = ""
) -> list[BookedUsage]:
    """The one writer of usage lines: book what is accrued and not yet in the ledger.

    Without `reservation_ids` (the metering run): every open accrual not booked since the hour
    began is booked up to the hour (one line per reservation and hour) once the run reaches its
    minute of the hour (reservation id % settings.BILLING_USAGE_BOOK_SPREAD_MINUTES, or at once
    if the hour before is unbooked too), and every ended one up to its end. With them (a state change, an extension, a price change): those are booked up
    to `now`. The accruals are locked (in id order) for the transaction, so a run and a state
    change, or two runs, book each second once; their holds are filled from the new lines in
    the same transaction. Returns the lines written.
    """
    hour = now.replace(minute=0, second=0, microsecond=0)
    params = _params(
        now,
        hour=hour,
        minute=now.minute,
        spread=settings.BILLING_USAGE_BOOK_SPREAD_MINUTES,
        ids=list(reservation_ids or []),
        to_now=reservation_ids is not None,
        why=f" ({reason})" if reason else "",
        created=timezone.now(),
    )
    with connection.cursor() as cur:
        if reservation_ids is None:
            sql = _BOOK_SQL.format(scope=_RUN_SCOPE.format(due=_DUE_HOURLY), **_OUTS_ALL)
            cur.execute(_SET_OPERATIONS)
            cur.execute(sql, params)
        else:
            cur.execute(_IDS_LOCK_SQL, params)
            if not cur.fetchall():
                return []
            cur.execute(_BOOK_SQL.format(scope=_IDS_SCOPE, **_OUTS_IDS), params)
        rows = cur.fetchall()
        # A line that would cross a UTC midnight (an end or a state change before the last
        # hour's line was booked, or runs that stopped for a day) was cut at the first one (a
        # row with or without a line), so every line stays in one UTC day and month (the
        # usage API counts it by day, the SLA by month, where it was used); the rest is booked
        # on, a day a pass, up to where it was to end.
        cut = sorted({row[1] for row in rows if row[7]})
        for _day in range(_MAX_DAYS_A_RUN):
            if not cut:
                break
            cur.execute(_IDS_LOCK_SQL, {**params, "ids": cut})
            cur.fetchall()
            cur.execute(_BOOK_SQL.format(scope=_IDS_SCOPE, **_OUTS_IDS), {**params, "ids": cut})
            more = cur.fetchall()
            rows += more
            cut = sorted({row[1] for row in more if row[7]})
        lines = [BookedUsage(*row[:6]) for row in rows if row[0] is not None]
    if lines:
        charged = sorted({line.reservation_id for line in lines})
        # In this transaction: the gate sees a charge and the hold it fills together.
        holds_charge(reservation_ids=charged)
        # Time bought from a resale listing: its seller is credited what was just charged.
        resale_proceeds_book(reservation_ids=charged)
    return lines


def usage_accruals_close(*, now: datetime) -> int:
    """Close the accruals of reservations that ended more than RECENTLY_RELEASED ago and are
    booked in full: the run no longer looks at them."""
    with connection.cursor() as cur:
        cur.execute(_CLOSE_SQL, {"now": now, "settled": now - RECENTLY_RELEASED})
        return cur.rowcount


@transaction.atomic
def usage_price_change(
    *, reservation_id: int, price_per_gpu_hour: Decimal, now: datetime | None = None
) -> list[BookedUsage]:
    """A running reservation's price changes at `now`: what it accrued so far is booked at the
    old price first, and only the GPU-seconds after `now` are priced at the new one (the caller
    holds the reservation's row lock and writes its new price)."""
    if isinstance(price_per_gpu_hour, float):
        raise TypeError("price_per_gpu_hour must be Decimal, not float")
    lines = reservations_book_now(reservation_ids=[reservation_id], now=now, reason="price change")

    UsageAccrual.objects.filter(reservation_id=reservation_id).update(
        price_from_gpu_seconds=models.F("booked_gpu_seconds"),
        price_from_minor=models.F("booked_minor"),
        price_per_gpu_hour=price_per_gpu_hour,
    )
    return lines


def reservations_book_now(
    *, reservation_ids: list[int], now: datetime | None = None, reason: str = ""
) -> list[BookedUsage]:
    """Book these reservations' usage up to `now` (a state change, an extension, a stop): open
    their accruals if they have none, accrue them, book, in the caller's transaction."""
    now = now or timezone.now()
    ids = sorted(set(reservation_ids))
    with transaction.atomic():
        usage_accruals_open(reservation_ids=ids)
        usage_accrue(now=now, reservation_ids=ids)
        return usage_book(now=now, reservation_ids=ids, reason=reason)


@transaction.atomic
def reservations_meter(*, reservation_ids: list[int], now: datetime | None = None) -> int:
    """Charge reserved terms due and book metered reservations' usage up to `now`. Returns the
    number of usage lines written."""
    now = now or timezone.now()
    reservations = list(
        Reservation.objects.select_for_update()
        .filter(pk__in=reservation_ids)
        .order_by("pk")
        .only("pk", "tier", "status", "activated_at", "organization_id", "total_amount")
    )
    for reservation in reservations:
        if reservation.tier == Tier.RESERVED:
            _charge_reserved_term(reservation)
    metered = [r.pk for r in reservations if r.tier in METERED_TIERS and r.activated_at]
    if not metered:
        return 0
    return len(reservations_book_now(reservation_ids=metered, now=now))


def reservation_meter(*, reservation_id: int, now: datetime | None = None) -> LedgerEntry | None:
    """Bring one reservation's charges up to `now`. Returns the entry written, if any."""
    now = now or timezone.now()
    reservation = Reservation.objects.only("tier").get(pk=reservation_id)
    if reservation.tier == Tier.RESERVED:
        with transaction.atomic():
            locked = Reservation.objects.select_for_update().get(pk=reservation_id)
            return _charge_reserved_term(locked)
    with transaction.atomic():
        Reservation.objects.select_for_update().filter(pk=reservation_id).first()
        lines = reservations_book_now(reservation_ids=[reservation_id], now=now)
    return LedgerEntry.objects.get(pk=lines[0].entry_id) if lines else None


def _charge_reserved_term(reservation: Reservation) -> LedgerEntry | None:
    if reservation.status not in CHARGED_RESERVED_STATUSES:
        return None
    entry = reserved_base_charge(reservation, reservation.total_amount)
    holds_charge(reservation_ids=[reservation.pk])
    return entry


def reserved_base_charge(
    reservation: Reservation, total: Decimal, *, ends_at: datetime | None = None
) -> LedgerEntry | None:
    """The term as booked, charged once (key reserved:<id>); extensions are charged apart.
    Its period is the booked one: to `ends_at`, the end before an extension being charged."""
    entry, created = ledger_entry_add(
        organization=reservation.organization,
        kind=LedgerKind.RESERVED_CHARGE,
        amount_minor=-to_minor_units(total, reservation.currency),
        currency=reservation.currency,
        idempotency_key=f"reserved:{reservation.pk}",
        reservation=reservation,
        period_start=reservation.starts_at,
        period_end=ends_at or reservation.ends_at,
        description=f"Reserved term {reservation.term}, {reservation.gpu_count} GPU(s)",
    )
    return entry if created else None


def reserved_extension_charge(
    *, reservation: Reservation, old_ends_at: datetime, old_total: Decimal, extra_minor: int
) -> None:
    """Charge a reserved term's extension at once: the term as booked first (if the meter has
    not yet), then the difference, each once and each for its own period (the extension's from
    the old end to the new); the reservation row is locked by the caller."""
    reserved_base_charge(reservation, old_total, ends_at=old_ends_at)
    if extra_minor > 0:
        end = reservation.ends_at.isoformat()
        ledger_entry_add(
            organization=reservation.organization,
            kind=LedgerKind.RESERVED_CHARGE,
            amount_minor=-extra_minor,
            currency=reservation.currency,
            idempotency_key=f"reserved:{reservation.pk}:extension:{end}",
            reservation=reservation,
            period_start=old_ends_at,
            period_end=reservation.ends_at,
            description=f"Reserved term extended to {end}, {reservation.gpu_count} GPU(s)",
        )
    holds_charge(reservation_ids=[reservation.pk])


def reserved_terms_to_charge() -> list[int]:
    """Ids of reserved terms booked and not yet charged (the meter charges them once)."""
    charged = LedgerEntry.objects.filter(
        kind=LedgerKind.RESERVED_CHARGE, reservation_id=OuterRef("pk")
    )
    return list(
        Reservation.objects.filter(tier=Tier.RESERVED, status__in=CHARGED_RESERVED_STATUSES)
        .filter(~Exists(charged))
        .order_by("pk")
        .values_list("pk", flat=True)
    )
