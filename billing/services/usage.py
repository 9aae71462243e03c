"""Metering: usage by the second from each reservation's delivered time, into the ledger.

Billable time of a reservation = [activated_at, min(released_at or now, ends_at)) minus every
outage that hit it: the reservation's own outages (marketplace ReservationOutage, recorded by
provisioning) and every inventory Outage of a node serving it, as one union (open outages run
to now; an interval in both sources is excluded once). Time
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

from collections import defaultdict
from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.db.models import Max, Q, Sum
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.money import to_minor_units, usage_cost_minor
from billing.services.holds import holds_charge
from billing.services.ledger import ledger_entry_add
from inventory.models import Outage
from marketplace.models import (
    Allocation,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    Tier,
)

__all__ = [
    "METERED_TIERS",
    "CHARGED_RESERVED_STATUSES",
    "interval_union",
    "outage_intervals",
    "reservation_delivered_seconds",
    "reservation_meter",
    "reservations_meter",
    "reservations_to_meter",
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


def _overlap_seconds(intervals: list[Interval], start: datetime, end: datetime) -> int:
    total = 0
    for a, b in intervals:
        lo, hi = max(a, start), min(b, end)
        if hi > lo:
            total += int((hi - lo).total_seconds())
    return total


def outage_intervals(*, reservation: Reservation, until: datetime) -> list[Interval]:
    """Union of the reservation's outages and its nodes' (any node down = it is down)."""
    since = reservation.activated_at or until
    live = Q(started_at__lt=until) & (Q(ended_at__isnull=True) | Q(ended_at__gt=since))
    node_ids = Allocation.objects.filter(reservation=reservation).values("node_id")
    # Node outages only: a GPU's own outage (Outage.gpu) reaches the reservations on that GPU
    # as ReservationOutage rows (marketplace.services.gpu_failures), not every one on its node.
    rows = list(
        Outage.objects.filter(live, node_id__in=node_ids, gpu=None).values_list(
            "started_at", "ended_at"
        )
    )
    rows += ReservationOutage.objects.filter(live, reservation=reservation).values_list(
        "started_at", "ended_at"
    )
    return interval_union([(start, min(end or until, until)) for start, end in rows])


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


def _delivered(reservation: Reservation, outages: list[Interval], until: datetime) -> int:
    window = active_window(reservation=reservation, until=until)
    if window is None:
        return 0
    lo, hi = window
    return int((hi - lo).total_seconds()) - _overlap_seconds(outages, lo, hi)


@transaction.atomic
def reservations_meter(*, reservation_ids: list[int], now: datetime | None = None) -> int:
    """Bring a batch of reservations' charges up to `now` in a handful of queries.

    Returns the number of usage lines written. The rows are locked (in id order) for the
    batch, so concurrent runs cannot both charge the same time.
    """
    now = (now or timezone.now()).replace(microsecond=0)
    reservations = list(
        Reservation.objects.select_for_update().filter(pk__in=reservation_ids).order_by("pk")
    )
    for reservation in reservations:
        if reservation.tier == Tier.RESERVED:
            _charge_reserved_term(reservation)
    metered = [r for r in reservations if r.tier in METERED_TIERS and r.activated_at is not None]
    if not metered:
        return 0
    written = _meter_usage(metered, now)
    # In this transaction: the gate sees a charge and the hold it fills together.
    holds_charge(reservation_ids=[r.pk for r in metered])
    return written


def _meter_usage(metered: list[Reservation], now: datetime) -> int:
    ids = [r.pk for r in metered]
    nodes_of: dict[int, set[int]] = defaultdict(set)
    for reservation_id, node_id in Allocation.objects.filter(reservation_id__in=ids).values_list(
        "reservation_id", "node_id"
    ):
        nodes_of[reservation_id].add(node_id)
    earliest = min(r.activated_at for r in metered)
    outages_of_node: dict[int, list[Interval]] = defaultdict(list)
    all_nodes = set().union(*nodes_of.values()) if nodes_of else set()
    for node_id, started, ended in (
        Outage.objects.filter(node_id__in=all_nodes, gpu=None, started_at__lt=now)
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=earliest))
        .values_list("node_id", "started_at", "ended_at")
    ):
        outages_of_node[node_id].append((started, min(ended or now, now)))
    charged = {
        row["reservation_id"]: row
        for row in LedgerEntry.objects.filter(reservation_id__in=ids, kind=LedgerKind.USAGE)
        .values("reservation_id")
        .annotate(
            amount=Sum("amount_minor"), gpu_seconds=Sum("gpu_seconds"), last=Max("period_end")
        )
    }
    own_outages: dict[int, list[Interval]] = defaultdict(list)
    for reservation_id, started, ended in (
        ReservationOutage.objects.filter(reservation_id__in=ids, started_at__lt=now)
        .filter(Q(ended_at__isnull=True) | Q(ended_at__gt=earliest))
        .values_list("reservation_id", "started_at", "ended_at")
    ):
        own_outages[reservation_id].append((started, min(ended or now, now)))
    entries = []
    for r in metered:
        outages = interval_union(
            [o for n in nodes_of[r.pk] for o in outages_of_node[n]] + own_outages[r.pk]
        )
        gpu_seconds = _delivered(r, outages, now) * r.gpu_count
        cost_minor = usage_cost_minor(
            gpu_seconds=gpu_seconds, price_per_gpu_hour=r.price_per_gpu_hour, currency=r.currency
        )
        done = charged.get(r.pk, {"amount": 0, "gpu_seconds": 0, "last": None})
        delta_minor = -cost_minor - done["amount"]
        delta_seconds = gpu_seconds - done["gpu_seconds"]
        if delta_minor == 0 and delta_seconds == 0:
            continue
        period_start = done["last"] or r.activated_at
        period_end = max(min(now, r.released_at or now, r.ends_at), period_start)
        entries.append(
            LedgerEntry(
                organization_id=r.organization_id,
                kind=LedgerKind.USAGE,
                amount_minor=delta_minor,
                currency=r.currency,
                idempotency_key=f"usage:{r.pk}:{int(now.timestamp())}",
                reservation_id=r.pk,
                period_start=period_start,
                period_end=period_end,
                gpu_seconds=delta_seconds,
                description=f"{delta_seconds} GPU-seconds at {r.price_per_gpu_hour}/GPU-hour",
            )
        )
    # Keys are unique: a line already written for this instant is left as it is.
    LedgerEntry.objects.bulk_create(entries, ignore_conflicts=True)
    return len(entries)


def reservation_meter(*, reservation_id: int, now: datetime | None = None) -> LedgerEntry | None:
    """Bring one reservation's charges up to `now`. Returns the entry written, if any."""
    now = (now or timezone.now()).replace(microsecond=0)
    reservation = Reservation.objects.only("tier").get(pk=reservation_id)
    if reservation.tier == Tier.RESERVED:
        with transaction.atomic():
            locked = Reservation.objects.select_for_update().get(pk=reservation_id)
            return _charge_reserved_term(locked)
    if not reservations_meter(reservation_ids=[reservation_id], now=now):
        return None
    return LedgerEntry.objects.get(idempotency_key=f"usage:{reservation_id}:{int(now.timestamp())}")


def _charge_reserved_term(reservation: Reservation) -> LedgerEntry | None:
    if reservation.status not in CHARGED_RESERVED_STATUSES:
        return None
    entry = reserved_base_charge(reservation, reservation.total_amount)
    holds_charge(reservation_ids=[reservation.pk])
    return entry


def reserved_base_charge(reservation: Reservation, total: Decimal) -> LedgerEntry | None:
    """The term as booked, charged once (key reserved:<id>); extensions are charged apart."""
    entry, created = ledger_entry_add(
        organization=reservation.organization,
        kind=LedgerKind.RESERVED_CHARGE,
        amount_minor=-to_minor_units(total, reservation.currency),
        currency=reservation.currency,
        idempotency_key=f"reserved:{reservation.pk}",
        reservation=reservation,
        period_start=reservation.starts_at,
        period_end=reservation.ends_at,
        description=f"Reserved term {reservation.term}, {reservation.gpu_count} GPU(s)",
    )
    return entry if created else None


def reserved_extension_charge(
    *, reservation: Reservation, old_total: Decimal, extra_minor: int
) -> None:
    """Charge a reserved term's extension at once: the term as booked first (if the meter has
    not yet), then the difference, each once; the reservation row is locked by the caller."""
    reserved_base_charge(reservation, old_total)
    if extra_minor > 0:
        end = reservation.ends_at.isoformat()
        ledger_entry_add(
            organization=reservation.organization,
            kind=LedgerKind.RESERVED_CHARGE,
            amount_minor=-extra_minor,
            currency=reservation.currency,
            idempotency_key=f"reserved:{reservation.pk}:extension:{end}",
            reservation=reservation,
            period_start=reservation.starts_at,
            period_end=reservation.ends_at,
            description=f"Reserved term extended to {end}, {reservation.gpu_count} GPU(s)",
        )
    holds_charge(reservation_ids=[reservation.pk])


def reservations_to_meter(*, now: datetime, since: datetime) -> list[int]:
    """Ids of reservations that may owe something: delivering now, or ended since `since`."""
    metered = (
        Reservation.objects.filter(tier__in=METERED_TIERS, activated_at__isnull=False)
        .filter(Q(released_at__isnull=True) | Q(released_at__gte=since))
        .exclude(ends_at__lt=since)
    )
    reserved = Reservation.objects.filter(
        tier=Tier.RESERVED, status__in=CHARGED_RESERVED_STATUSES
    ).exclude(
        id__in=LedgerEntry.objects.filter(kind=LedgerKind.RESERVED_CHARGE).values("reservation_id")
    )
    return sorted(
        set(metered.values_list("id", flat=True)) | set(reserved.values_list("id", flat=True))
    )
