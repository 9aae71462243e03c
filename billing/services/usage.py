"""Metering: usage by the second from each reservation's delivered time, into the ledger.

Billable time of a reservation = [activated_at, min(released_at or now, ends_at)) minus every
outage of any node serving it (inventory.Outage rows, open outages running to now). Time
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

from datetime import datetime

from django.db import transaction
from django.db.models import Max, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.money import to_minor_units, usage_cost_minor
from billing.services.ledger import ledger_entry_add
from inventory.models import Outage
from marketplace.models import Allocation, Reservation, ReservationStatus, Tier

__all__ = [
    "METERED_TIERS",
    "CHARGED_RESERVED_STATUSES",
    "interval_union",
    "outage_intervals",
    "reservation_delivered_seconds",
    "reservation_meter",
    "reservations_to_meter",
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
    """Union of outages on the reservation's nodes (any node down = the reservation is down)."""
    node_ids = Allocation.objects.filter(reservation=reservation).values("node_id")
    rows = Outage.objects.filter(node_id__in=node_ids, started_at__lt=until).filter(
        Q(ended_at__isnull=True) | Q(ended_at__gt=reservation.activated_at or until)
    )
    return interval_union([(o.started_at, min(o.ended_at or until, until)) for o in rows])


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


@transaction.atomic
def reservation_meter(*, reservation_id: int, now: datetime | None = None) -> LedgerEntry | None:
    """Bring one reservation's charges up to `now`. Returns the entry written, if any."""
    now = (now or timezone.now()).replace(microsecond=0)
    reservation = Reservation.objects.select_for_update().get(pk=reservation_id)
    if reservation.tier == Tier.RESERVED:
        return _charge_reserved_term(reservation)
    if reservation.tier not in METERED_TIERS:
        return None
    seconds = reservation_delivered_seconds(reservation=reservation, until=now)
    gpu_seconds = seconds * reservation.gpu_count
    cost_minor = usage_cost_minor(
        gpu_seconds=gpu_seconds,
        price_per_gpu_hour=reservation.price_per_gpu_hour,
        currency=reservation.currency,
    )
    charged = LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.USAGE).aggregate(
        amount=Coalesce(Sum("amount_minor"), 0),
        gpu_seconds=Coalesce(Sum("gpu_seconds"), 0),
        last=Max("period_end"),
    )
    delta_minor = -cost_minor - charged["amount"]
    delta_seconds = gpu_seconds - charged["gpu_seconds"]
    if delta_minor == 0 and delta_seconds == 0:
        return None
    period_start = charged["last"] or reservation.activated_at or now
    period_end = max(min(now, reservation.released_at or now, reservation.ends_at), period_start)
    entry, _ = ledger_entry_add(
        organization=reservation.organization,
        kind=LedgerKind.USAGE,
        amount_minor=delta_minor,
        currency=reservation.currency,
        idempotency_key=f"usage:{reservation.pk}:{int(now.timestamp())}",
        reservation=reservation,
        period_start=period_start,
        period_end=period_end,
        gpu_seconds=delta_seconds,
        description=f"{delta_seconds} GPU-seconds at {reservation.price_per_gpu_hour}/GPU-hour",
    )
    return entry


def _charge_reserved_term(reservation: Reservation) -> LedgerEntry | None:
    if reservation.status not in CHARGED_RESERVED_STATUSES:
        return None
    entry, created = ledger_entry_add(
        organization=reservation.organization,
        kind=LedgerKind.RESERVED_CHARGE,
        amount_minor=-to_minor_units(reservation.total_amount, reservation.currency),
        currency=reservation.currency,
        idempotency_key=f"reserved:{reservation.pk}",
        reservation=reservation,
        period_start=reservation.starts_at,
        period_end=reservation.ends_at,
        description=f"Reserved term {reservation.term}, {reservation.gpu_count} GPU(s)",
    )
    return entry if created else None


def reservations_to_meter(*, now: datetime, since: datetime) -> list[int]:
    """Ids of reservations that may owe something: delivering now, or ended since `since`."""
    metered = Reservation.objects.filter(tier__in=METERED_TIERS, activated_at__isnull=False).filter(
        Q(released_at__isnull=True) | Q(released_at__gte=since)
    )
    reserved = Reservation.objects.filter(
        tier=Tier.RESERVED, status__in=CHARGED_RESERVED_STATUSES
    ).exclude(
        id__in=LedgerEntry.objects.filter(kind=LedgerKind.RESERVED_CHARGE).values("reservation_id")
    )
    return sorted(
        set(metered.values_list("id", flat=True)) | set(reserved.values_list("id", flat=True))
    )
