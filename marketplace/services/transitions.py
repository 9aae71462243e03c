"""The reservation state machine, and the one writer of a reservation's status.

Every move records a ReservationTransition and, for the statuses customers care about, an
event (reservation.<status>) in the same transaction.

    pending ──► scheduled ──► provisioning ──► active ──► releasing ──► completed
       │            │  ▲            │             │            │
       │            │  └────────────┘ (driver     │            │
       │            │    retry: back to scheduled)│            │
       ▼            ▼               ▼             ▼            ▼
    cancelled / failed / preempted (see ALLOWED_TRANSITIONS for exactly which)

- pending: booked ahead; its GPUs are allocated (held) but the start is not due yet.
- scheduled: the start is due; the provisioning worker picks it up.
- provisioning → scheduled: a retryable driver failure gives the reservation back to the queue.
- Any live status may go to failed (terminal, with the reason in status_reason).
- preempted is only for the interruptible tier (curtailment); other tiers are protected.
- A customer "cancel" is pending/scheduled/provisioning → cancelled, or active → releasing
  (stop early); see marketplace.services.reservations.reservation_cancel.

Leaving the live statuses (LIVE_STATUSES) frees the GPUs: the allocations become
is_live = false, and where the reservation ends early (now inside an allocation's period) the
period's end is cut to now, so the record says which GPU time was actually held.
"""

from django.contrib.postgres.fields import DateTimeRangeField
from django.db import transaction
from django.db.models import F, Func, Value
from django.utils import timezone

from config.errors import InvalidTransition
from marketplace.models import (
    LIVE_STATUSES,
    Allocation,
    Reservation,
    ReservationStatus,
    ReservationTransition,
    Tier,
)
from marketplace.services.events import RESERVATION_STATUS_EVENTS, reservation_event_record

__all__ = [
    "ALLOWED_TRANSITIONS",
    "TERMINAL_STATUSES",
    "PREEMPTIBLE_STATUSES",
    "reservation_transition",
    "reservation_transition_check",
    "reservation_allowed_actions",
    "reservation_action_refusal",
]

S = ReservationStatus

ALLOWED_TRANSITIONS: dict[str, set[str]] = {
    S.PENDING: {S.SCHEDULED, S.CANCELLED, S.FAILED, S.PREEMPTED},
    S.SCHEDULED: {S.PROVISIONING, S.CANCELLED, S.FAILED, S.PREEMPTED},
    S.PROVISIONING: {S.ACTIVE, S.SCHEDULED, S.CANCELLED, S.FAILED, S.PREEMPTED},
    # active → provisioning: moved off a failed GPU, restarted on healthy ones (gpu_failures).
    S.ACTIVE: {S.RELEASING, S.PREEMPTED, S.FAILED, S.PROVISIONING},
    S.RELEASING: {S.COMPLETED, S.FAILED},
    S.COMPLETED: set(),
    S.CANCELLED: set(),
    S.FAILED: set(),
    S.PREEMPTED: set(),
}

TERMINAL_STATUSES = frozenset(s for s, targets in ALLOWED_TRANSITIONS.items() if not targets)
# Where preemption (a grid curtailment) can still reach a reservation: before its release.
PREEMPTIBLE_STATUSES = frozenset(
    s for s, targets in ALLOWED_TRANSITIONS.items() if S.PREEMPTED in targets
)
_LIVE = frozenset(LIVE_STATUSES)

# Customer-facing actions and the statuses in which they may be taken.
_CANCELLABLE = frozenset({S.PENDING, S.SCHEDULED, S.PROVISIONING, S.ACTIVE})
_EXTENDABLE = frozenset({S.PENDING, S.SCHEDULED, S.PROVISIONING, S.ACTIVE})


@transaction.atomic
def reservation_transition(
    *, reservation: Reservation, to_status: str, cause: str, actor_label: str
) -> Reservation:
    """Move a reservation to `to_status`, recording why and by whom.

    Locks the row first, so two workers cannot both take the same step; returns the fresh,
    updated row (the instance passed in is not modified).
    """
    # Only the reservation row is locked; its model, site and quote are read for the event.
    locked = (
        Reservation.objects.select_for_update(of=("self",))
        .select_related("gpu_model", "site", "quote")
        .get(pk=reservation.pk)
    )
    from_status = locked.status
    reservation_transition_check(from_status=from_status, to_status=to_status, tier=locked.tier)

    now = timezone.now()
    locked.status = to_status
    locked.status_reason = cause
    update_fields = ["status", "status_reason", "updated_at"]
    if to_status == S.ACTIVE and locked.activated_at is None:
        locked.activated_at = now
        update_fields.append("activated_at")
    if from_status in _LIVE and to_status not in _LIVE:
        locked.released_at = now
        update_fields.append("released_at")
        _free_allocations(reservation_id=locked.pk, now=now)
    locked.save(update_fields=update_fields)
    ReservationTransition.objects.create(
        reservation=locked,
        from_status=from_status,
        to_status=to_status,
        cause=cause,
        actor_label=actor_label,
    )
    event_type = RESERVATION_STATUS_EVENTS.get(to_status)
    if event_type:
        reservation_event_record(reservation=locked, type=event_type)
    return locked


def reservation_transition_check(*, from_status: str, to_status: str, tier: str) -> None:
    """Raise InvalidTransition unless the state machine allows this move (no database access).

    reservation_transition applies it; a caller that writes moves in its own SQL (the
    provisioning fast path) must apply it too, under the row lock.
    """
    if to_status not in S.values:
        raise InvalidTransition(f"Unknown reservation status {to_status!r}.", field="status")
    if to_status not in ALLOWED_TRANSITIONS[from_status]:
        raise InvalidTransition(
            f"A reservation cannot go from {from_status} to {to_status}.",
            code="invalid_transition",
        )
    if to_status == S.PREEMPTED and tier != Tier.INTERRUPTIBLE:
        raise InvalidTransition(
            f"Only interruptible reservations can be preempted; this one is {tier}.",
            code="not_preemptible",
        )


def _free_allocations(*, reservation_id: int, now) -> None:
    live = Allocation.objects.filter(reservation_id=reservation_id, is_live=True)
    # Ending early: keep [start, now) as the record of what was held. Allocations that had not
    # started (or had already ended) keep their period as booked.
    live.filter(period__startswith__lt=now, period__endswith__gt=now).update(
        period=Func(
            Func(F("period"), function="lower"),
            Value(now),
            Value("[)"),
            function="tstzrange",
            output_field=DateTimeRangeField(),
        ),
        is_live=False,
    )
    live.update(is_live=False)


def reservation_action_refusal(reservation: Reservation, action: str, *, at=None) -> str | None:
    """Why `action` ("cancel" or "extend") is not allowed now, or None when it is."""
    at = at or timezone.now()
    status = reservation.status
    if action == "cancel":
        if status not in _CANCELLABLE:
            return f"A {status} reservation cannot be cancelled."
        if status == S.ACTIVE and at >= reservation.ends_at:
            return "The reservation has already reached its end."
        return None
    if action == "extend":
        if status not in _EXTENDABLE:
            return f"A {status} reservation cannot be extended."
        if at >= reservation.ends_at:
            return "The reservation has already reached its end."
        return None
    return f"Unknown action {action!r}."


def reservation_allowed_actions(reservation: Reservation) -> list[str]:
    """The customer-facing actions allowed now, for the API and the portal to show."""
    now = timezone.now()
    return [
        a
        for a in ("cancel", "extend")
        if reservation_action_refusal(reservation, a, at=now) is None
    ]
