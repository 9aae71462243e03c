"""Work on a failed GPU is moved to healthy GPUs, or ended and refunded; never billed.

The inventory marks a GPU failed (its health rules, or its agent) and opens an outage for that
GPU alone. This side, run after that commit and every 30 s by beat, handles each live
reservation holding a failed GPU, under its row lock:

- active: the time from the failure is recorded as a reservation outage (billing excludes it;
  the monthly SLA credit counts it). The failed GPU's allocation is moved to a healthy GPU of
  the same model at the same site; the reservation goes active → provisioning with the reason
  as its notice and history entry, and the provisioning worker restarts the workload on its
  new placement and writes the new connection details. The outage closes when it is active
  again (`reservation_gpu_outages_close`).
- pending or scheduled: the allocation is moved; the history records it (same status).
- provisioning: moved, and sent back to scheduled so the worker starts on the new placement.
- No healthy GPU to move to: the reservation fails. Metered tiers are charged only for
  delivered time; a reserved term gets its undelivered share back (written as the
  reservation's cancellation terms, which billing settles as a credit), or all of it if it
  never ran. The outage stays on record for the SLA credit.
- releasing: it is ending anyway; only the outage is recorded.

Only the hours the reservation itself holds on the failed GPUs from now on are replaced: a
reserved term that resold a window of a GPU gets replacements before and after it, its buyer
for the window (through its own reservation). A reservation not on a failed GPU at this
moment (its seller's, while the buyer runs on it) is not down: no outage, no restart.
"""

import logging
from datetime import datetime
from decimal import Decimal

from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Greatest
from django.utils import timezone

from config.dates import iso_utc
from config.errors import NotAvailable
from inventory.models import GpuHealth, Outage, OutageCause
from marketplace.models import (
    LIVE_STATUSES,
    Allocation,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    ReservationTransition,
    Tier,
)
from marketplace.models.events import EventType
from marketplace.provisioning.kicks import provisioning_kick, release_kick
from marketplace.provisioning.services import allocations_end, placement_generation_raise
from marketplace.selectors.resale import term_unused_amount
from marketplace.selectors.reservations import reservation_active_again_at
from marketplace.services.allocation import allocation_place
from marketplace.services.events import reservation_event_record
from marketplace.services.resale import listings_withdraw_unheld
from marketplace.services.transitions import reservation_transition

__all__ = [
    "ACTOR",
    "reservation_gpu_failure_handle",
    "gpu_failures_handle",
    "reservation_gpu_outages_close",
    "undelivered_refund",
]

logger = logging.getLogger(__name__)
ACTOR = "system: GPU health"


def _failed_live_allocations(reservation: Reservation):
    return (
        Allocation.objects.filter(
            reservation=reservation, is_live=True, gpu__health=GpuHealth.FAILED
        )
        .select_related("gpu", "node")
        .order_by("node_id", "gpu__index")
    )


def _end(allocations, *, now: datetime) -> None:
    allocations_end(Allocation.objects.filter(pk__in=[a.pk for a in allocations]), now=now)


def undelivered_refund(reservation: Reservation, *, since: datetime) -> Decimal:
    """The reserved term's price for [since, end) not delivered, less what of it was resold
    (its buyer keeps that time and pays the holder for it): the one rule cancelling uses too
    (marketplace.selectors.resale.term_unused_amount)."""
    return term_unused_amount(reservation, since=since)


@transaction.atomic
def reservation_gpu_failure_handle(*, reservation_id: int, now: datetime | None = None) -> str:
    """Move or end one reservation holding a failed GPU; returns what was done.

    In phases: its outage is recorded (once it has run), then the failed GPUs are replaced at
    its site and the move recorded, or, with none free, the reservation ends."""
    now = now or timezone.now()
    locked = Reservation.objects.select_for_update().get(pk=reservation_id)
    if locked.status not in LIVE_STATUSES:
        return "not live"
    failed = list(_failed_live_allocations(locked))
    if not failed:
        return "nothing failed"
    outages = {
        o.gpu_id: o
        for o in Outage.objects.filter(gpu_id__in=[a.gpu_id for a in failed], ended_at=None)
    }
    failed_at = min((o.started_at for o in outages.values()), default=now)
    what = ", ".join(f"{a.node.hostname}/gpu{a.gpu.index}" for a in failed)
    why = "; ".join(sorted({a.gpu.health_reason or "reported failed" for a in failed}))
    cause = f"GPU {what} failed ({why})"
    # Only a GPU the reservation holds now is down for it: a seller whose failed GPU is the
    # buyer's at this moment loses nothing until its own later hours, which are moved.
    current = [a for a in failed if a.period.lower <= now < a.period.upper]
    _failure_outages_record(locked, current, outages, cause=cause, now=now)
    if locked.status == ReservationStatus.RELEASING:
        return "releasing: outage recorded"
    placed = _failed_gpus_replace(locked, failed, now=now)
    if placed is None:
        return _end_reservation(
            locked, cause=cause, failed_at=failed_at, now=now, kick=release_kick
        )
    if not placed and not current:
        return "nothing to move"  # its hours on the failed GPUs are over: ended, as held
    # Its open listings of the failed GPUs can no longer be sold (it holds others now).
    listings_withdraw_unheld(reservation=locked)
    # One being provisioned starts again on its new placement whatever GPU failed.
    restart = bool(current) or locked.status == ReservationStatus.PROVISIONING
    _reservation_moved_record(locked, placed, cause=cause, restart=restart)
    where = ", ".join(f"{a.node.hostname}/gpu{a.gpu_id}" for a in placed)
    logger.warning("reservation %s moved off failed GPU(s) %s to %s", locked.public_id, what, where)
    return "moved"


def _failure_outages_record(
    locked: Reservation, failed: list, outages: dict, *, cause: str, now: datetime
) -> None:
    """An outage of the reservation per node of a failed GPU (unless one is open), from the
    GPU's outage (not before the reservation became active); none before it ran."""
    if (
        locked.status not in (ReservationStatus.ACTIVE, ReservationStatus.RELEASING)
        or locked.activated_at is None
    ):
        return
    for allocation in failed:
        if ReservationOutage.objects.filter(
            reservation=locked, node=allocation.node, ended_at=None
        ).exists():
            continue
        outage = outages.get(allocation.gpu_id)
        ReservationOutage.objects.create(
            reservation=locked,
            node=allocation.node,
            source_outage=outage,
            started_at=max(outage.started_at if outage else now, locked.activated_at),
            cause=OutageCause.GPU_FAILURE,
            detail=cause,
        )


def _failed_gpus_replace(locked: Reservation, failed: list, *, now: datetime) -> list | None:
    """End the failed GPUs' allocations and place as many GPUs at the site for the hours the
    reservation itself held on them from now (or its start): not the term's whole span, so a
    seller is not given GPUs again for a window it sold (its buyer holds those hours and is
    moved by its own failure). None, with nothing changed, when the site has none free for
    any of those hours."""
    try:
        with transaction.atomic():
            _end(failed, now=now)
            placed = []
            for (starts_at, ends_at), gpu_count in _held_pieces(locked, failed, now=now).items():
                placed += allocation_place(
                    reservation=locked,
                    site_id=locked.site_id,
                    gpu_model_id=locked.gpu_model_id,
                    gpu_count=gpu_count,
                    starts_at=starts_at,
                    ends_at=ends_at,
                    moved=True,  # the failed GPUs' load leaves the site as theirs arrives
                )
            return placed
    except NotAvailable:
        return None


def _held_pieces(
    locked: Reservation, failed: list, *, now: datetime
) -> dict[tuple[datetime, datetime], int]:
    """The periods still to come of the failed allocations, each with how many GPUs held it
    (GPUs, not rows: a GPU whose time was partly resold has a row before and after)."""
    gpus: dict[tuple[datetime, datetime], set[int]] = {}
    for allocation in failed:
        starts_at = max(allocation.period.lower, now, locked.starts_at)
        ends_at = min(allocation.period.upper, locked.ends_at)
        if starts_at < ends_at:
            gpus.setdefault((starts_at, ends_at), set()).add(allocation.gpu_id)
    return {period: len(ids) for period, ids in sorted(gpus.items())}


def _reservation_moved_record(
    locked: Reservation, placed: list, *, cause: str, restart: bool = True
) -> None:
    """The move on new GPUs: a new placement generation; an active reservation restarts its
    workload there and one being provisioned starts again (both through the worker), one not
    started yet, or not on a failed GPU now (`restart` false: only later hours moved), only
    records it; the reservation.moved event. A running one whose moved hours are all to come
    keeps its generation: the dispatcher restarts it when its GPUs change, as at a sold
    window's edge."""
    running = locked.status in (ReservationStatus.ACTIVE, ReservationStatus.PROVISIONING)
    if restart or not running:
        placement_generation_raise(locked)
    gpus = len({a.gpu_id for a in placed})
    moved = f"{cause}; moved to {gpus} healthy GPU(s) at {locked.site.slug}"
    if restart and locked.status == ReservationStatus.ACTIVE:
        reservation_transition(
            reservation=locked,
            to_status=ReservationStatus.PROVISIONING,
            cause=f"{moved}; the workload restarts there and the time since the failure is "
            "not billed",
            actor_label=ACTOR,
        )
        provisioning_kick(locked.pk)
    elif restart and locked.status == ReservationStatus.PROVISIONING:
        reservation_transition(
            reservation=locked,
            to_status=ReservationStatus.SCHEDULED,
            cause=moved,
            actor_label=ACTOR,
        )
        provisioning_kick(locked.pk)
    else:
        ReservationTransition.objects.create(
            reservation=locked,
            from_status=locked.status,
            to_status=locked.status,
            cause=moved,
            actor_label=ACTOR,
        )
    reservation_event_record(reservation=locked, type=EventType.RESERVATION_MOVED)


def _end_reservation(
    locked: Reservation, *, cause: str, failed_at: datetime, now: datetime, kick
) -> str:
    was_active = locked.activated_at is not None
    if locked.tier == Tier.RESERVED and was_active:
        refund = undelivered_refund(locked, since=failed_at)
        locked.cancellation = {
            "rule": "GPU failure with no healthy GPU to move to: the undelivered share of the "
            "term is refunded",
            "refund_amount": str(refund),
            "failed_at": iso_utc(failed_at),
        }
        locked.save(update_fields=["cancellation", "updated_at"])
    ended = reservation_transition(
        reservation=locked,
        to_status=ReservationStatus.FAILED,
        cause=f"{cause}; no healthy GPU of this model free at {locked.site.slug}: the "
        "reservation ends, undelivered time is not charged"
        + (" and the reserved term's rest is refunded" if locked.tier == Tier.RESERVED else ""),
        actor_label=ACTOR,
    )
    ReservationOutage.objects.filter(reservation=ended, ended_at=None).update(
        ended_at=Greatest(F("started_at"), Value(ended.released_at))
    )
    if was_active:
        kick(ended.pk)  # stop the workload on its other GPUs
    return "ended"


def reservation_gpu_outages_close(*, now: datetime | None = None) -> int:
    """Close GPU-failure outages of reservations that are active again: at the moment the
    restarted workload became active (its transition), so billing resumes from then."""
    closed = 0
    open_outages = ReservationOutage.objects.filter(
        ended_at=None, cause=OutageCause.GPU_FAILURE, reservation__status=ReservationStatus.ACTIVE
    ).select_related("reservation")
    for outage in open_outages:
        back = reservation_active_again_at(outage)
        if back is not None:
            closed += ReservationOutage.objects.filter(pk=outage.pk, ended_at=None).update(
                ended_at=back
            )
    return closed


def gpu_failures_handle(*, now: datetime | None = None, limit: int = 200) -> dict:
    """The sweep: every live reservation holding a failed GPU, then outages to close."""
    ids = list(
        Allocation.objects.filter(
            is_live=True, gpu__health=GpuHealth.FAILED, reservation__status__in=LIVE_STATUSES
        )
        .order_by("reservation_id")
        .values_list("reservation_id", flat=True)
        .distinct()[:limit]
    )
    done: dict[str, int] = {}
    for reservation_id in ids:
        outcome = reservation_gpu_failure_handle(reservation_id=reservation_id, now=now)
        done[outcome] = done.get(outcome, 0) + 1
    done["outages_closed"] = reservation_gpu_outages_close(now=now)
    return done
