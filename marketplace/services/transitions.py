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
- preempted is only for the interruptible tier (curtailment); other tiers are protected,
  unless staff force a curtailment onto them with a reason (force_preemption).
- A customer "cancel" is pending/scheduled/provisioning → cancelled, or active → releasing
  (stop early); see marketplace.services.reservations.reservation_cancel.

Leaving the live statuses (LIVE_STATUSES) frees the GPUs: the allocations become
is_live = false, and where the reservation ends early (now inside an allocation's period) the
period's end is cut to now, so the record says which GPU time was actually held. Time bought
from a resale listing and left unused goes back to the seller's term in the same transaction
(marketplace.services.resale.resale_unused_return).

This module is the one writer of Reservation.status (reservation_transitions_write; the test
suite fails on any other): whatever must happen on every move (its history row, events) is
done there, for the provisioning fast path's batched moves as for single ones. Creating a
reservation sets its first status and history row (services/reservations.py); that is not a
move.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from config.errors import InvalidTransition
from marketplace.funding import funding_gate
from marketplace.models import (
    LIVE_STATUSES,
    Event,
    Reservation,
    ReservationStatus,
    Tier,
)
from marketplace.rules import ALLOWED_TRANSITIONS, PREEMPTIBLE_STATUSES, TERMINAL_STATUSES
from marketplace.services.events import RESERVATION_STATUS_EVENTS, reservation_event_build
from marketplace.services.resale import resale_return_lock, resale_unused_return
from marketplace.services.webhooks import webhook_deliveries_create_many

__all__ = [
    # The state machine's table (marketplace/rules.py, which the API's serializers read too),
    # named here beside its one writer.
    "ALLOWED_TRANSITIONS",
    "TERMINAL_STATUSES",
    "PREEMPTIBLE_STATUSES",
    "Piggyback",
    "reservation_transition",
    "reservation_transitions_write",
    "reservation_transition_check",
    "reservation_allowed_actions",
    "reservation_action_refusal",
    "extension_blocked_by_interruption",
]


_LIVE = frozenset(LIVE_STATUSES)

# Customer-facing actions and the statuses in which they may be taken.
_CANCELLABLE = frozenset(
    {
        ReservationStatus.PENDING,
        ReservationStatus.SCHEDULED,
        ReservationStatus.PROVISIONING,
        ReservationStatus.ACTIVE,
    }
)
_EXTENDABLE = frozenset(
    {
        ReservationStatus.PENDING,
        ReservationStatus.SCHEDULED,
        ReservationStatus.PROVISIONING,
        ReservationStatus.ACTIVE,
    }
)


@transaction.atomic
def reservation_transition(
    *,
    reservation: Reservation,
    to_status: str,
    cause: str,
    actor_label: str,
    fields: Mapping[str, Any] | None = None,
    force_preemption: bool = False,
) -> Reservation:
    """Move a reservation to `to_status`, recording why and by whom.

    Locks the row first, so two workers cannot both take the same step; returns the fresh,
    updated row (the instance passed in is not modified). `fields` are other Reservation
    fields written in the same statement (e.g. the connection details on activation).
    """
    # Only the reservation row is locked; its model, site and quote are read for the event.
    locked = (
        Reservation.objects.select_for_update(of=("self",))
        .select_related("gpu_model", "site", "quote")
        .get(pk=reservation.pk)
    )
    reservation_transitions_write(
        reservation=locked,
        moves=[(to_status, cause)],
        actor_label=actor_label,
        fields=fields,
        force_preemption=force_preemption,
    )
    return locked


@dataclass(frozen=True)
class Piggyback:
    """A caller's own statements, run in the same round trip as the status write.

    `ctes` are further common table expressions ("name AS (…), …"), which may read the write's
    `moved` (the reservation's id when the status was written, no row otherwise); `select` is
    the rest of the final SELECT after the write's own first column ("expr, … FROM …").
    Parameter names starting with "tr_" are the write's own.
    """

    ctes: str = ""
    select: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)


def reservation_transitions_write(
    *,
    reservation: Reservation,
    moves: Sequence[tuple[str, str]],
    actor_label: str,
    now: datetime | None = None,
    fields: Mapping[str, Any] | None = None,
    piggyback: Piggyback | None = None,
    force_preemption: bool = False,
) -> tuple[bool, tuple]:
    """The one writer of Reservation.status: take `moves` ((to_status, cause), in order) from
    `reservation.status`, each checked against the state machine first, in one statement.

    That statement writes the status, status_reason, activated_at (on reaching active, if not
    set), released_at and the freed allocations (on leaving the live statuses, as the module's
    docstring says), the `fields` given, one ReservationTransition per move and the event of
    each status customers follow (reservation.<status>, showing the reservation as it is after
    that move: pass it with its model, site and quote loaded); the caller's `piggyback`
    statements run with it. The row is written only while its status is still `reservation.status`, so a caller that
    read it without the row lock cannot overwrite a move made meanwhile. The batched form of
    reservation_transition, for a caller holding the row lock already (the provisioning fast
    path takes two or three moves in one round trip), or none at all.

    Returns whether the status was written (False also when `moves` is empty) and the
    piggyback's columns. `reservation` is updated in memory when it was written, and left as
    it was otherwise.
    """
    now = now or timezone.now()
    from_status = reservation.status
    to_status = _moves_check(reservation, moves, force_preemption=force_preemption)
    ends_live = bool(moves) and from_status in _LIVE and to_status not in _LIVE
    # The reservation as it is after each move, in memory: its events show it so. Put back as
    # it was unless the statement writes it.
    before = {name: vars(reservation)[name] for name in _MOVED_FIELDS if name in vars(reservation)}
    events = _moves_apply(
        reservation, moves, now=now, fields=fields, ends_live=ends_live, before=before
    )
    sql, params = _move_statement(
        reservation.pk,
        moves,
        from_status=from_status,
        actor_label=actor_label,
        now=now,
        fields=fields,
        ends_live=ends_live,
        events=events,
        piggyback=piggyback,
    )
    # Time bought from a listing and not used goes back to its seller in this transaction:
    # the seller's locks are taken before the statement frees (and so locks) the buyer's
    # GPUs, the return comes before the usage booking below locks billing accounts (the
    # lock order of marketplace.services.resale).
    sale = resale_return_lock(buyer=reservation, now=now) if ends_live else None
    written, row = _moves_execute(
        reservation, sql, params, events=events, before=before, fields=fields
    )
    if written and sale is not None:
        resale_unused_return(listing=sale, now=now)
    if written and from_status in _METERED_FROM and reservation.tier != Tier.RESERVED:
        # The clock stops or the work moves: money's owner books the usage up to this move,
        # in this transaction (marketplace.funding).
        funding_gate().reservation_status_changed(
            reservation=reservation, from_status=str(from_status), to_status=str(to_status), at=now
        )
    return written, tuple(row[2 if events else 1 :])


def _moves_check(
    reservation: Reservation, moves: Sequence[tuple[str, str]], *, force_preemption: bool
) -> str:
    """Each move checked against the state machine from the one before; the status reached."""
    step_from = reservation.status
    for to_status, _cause in moves:
        reservation_transition_check(
            from_status=step_from,
            to_status=to_status,
            tier=reservation.tier,
            force_preemption=force_preemption,
        )
        step_from = to_status
    return step_from


def _move_statement(
    reservation_id: int,
    moves: Sequence[tuple[str, str]],
    *,
    from_status: str,
    actor_label: str,
    now: datetime,
    fields: Mapping[str, Any] | None,
    ends_live: bool,
    events: list[Event],
    piggyback: Piggyback | None,
) -> tuple[str, dict[str, Any]]:
    """The one statement and its parameters: the row, the history rows, the freed GPUs when
    it leaves the live statuses, the events, and the caller's piggyback."""
    tos = [t for t, _c in moves]
    params: dict[str, Any] = {
        "tr_rid": reservation_id,
        "tr_from": str(from_status),
        "tr_to": str(tos[-1] if tos else from_status),
        "tr_reason": moves[-1][1] if moves else "",
        "tr_now": now,
        "tr_actor": actor_label,
        "tr_froms": [str(f) for f in ([from_status, *tos[:-1]] if tos else [])],
        "tr_tos": [str(t) for t in tos],
        "tr_causes": [c for _t, c in moves],
    }
    sets = []
    if ReservationStatus.ACTIVE in tos:
        sets.append("activated_at = coalesce(activated_at, %(tr_now)s)")
    if ends_live:
        # Kept when a customer's stop set it already: billing ended there, not at the teardown.
        sets.append("released_at = coalesce(released_at, %(tr_now)s)")
    for name, value in (fields or {}).items():
        model_field = Reservation._meta.get_field(name)
        params[f"tr_f_{model_field.column}"] = model_field.get_db_prep_save(value, connection)
        sets.append(f'"{model_field.column}" = %(tr_f_{model_field.column})s')
    ctes = [
        _MOVE_SQL.format(
            sets="".join(", " + s for s in sets), moving="" if moves else " AND false"
        ),
        _RECORD_SQL,
    ]
    if ends_live:
        ctes.append(_FREE_SQL)
    select = "SELECT (SELECT count(*) FROM moved)"
    if events:
        ctes.append(_events_sql(events, params))
        select += ", (SELECT json_object_agg(public_id, id) FROM evented)"
    if piggyback is not None:
        ctes += [piggyback.ctes] if piggyback.ctes else []
        select += ", " + piggyback.select if piggyback.select else ""
        params.update(piggyback.params)
    return "WITH " + ",\n".join(ctes) + "\n" + select, params


def _moves_apply(
    reservation: Reservation,
    moves: Sequence[tuple[str, str]],
    *,
    now: datetime,
    fields: Mapping[str, Any] | None,
    ends_live: bool,
    before: dict[str, Any],
) -> list[Event]:
    """Take the moves on the instance in memory, one by one, and build the event of each
    status customers follow as the reservation is after that move."""
    events = []
    for index, (step_to, step_cause) in enumerate(moves):
        values = {"status": step_to, "status_reason": step_cause, "updated_at": now}
        if (
            step_to == ReservationStatus.ACTIVE
            and "activated_at" in before
            and before["activated_at"] is None
        ):
            values["activated_at"] = now
        if index == len(moves) - 1:
            released = {"released_at": reservation.released_at or now} if ends_live else {}
            values.update(released, **(fields or {}))
        for name, value in values.items():
            setattr(reservation, name, value)
        event_type = RESERVATION_STATUS_EVENTS.get(step_to)
        if event_type:
            events.append(reservation_event_build(reservation=reservation, type=event_type))
    return events


def _moves_execute(
    reservation: Reservation,
    sql: str,
    params: dict[str, Any],
    *,
    events: list[Event],
    before: dict[str, Any],
    fields: Mapping[str, Any] | None,
) -> tuple[bool, tuple]:
    """Run the statement; whether it wrote the status, and its row. The events get their ids
    and webhook deliveries; the instance is put back as it was unless the status was written."""
    written = False
    try:
        # The events' webhook deliveries are written after the statement (one read of the
        # organisation's endpoints), in the same transaction.
        with transaction.atomic(savepoint=False), connection.cursor() as cur:
            cur.execute(sql, params)
            row = cur.fetchone()
            written = bool(row[0])
            if written and events:
                ids = row[1] if isinstance(row[1], dict) else json.loads(row[1])
                for event in events:
                    event.pk = ids[event.public_id]
                webhook_deliveries_create_many(events=events)
    finally:
        if not written:
            for name in (*_MOVED_FIELDS, *(fields or {})):
                vars(reservation).pop(name, None)
            vars(reservation).update(before)
    return written, row


# Moves out of these statuses end or interrupt time that is billed.
_METERED_FROM = frozenset({ReservationStatus.ACTIVE, ReservationStatus.RELEASING})


# What a move changes on the row besides the fields the caller passes.
_MOVED_FIELDS = ("status", "status_reason", "updated_at", "activated_at", "released_at")


def _events_sql(events: list[Event], params: dict[str, Any]) -> str:
    """The events' rows, written only when the moves are (ORDER BY keeps their ids in order)."""
    columns = [f for f in Event._meta.concrete_fields if not f.primary_key]
    rows = []
    for i, event in enumerate(events):
        placeholders = []
        for f in columns:
            name = f"tr_e{i}_{f.column}"
            params[name] = f.get_db_prep_save(f.pre_save(event, add=True), connection)
            placeholders.append(f"%({name})s::{f.db_type(connection)}")
        rows.append(f"({i}, {', '.join(placeholders)})")
    names = ", ".join(f'"{f.column}"' for f in columns)
    return (
        f"evented AS (INSERT INTO {Event._meta.db_table} ({names})"
        f" SELECT {names} FROM moved, (VALUES {', '.join(rows)}) AS e(n, {names}) ORDER BY e.n"
        " RETURNING id, public_id)"
    )


# The write itself: only while the status is still what the moves start from.
_MOVE_SQL = """moved AS (
    UPDATE marketplace_reservation
    SET status = %(tr_to)s, status_reason = %(tr_reason)s, updated_at = %(tr_now)s{sets}
    WHERE id = %(tr_rid)s AND status = %(tr_from)s{moving}
    RETURNING id
)"""

# One history row per move, in order (ids follow the moves; `at` is the same for all).
_RECORD_SQL = """recorded AS (
    INSERT INTO marketplace_reservationtransition
        (reservation_id, from_status, to_status, cause, actor_label, at)
    SELECT moved.id, m.f, m.t, m.c, %(tr_actor)s, %(tr_now)s
    FROM moved, unnest(%(tr_froms)s::text[], %(tr_tos)s::text[], %(tr_causes)s::text[])
        WITH ORDINALITY AS m(f, t, c, n)
    ORDER BY m.n
)"""

# Leaving the live statuses frees the GPUs; an allocation the end falls inside keeps
# [start, now) as the record of what was held, the others keep their period as booked.
_FREE_SQL = """freed AS (
    UPDATE marketplace_allocation
    SET is_live = false,
        period = CASE WHEN lower(period) < %(tr_now)s AND upper(period) > %(tr_now)s
                      THEN tstzrange(lower(period), %(tr_now)s, '[)') ELSE period END
    WHERE reservation_id IN (SELECT id FROM moved) AND is_live
),
-- and gives back the room it took in grid curtailments' windows from now on (the time
-- before now stays as the record of what it drew; a take not yet begun stays, empty, as the
-- record that it was sold there).
ungranted AS (
    UPDATE marketplace_curtailmenttake SET period = 'empty'
    WHERE reservation_id IN (SELECT id FROM moved) AND lower(period) >= %(tr_now)s
),
shortened AS (
    UPDATE marketplace_curtailmenttake
    SET period = tstzrange(lower(period), %(tr_now)s, '[)')
    WHERE reservation_id IN (SELECT id FROM moved)
      AND lower(period) < %(tr_now)s AND upper(period) > %(tr_now)s
)"""


def reservation_transition_check(
    *, from_status: str, to_status: str, tier: str, force_preemption: bool = False
) -> None:
    """Raise InvalidTransition unless the state machine allows this move (no database access).

    `force_preemption`: staff forced a curtailment onto a protected tier (with a reason,
    recorded and credited by the curtailment service); only then may it be preempted.

    reservation_transitions_write applies it to every move it writes.
    """
    if to_status not in ReservationStatus.values:
        raise InvalidTransition(f"Unknown reservation status {to_status!r}.", field="status")
    if to_status not in ALLOWED_TRANSITIONS[from_status]:
        raise InvalidTransition(
            f"A reservation cannot go from {from_status} to {to_status}.",
            code="invalid_transition",
        )
    if (
        to_status == ReservationStatus.PREEMPTED
        and tier != Tier.INTERRUPTIBLE
        and not force_preemption
    ):
        raise InvalidTransition(
            f"Only interruptible reservations can be preempted; this one is {tier}.",
            code="not_preemptible",
        )


def reservation_action_refusal(reservation: Reservation, action: str, *, at=None) -> str | None:
    """Why `action` ("cancel" or "extend") is not allowed now, or None when it is."""
    at = at or timezone.now()
    status = reservation.status
    if action == "cancel":
        if status not in _CANCELLABLE:
            return f"A {status} reservation cannot be cancelled."
        if status == ReservationStatus.ACTIVE and at >= reservation.ends_at:
            return "The reservation has already reached its end."
        return None
    if action == "extend":
        if status not in _EXTENDABLE:
            return f"A {status} reservation cannot be extended."
        if at >= reservation.ends_at:
            return "The reservation has already reached its end."
        if str((reservation.breakdown or {}).get("rate_source", "")).startswith("resale:"):
            # Bought time is the seller's, priced by the seller for its window: what follows
            # is the operator's again, at the operator's price, through a new booking.
            return (
                "Time bought from a resale listing ends with the listing's window; book the "
                "time after it as a new reservation."
            )
        if extension_blocked_by_interruption(reservation):
            # It ends at the interruption whatever its end says: more time could not be served.
            return (
                "An interruption is announced for "
                f"{reservation.preempt_at:%Y-%m-%d %H:%M} UTC; work under an interruption "
                "notice cannot be extended."
            )
        return None
    return f"Unknown action {action!r}."


def extension_blocked_by_interruption(reservation: Reservation) -> bool:
    """Whether an announced interruption (a preemption notice) rules out extending."""
    return reservation.preempt_at is not None and reservation.status in PREEMPTIBLE_STATUSES


def reservation_allowed_actions(reservation: Reservation) -> list[str]:
    """The customer-facing actions allowed now, for the API and the portal to show."""
    now = timezone.now()
    return [
        a
        for a in ("cancel", "extend")
        if reservation_action_refusal(reservation, a, at=now) is None
    ]
