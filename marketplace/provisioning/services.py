"""The provision and release steps the lifecycle tasks run, node failures and reservation outages.

Every step is safe to run twice or after a crash half-way:

- A lease row per reservation (ReservationWorkerLease) lets one worker at a time work on it; a
  duplicate delivery that finds it taken returns at once. It is claimed and given back in one
  autocommitted statement each, so it works behind a transaction-mode pooler, and a killed
  worker's lease lapses after the task's hard time limit.
- The status is checked under the row lock before each move, and every move goes through the
  transition service (reservation_transition, or its batched form reservation_transitions_write
  where the provision step makes its moves and its own bookkeeping in one statement): a
  provision for an active reservation is a no-op, a release for a completed one too.
- Each run records a ProvisioningAttempt (unique per reservation, kind and number); the
  sweeper reads them to tell stuck work from slow work, and gives up after
  PROVISIONING_MAX_ATTEMPTS failed ones.
- Drivers are idempotent by contract, so a retry may call them again.

Billing counts only activated_at → released_at minus ReservationOutage intervals: a
reservation that fails during provisioning never gets an activated_at, so it costs nothing.
"""

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.postgres.fields import DateTimeRangeField
from django.db import DatabaseError, connection, transaction
from django.db.models import Exists, F, Func, Max, Min, OuterRef, Q, Subquery, Value
from django.db.models.functions import Now
from django.utils import timezone
from psycopg.types.range import Range

from config.db import model_columns, model_from_row
from config.errors import ApplicationError
from inventory.models import GpuModel, Node, NodeStatus, Outage, OutageCause, Site
from inventory.services import status_change
from marketplace.models import (
    AgentJob,
    AgentJobStatus,
    Allocation,
    AttemptOutcome,
    EventType,
    ProvisioningAttempt,
    ProvisioningKind,
    Quote,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    ReservationTransition,
    ReservationWorkerLease,
    Tier,
)
from marketplace.models.provisioning import FAILED_OUTCOMES
from marketplace.provisioning.drivers import (
    Check,
    Driver,
    DriverError,
    NodeFailure,
    NodeTarget,
    Target,
    WorkloadFailure,
    driver_get,
)
from marketplace.provisioning.kicks import provisioning_kick, release_kick
from marketplace.selectors.reservations import reservation_active_again_at
from marketplace.services.allocation import allocation_place
from marketplace.services.events import reservation_event_record
from marketplace.services.resale import listings_withdraw_unheld
from marketplace.services.transitions import (
    Piggyback,
    reservation_transition,
    reservation_transitions_write,
)

__all__ = [
    "StepResult",
    "ACTOR",
    "reservation_provision_step",
    "reservation_release_step",
    "TEARDOWN_STATUSES",
    "teardown_needed",
    "reservation_reallocate",
    "placement_generation_raise",
    "allocations_end",
    "RESOLD_PAUSE_CAUSE",
    "reservation_resale_resync",
    "reservation_outages_record_for_node",
    "reservation_outages_close_for_node",
    "reservation_outages_reconcile",
    "WORKLOAD_LOST_CAUSE",
    "workload_lost_outages_close",
    "node_mark_failed",
    "reservation_worker_lock",
    "reservations_locked_by_workers",
    "retry_backoff",
]

logger = logging.getLogger(__name__)
ACTOR = "system: provisioning"

# How long a step waits for a driver that answers "pending" before it lets the worker go and
# checks again later (a site agent wakes the reservation as soon as it reports).
CHECK_WINDOW_SECONDS = 3.0
CHECK_POLL_SECONDS = 0.2
WAITING_RECHECK_SECONDS = 10.0
_USABLE_NODE_STATUSES = (NodeStatus.AVAILABLE, NodeStatus.DRAINING)
# Statuses a reservation can end in without going through releasing: whatever the driver was
# asked to run for it is stopped afterwards by the release task (a "teardown").
TEARDOWN_STATUSES = (
    ReservationStatus.PREEMPTED,
    ReservationStatus.FAILED,
    ReservationStatus.CANCELLED,
)


def teardown_needed() -> Q:
    """Reservations (as a filter) that ended without a release after the driver may have been
    asked to run their workload: they were active, or a provision step claimed them (its
    prepare and start may be queued, or running on a node). One never claimed has nothing to
    stop."""
    claimed = ProvisioningAttempt.objects.filter(
        reservation_id=OuterRef("pk"), kind=ProvisioningKind.PROVISION
    )
    return Q(status__in=TEARDOWN_STATUSES) & (Q(activated_at__isnull=False) | Exists(claimed))


@dataclass(frozen=True)
class StepResult:
    """What a step did; retry_in (seconds) asks the task to run the step again."""

    outcome: str
    retry_in: float | None = None
    detail: str = ""


def retry_backoff(failures: int) -> float:
    """Exponential backoff: 2, 4, 8, … seconds, at most a minute."""
    return float(min(2 ** max(failures, 1), 60))


def _worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


_LEASE_CLAIM_SQL = """
INSERT INTO marketplace_reservationworkerlease (reservation_id, holder, expires_at)
SELECT id, %(holder)s, now() + %(lease)s * interval '1 second'
FROM marketplace_reservation WHERE id = %(rid)s
ON CONFLICT (reservation_id) DO UPDATE
    SET holder = excluded.holder, expires_at = excluded.expires_at
    WHERE marketplace_reservationworkerlease.expires_at <= now()
RETURNING holder
"""
_LEASE_RENEW_SQL = """
UPDATE marketplace_reservationworkerlease SET expires_at = now() + %(lease)s * interval '1 second'
WHERE reservation_id = %(rid)s AND holder = %(holder)s
"""


class _LeaseKeeper(threading.Thread):
    """Renews a held lease every third of its length until stopped, on its own connection."""

    def __init__(self, params: dict):
        super().__init__(daemon=True, name=f"lease-{params['rid']}")
        self.params = params
        self.stopped = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopped.wait(self.params["lease"] / 3):
                with connection.cursor() as cur:
                    cur.execute(_LEASE_RENEW_SQL, self.params)
                    if cur.rowcount == 0:
                        logger.warning(
                            "lost the worker lease on reservation %s", self.params["rid"]
                        )
                        return
        except DatabaseError as exc:
            logger.warning(
                "could not renew the lease on reservation %s: %s", self.params["rid"], exc
            )
        finally:
            connection.close()  # this thread's own connection


@contextmanager
def reservation_worker_lock(reservation_id: int) -> Iterator[bool]:
    """Try to become the one worker acting on this reservation; yields whether we are.
    A reservation that no longer exists (a task queued before it was deleted) is never held.

    Outside any transaction the claim and the release commit at once, so another worker sees
    the lease while the driver is called (between the step's own transactions). The lease is
    renewed while held, so it lapses PROVISIONING_WORKER_LEASE_SECONDS after its worker died.
    """
    params = {
        "rid": reservation_id,
        "holder": f"{_worker_label()}:{uuid.uuid4().hex[:12]}"[:64],
        "lease": settings.PROVISIONING_WORKER_LEASE_SECONDS,
    }
    with connection.cursor() as cur:
        cur.execute(_LEASE_CLAIM_SQL, params)
        held = cur.fetchone() is not None
    if not held:
        yield False
        return
    keeper = _LeaseKeeper(params)
    keeper.start()
    try:
        yield True
    finally:
        keeper.stopped.set()
        keeper.join()
        ReservationWorkerLease.objects.filter(
            reservation_id=reservation_id, holder=params["holder"]
        ).delete()


def _not_held(reservation_id: int) -> StepResult:
    if not Reservation.objects.filter(pk=reservation_id).exists():
        return StepResult("noop", detail="no such reservation")
    return StepResult("busy", detail="another worker is on it")


def reservations_locked_by_workers() -> set[int]:
    """Ids of reservations some worker is acting on right now (their lease has not lapsed)."""
    return set(
        ReservationWorkerLease.objects.filter(expires_at__gt=Now()).values_list(
            "reservation_id", flat=True
        )
    )


def _target(reservation: Reservation) -> tuple[Target, list[tuple[int, str, str]]]:
    """The driver's view of the reservation, and (node id, hostname, status) of its nodes."""
    allocations = (
        Allocation.objects.filter(reservation=reservation, is_live=True)
        .select_related("node", "gpu")
        .order_by("node_id", "gpu__index")
    )
    by_node: dict[int, NodeTarget] = {}
    node_states: dict[int, tuple[int, str, str]] = {}
    for a in allocations:
        current = by_node.get(a.node_id)
        indexes = current.gpu_indexes if current else ()
        if a.gpu.index not in indexes:  # a GPU partly resold has rows before and after
            indexes += (a.gpu.index,)
        by_node[a.node_id] = NodeTarget(a.node_id, a.node.hostname, indexes)
        node_states[a.node_id] = (a.node_id, a.node.hostname, a.node.status)
    target = Target(
        reservation_id=reservation.pk,
        public_id=reservation.public_id,
        workload=reservation.workload or {},
        nodes=tuple(by_node.values()),
        tier=reservation.tier,
        generation=reservation.placement_generation,
    )
    return target, list(node_states.values())


def _attempt_start(
    reservation: Reservation, kind: str, now: datetime
) -> tuple[ProvisioningAttempt, int, bool]:
    """Record a new attempt; returns it, the failures so far, and whether the last one waited.

    An attempt still marked running belongs to a worker that died: we hold the lock now.
    """
    attempts = ProvisioningAttempt.objects.filter(reservation=reservation, kind=kind)
    with connection.cursor() as cur:
        cur.execute(
            """
            SELECT coalesce(max(number), 0),
                   count(*) FILTER (WHERE outcome = ANY(%s)),
                   count(*) FILTER (WHERE outcome = %s),
                   (array_agg(outcome ORDER BY number DESC))[1]
            FROM marketplace_provisioningattempt WHERE reservation_id = %s AND kind = %s
            """,
            [
                [o.value for o in FAILED_OUTCOMES],
                AttemptOutcome.RUNNING.value,
                reservation.pk,
                str(kind),
            ],
        )
        last_number, failures, running, last_outcome = cur.fetchone()
    if running:
        attempts.filter(outcome=AttemptOutcome.RUNNING).update(
            outcome=AttemptOutcome.ABANDONED,
            finished_at=now,
            error="The worker stopped mid-attempt.",
        )
        failures += running
    attempt = ProvisioningAttempt.objects.create(
        reservation=reservation,
        kind=kind,
        number=last_number + 1,
        started_at=now,
        worker=_worker_label(),
    )
    return attempt, failures, last_outcome == AttemptOutcome.WAITING


def _attempt_finish(
    attempt: ProvisioningAttempt, outcome: str, *, error: str = "", retry_in: float | None = None
) -> None:
    now = timezone.now()
    attempt.outcome = outcome
    attempt.error = error[:2000]
    attempt.finished_at = now
    attempt.next_attempt_at = now + timedelta(seconds=retry_in) if retry_in is not None else None
    attempt.save(update_fields=["outcome", "error", "finished_at", "next_attempt_at"])


def _fail(reservation: Reservation, reason: str) -> Reservation:
    return reservation_transition(
        reservation=reservation, to_status=ReservationStatus.FAILED, cause=reason, actor_label=ACTOR
    )


def _wait_ready(target: Target, *, probe, window: float) -> Check:
    deadline = time.monotonic() + window
    while True:
        check = probe(target)
        if check.state != "pending" or time.monotonic() >= deadline:
            return check
        time.sleep(CHECK_POLL_SECONDS)


# --- provision ------------------------------------------------------------------------------


def reservation_provision_step(
    *,
    reservation_id: int,
    driver: Driver | None = None,
    check_window: float = CHECK_WINDOW_SECONDS,
) -> StepResult:
    """Take a due reservation to active through the driver, or as far as it can get now.

    A driver still "pending" is polled for up to `check_window` seconds before the step
    returns "waiting" (the task then checks again later).
    """
    driver = driver or driver_get()
    with reservation_worker_lock(reservation_id) as held:
        if not held:
            return _not_held(reservation_id)
        return _provision(reservation_id=reservation_id, driver=driver, window=check_window)


def _provision(*, reservation_id: int, driver: Driver, window: float) -> StepResult:
    """One provisioning step in phases: claim the due reservation for an attempt (one
    transaction), drive the workload up, then record what the driver answered."""
    claim = _provision_claim_due(reservation_id)
    if isinstance(claim, StepResult):
        return claim
    check = _provision_drive(claim, driver=driver, window=window)
    if isinstance(check, StepResult):
        return check
    return _provision_settle(claim, check, driver=driver)


@dataclass(frozen=True)
class _ProvisionClaim:
    """A reservation claimed for one provisioning attempt, and what the driver is to run."""

    reservation: Reservation
    attempt: ProvisioningAttempt
    failures: int  # failed attempts before this one
    resumed: bool  # the last attempt queued the work and waited for it
    moved: bool  # moved to provisioning by this step (a new placement and generation)
    target: Target
    node_states: list[tuple[int, str, str]]


def _provision_claim_due(reservation_id: int) -> _ProvisionClaim | StepResult:
    """Under the row lock: move a due reservation to provisioning and record the attempt, or
    say why not (not due, not provisionable, gave up after too many attempts or its end)."""
    with transaction.atomic():
        reservation = _provision_lock_row(reservation_id)
        if reservation is None:
            return StepResult("noop", detail="no such reservation")
        now = timezone.now()
        moves = _provision_moves(reservation, now)
        if isinstance(moves, StepResult):
            return moves
        attempt, failures, resumed, target, node_states = _provision_claim(
            reservation, moves=moves, now=now
        )
        if failures >= settings.PROVISIONING_MAX_ATTEMPTS:
            _attempt_finish(attempt, AttemptOutcome.GAVE_UP)
            _fail(reservation, f"Provisioning failed {failures} times; giving up.")
            return StepResult("failed", detail="too many attempts")
        if now >= reservation.ends_at:
            _attempt_finish(attempt, AttemptOutcome.GAVE_UP)
            _fail(reservation, period_over_cause(reservation))
            return StepResult("failed", detail="period over")
    return _ProvisionClaim(
        reservation, attempt, failures, resumed, bool(moves), target, node_states
    )


def _provision_moves(reservation: Reservation, now: datetime) -> list[tuple[str, str]] | StepResult:
    """The moves that take the reservation to provisioning (none if it is there already), or
    a no-op result when it is not due or not in a state to provision."""
    if reservation.status == ReservationStatus.PROVISIONING:
        return []
    if reservation.status not in (ReservationStatus.PENDING, ReservationStatus.SCHEDULED):
        return StepResult("noop", detail=f"reservation is {reservation.status}")
    if reservation.starts_at > now:
        return StepResult("noop", detail="not due yet")
    if reservation.tier == Tier.RESERVED and not _holds_gpus_at(reservation, now):
        # Every GPU of the term is resold for now: it starts when it holds one again
        # (the dispatcher keeps offering it), never on a buyer's GPUs.
        return StepResult("noop", detail="all its GPUs are resold for now")
    moves = []
    if reservation.status == ReservationStatus.PENDING:
        moves.append((ReservationStatus.SCHEDULED, "start time reached"))
    moves.append((ReservationStatus.PROVISIONING, "provisioning started"))
    return moves


def _provision_drive(
    claim: _ProvisionClaim, *, driver: Driver, window: float
) -> Check | StepResult:
    """Start the workload through the driver (unless the last attempt already did) and wait
    up to `window` seconds for it; a node, workload or driver failure ends the step here."""
    target = claim.target
    try:
        _refuse_unusable_nodes(claim.node_states)
        # Resumed: the last run queued the work and waited for it. Not after a move back to
        # scheduled, which changed the placement (and its generation).
        if not claim.resumed or claim.moved:
            driver.prepare(target)
            driver.start_workload(target)
        check = _wait_ready(target, probe=driver.check, window=window)
        if check.state == "failed":
            raise WorkloadFailure(check.detail or "The driver reported a failure.")
    except NodeFailure as exc:
        return _after_node_failure(
            claim.reservation.pk, claim.attempt, exc, driver=driver, target=target
        )
    except WorkloadFailure as exc:
        _attempt_finish(claim.attempt, AttemptOutcome.ERROR, error=str(exc))
        _provisioning_fail(claim, f"The workload could not start: {exc}", driver=driver)
        return StepResult("failed", detail=str(exc))
    except DriverError as exc:
        return _provision_driver_error(claim, exc, driver=driver)
    return check


def _provision_driver_error(
    claim: _ProvisionClaim, exc: DriverError, *, driver: Driver
) -> StepResult:
    """A driver error is retried with backoff, until the attempts run out."""
    failures = claim.failures + 1
    if failures >= settings.PROVISIONING_MAX_ATTEMPTS:
        _attempt_finish(claim.attempt, AttemptOutcome.ERROR, error=str(exc))
        reason = f"Provisioning failed {failures} times; last error: {exc}"
        _provisioning_fail(claim, reason, driver=driver)
        return StepResult("failed", detail=str(exc))
    delay = retry_backoff(failures)
    _attempt_finish(claim.attempt, AttemptOutcome.ERROR, error=str(exc), retry_in=delay)
    logger.warning("provisioning %s failed (%s); retry in %ss", claim.target.public_id, exc, delay)
    return StepResult("retry", retry_in=delay, detail=str(exc))


def _provisioning_fail(claim: _ProvisionClaim, reason: str, *, driver: Driver) -> None:
    """Fail the reservation if it is still provisioning, and stop what may have started."""
    with transaction.atomic():
        locked = Reservation.objects.select_for_update().get(pk=claim.reservation.pk)
        if locked.status == ReservationStatus.PROVISIONING:
            _fail(locked, reason)
    _stop_quietly(driver, claim.target)


def _provision_settle(claim: _ProvisionClaim, check: Check, *, driver: Driver) -> StepResult:
    """What the driver answered: a stalled site agent is a node failure, a pending workload
    is checked again later, a ready one makes the reservation active."""
    target = claim.target
    if check.state == "pending" and check.stalled_node_id is not None:
        silent = NodeFailure(
            check.stalled_node_id,
            f"Its site agent did not pick up the job within "
            f"{int(settings.AGENT_JOB_STALL.total_seconds())} s.",
        )
        return _after_node_failure(
            claim.reservation.pk, claim.attempt, silent, driver=driver, target=target
        )
    if check.state == "pending":
        _attempt_finish(
            claim.attempt,
            AttemptOutcome.WAITING,
            error=check.detail,
            retry_in=WAITING_RECHECK_SECONDS,
        )
        return StepResult("waiting", retry_in=WAITING_RECHECK_SECONDS, detail=check.detail)
    activated = _provision_activate(
        claim.reservation, attempt=claim.attempt, connection_details=check.connection
    )
    if not activated:
        # Cancelled (or failed by staff) while we were starting it: take it down again.
        transaction.on_commit(lambda: _stop_quietly(driver, target))
        return StepResult("noop", detail="reservation left provisioning meanwhile")
    return StepResult("active")


_LOCK_ROW_SQL = f"""
SELECT {model_columns(Reservation, "r")}, {model_columns(GpuModel, "m")},
       {model_columns(Site, "s")}, {model_columns(Quote, "q")}
FROM marketplace_reservation r
JOIN inventory_gpumodel m ON m.id = r.gpu_model_id
JOIN inventory_site s ON s.id = r.site_id
LEFT JOIN marketplace_quote q ON q.id = r.quote_id
WHERE r.id = %s
FOR UPDATE OF r
"""


def _holds_gpus_at(reservation: Reservation, at: datetime) -> bool:
    """Whether a reserved term has a GPU to run on at `at` (not every one resold then)."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT EXISTS (SELECT 1 FROM marketplace_allocation a WHERE a.reservation_id = "
            "%(rid)s AND a.is_live" + _NOT_RESOLD_NOW + ")",
            {"rid": reservation.pk, "now": at},
        )
        return cur.fetchone()[0]


def _provision_lock_row(reservation_id: int) -> Reservation | None:
    """SELECT … FOR UPDATE of the reservation, with its model, site and quote (its events show
    them), as select_related loads them.

    Plain SQL (config.db), because compiling the ORM query cost more than running it.
    """
    with connection.cursor() as cur:
        cur.execute(_LOCK_ROW_SQL, [reservation_id])
        row = cur.fetchone()
    if row is None:
        return None
    widths = [len(m._meta.concrete_fields) for m in (Reservation, GpuModel, Site, Quote)]
    ends = [sum(widths[: i + 1]) for i in range(len(widths))]
    reservation = model_from_row(Reservation, row[: ends[0]])
    reservation.gpu_model = model_from_row(GpuModel, row[ends[0] : ends[1]])
    reservation.site = model_from_row(Site, row[ends[1] : ends[2]])
    quote = row[ends[2] : ends[3]]
    reservation.quote = model_from_row(Quote, quote) if quote[0] is not None else None
    return reservation


# A GPU of a reserved term whose time now was resold is not the term's to run on now (its
# allocations before and after the sold window are; a GPU split so appears once).
_NOT_RESOLD_NOW = """
  AND NOT EXISTS (SELECT 1 FROM marketplace_resalelisting l
                  WHERE l.reservation_id = a.reservation_id AND l.status = 'sold'
                    AND a.gpu_id = ANY(l.gpu_ids)
                    AND l.starts_at <= %(now)s AND l.ends_at > %(now)s)"""

# The provision step's own bookkeeping, written in the same round trip as its status moves
# (reservation_transitions_write): mark attempts a dead worker left running as abandoned,
# record the new attempt, and read the live placement. Failures count from the last attempt
# that succeeded (its activation): a restart in place or a move of a running reservation
# gets its own PROVISIONING_MAX_ATTEMPTS, whatever its first start or earlier restarts cost.
_CLAIM_CTES = """
prev AS (
    SELECT coalesce(max(a.number), 0) AS last_number,
           count(*) FILTER (WHERE a.outcome = ANY(%(failed)s) AND a.number > ok.number)
               AS failures,
           count(*) FILTER (WHERE a.outcome = %(running)s) AS running,
           (array_agg(a.outcome ORDER BY a.number DESC))[1] AS last_outcome
    FROM marketplace_provisioningattempt a,
         (SELECT coalesce(max(number), 0) AS number FROM marketplace_provisioningattempt
          WHERE reservation_id = %(rid)s AND kind = %(kind)s AND outcome = %(succeeded)s) ok
    WHERE a.reservation_id = %(rid)s AND a.kind = %(kind)s
), abandoned AS (
    UPDATE marketplace_provisioningattempt
    SET outcome = %(abandoned)s, finished_at = %(now)s, error = 'The worker stopped mid-attempt.'
    WHERE reservation_id = %(rid)s AND kind = %(kind)s AND outcome = %(running)s
), attempt AS (
    INSERT INTO marketplace_provisioningattempt
        (reservation_id, kind, number, outcome, error, worker, started_at)
    SELECT %(rid)s, %(kind)s, prev.last_number + 1, %(running)s, '', %(worker)s, %(now)s
    FROM prev
    RETURNING id, number
)"""
_CLAIM_SELECT = (
    """attempt.id, attempt.number, prev.failures + prev.running, prev.last_outcome,
       (SELECT coalesce(json_agg(json_build_array(p.node_id, p.hostname, p.status, p.index)
                                 ORDER BY p.node_id, p.index), '[]'::json)
        FROM (SELECT DISTINCT a.node_id, n.hostname, n.status, g.index
              FROM marketplace_allocation a
              JOIN inventory_node n ON n.id = a.node_id
              JOIN inventory_gpu g ON g.id = a.gpu_id
              WHERE a.reservation_id = %(rid)s AND a.is_live"""
    + _NOT_RESOLD_NOW
    + """) p)
FROM attempt, prev"""
)


def _provision_claim(
    reservation: Reservation, *, moves: list[tuple[str, str]], now: datetime
) -> tuple[ProvisioningAttempt, int, bool, Target, list[tuple[int, str, str]]]:
    """Under the row lock, in one statement: the moves to provisioning (through the transition
    service), attempts a dead worker left running marked abandoned, the new attempt recorded,
    and the live placement read.

    Returns the attempt, the failures so far (abandoned ones included), whether the last
    attempt was waiting on the driver, the driver's target and (node id, hostname, status) of
    its nodes. `reservation` is updated in memory to match.
    """
    kind = ProvisioningKind.PROVISION
    params = {
        "rid": reservation.pk,
        "kind": kind.value,
        "now": now,
        "failed": [o.value for o in FAILED_OUTCOMES],
        "running": AttemptOutcome.RUNNING.value,
        "abandoned": AttemptOutcome.ABANDONED.value,
        "succeeded": AttemptOutcome.SUCCEEDED.value,
        "worker": _worker_label(),
    }
    _moved, (attempt_id, number, failures, last_outcome, placement) = reservation_transitions_write(
        reservation=reservation,
        moves=moves,
        actor_label=ACTOR,
        now=now,
        piggyback=Piggyback(ctes=_CLAIM_CTES, select=_CLAIM_SELECT, params=params),
    )
    attempt = ProvisioningAttempt(
        pk=attempt_id,
        reservation=reservation,
        kind=kind,
        number=number,
        outcome=AttemptOutcome.RUNNING,
        worker=params["worker"],
        started_at=now,
    )
    if isinstance(placement, str):
        placement = json.loads(placement)
    by_node: dict[int, NodeTarget] = {}
    node_states: dict[int, tuple[int, str, str]] = {}
    for node_id, hostname, node_status, gpu_index in placement:
        indexes = (by_node[node_id].gpu_indexes if node_id in by_node else ()) + (gpu_index,)
        by_node[node_id] = NodeTarget(node_id, hostname, indexes)
        node_states[node_id] = (node_id, hostname, node_status)
    target = Target(
        reservation_id=reservation.pk,
        public_id=reservation.public_id,
        workload=reservation.workload or {},
        nodes=tuple(by_node.values()),
        tier=reservation.tier,
        generation=reservation.placement_generation,
    )
    return (
        attempt,
        failures,
        last_outcome == AttemptOutcome.WAITING,
        target,
        list(node_states.values()),
    )


# The attempt's outcome, written in the same statement as the activation.
_ACTIVATE_CTES = """
finished AS (
    UPDATE marketplace_provisioningattempt
    SET outcome = CASE WHEN EXISTS (SELECT 1 FROM moved)
                       THEN %(succeeded)s ELSE %(gave_up)s END,
        error = CASE WHEN EXISTS (SELECT 1 FROM moved)
                     THEN '' ELSE 'left provisioning meanwhile' END,
        finished_at = %(now)s, next_attempt_at = NULL
    WHERE id = %(attempt)s
)"""


def _provision_activate(
    reservation: Reservation, *, attempt: ProvisioningAttempt, connection_details: dict
) -> bool:
    """provisioning → active with the connection details, its transition record and the
    attempt's outcome, in one statement (atomic by itself). The UPDATE takes the row lock and
    checks the status, so a reservation cancelled meanwhile is left alone (the attempt is
    recorded as given up) and False is returned."""
    now = timezone.now()
    activated, _row = reservation_transitions_write(
        reservation=reservation,
        moves=[(ReservationStatus.ACTIVE, "workload running")],
        actor_label=ACTOR,
        now=now,
        fields={"connection": connection_details},
        piggyback=Piggyback(
            ctes=_ACTIVATE_CTES,
            params={
                "attempt": attempt.pk,
                "now": now,
                "succeeded": AttemptOutcome.SUCCEEDED.value,
                "gave_up": AttemptOutcome.GAVE_UP.value,
            },
        ),
    )
    return activated


def _refuse_unusable_nodes(node_states: list[tuple[int, str, str]]) -> None:
    """A node taken out of service since the booking must not get the workload: move off it."""
    for node_id, hostname, status in node_states:
        if status not in _USABLE_NODE_STATUSES:
            state = "in maintenance" if status == NodeStatus.MAINTENANCE else status
            raise _NodeUnusable(node_id, f"Node {hostname} is {state}.")


class _NodeUnusable(NodeFailure):
    """The node was already out of service: move the reservation, do not mark the node again."""


def _stop_quietly(driver: Driver, target: Target) -> None:
    try:
        driver.stop(target)
    except (DriverError, NodeFailure, WorkloadFailure) as exc:
        logger.warning("could not stop %s after a failure: %s", target.public_id, exc)


def _after_node_failure(
    reservation_id: int,
    attempt: ProvisioningAttempt,
    exc: NodeFailure,
    *,
    driver: Driver,
    target: Target,
) -> StepResult:
    now = timezone.now()
    # Site-agent work not yet handed out on that node is for a placement that no longer holds.
    AgentJob.objects.filter(
        reservation_id=reservation_id, node_id=exc.node_id, status=AgentJobStatus.QUEUED
    ).update(status=AgentJobStatus.CANCELLED)
    with transaction.atomic():
        # Reservation row first, then the node: the order every other path takes.
        locked = Reservation.objects.select_for_update().get(pk=reservation_id)
        node = Node.objects.get(pk=exc.node_id)
        if not isinstance(exc, _NodeUnusable):
            node = node_mark_failed(node=node, reason=exc.reason, now=now)
        _attempt_finish(attempt, AttemptOutcome.NODE_FAILURE, error=exc.reason)
        if locked.status != ReservationStatus.PROVISIONING:
            return StepResult("noop", detail=f"reservation became {locked.status}")
        try:
            with transaction.atomic():
                moved = reservation_reallocate(reservation=locked, node=node, now=now)
        except ApplicationError:
            moved = 0
        if not moved:
            _fail(
                locked,
                f"{exc.reason} No other free GPUs at {locked.site.slug} to move the reservation to.",
            )
            # Whatever was started on its other nodes must not keep running.
            transaction.on_commit(lambda: _stop_quietly(driver, target))
            return StepResult("failed", detail=exc.reason)
    logger.warning("reservation %s moved off failed node %s", reservation_id, node.hostname)
    return StepResult("retry", retry_in=0.0, detail=f"moved {moved} GPU(s) off {node.hostname}")


def reservation_reallocate(*, reservation: Reservation, node: Node, now: datetime) -> int:
    """Move the reservation's live allocations on `node` to other free GPUs at the same site.

    Returns how many GPUs were moved; raises NotAvailable (from the placement service) when
    there are not enough, leaving the allocations as they were (the caller's savepoint).
    The old allocations are kept as the record of what was held: cut to now, no longer live.
    """
    on_node = Allocation.objects.filter(reservation=reservation, node=node, is_live=True)
    # GPUs, not rows: a GPU whose time was partly resold has two allocations.
    count = on_node.values("gpu_id").distinct().count()
    if count == 0:
        return 0
    # The hours it held there from now, not its whole span: a window it resold is its
    # buyer's (moved by the buyer's own failure handling), never handed out twice.
    pieces: dict[tuple[datetime, datetime], set[int]] = {}
    for gpu_id, period in on_node.values_list("gpu_id", "period"):
        starts_at = max(period.lower, now, reservation.starts_at)
        ends_at = min(period.upper, reservation.ends_at)
        if starts_at < ends_at:
            pieces.setdefault((starts_at, ends_at), set()).add(gpu_id)
    allocations_end(on_node, now=now)
    for (starts_at, ends_at), gpus in sorted(pieces.items()):
        allocation_place(
            reservation=reservation,
            site_id=reservation.site_id,
            gpu_model_id=reservation.gpu_model_id,
            gpu_count=len(gpus),
            starts_at=starts_at,
            ends_at=ends_at,
            moved=True,  # off a failed node at the same site: no load is added there
        )
    # Its open listings of GPUs on the node can no longer be sold.
    listings_withdraw_unheld(reservation=reservation)
    placement_generation_raise(reservation)
    reservation_event_record(reservation=reservation, type=EventType.RESERVATION_MOVED)
    return count


def placement_generation_raise(reservation: Reservation) -> None:
    """The reservation's GPUs changed: its workload runs afresh as the next generation (the
    site agent stops the old container, even on a node it stays on, and starts a new one)."""
    reservation.placement_generation += 1
    reservation.save(update_fields=["placement_generation", "updated_at"])


def allocations_end(queryset, *, now: datetime) -> None:
    """Stop allocations being live; one that had begun keeps [start, now) as its record, one
    that had not keeps an empty period: it held nothing (billing counts a node's outage only
    for the time a reservation held GPUs on the node)."""
    queryset.filter(is_live=True, period__startswith__gte=now).update(
        period=Range(empty=True), is_live=False
    )
    queryset.filter(period__startswith__lt=now, period__endswith__gt=now).update(
        period=Func(
            Func(F("period"), function="lower"),
            Value(now),
            Value("[)"),
            function="tstzrange",
            output_field=DateTimeRangeField(),
        ),
        is_live=False,
    )
    queryset.update(is_live=False)


@transaction.atomic
def node_mark_failed(*, node: Node, reason: str, now: datetime | None = None) -> Node:
    """Take a node the driver reports as failed out of sale, open an outage, and record it
    against the active reservations it serves (only those)."""
    now = now or timezone.now()
    node = Node.objects.select_for_update().get(pk=node.pk)
    if node.status in _USABLE_NODE_STATUSES:
        node = status_change(
            action="set_maintenance",
            node=node,
            actor=None,
            actor_label=ACTOR,
            reason=f"Driver reported failure: {reason}",
        )
    outage = Outage.objects.filter(node=node, gpu=None, ended_at__isnull=True).first()
    if outage is None:
        outage = Outage.objects.create(
            node=node, started_at=now, cause=OutageCause.HARDWARE_FAILURE, detail=reason
        )
    reservation_outages_record_for_node(
        node=node, started_at=outage.started_at, cause=outage.cause, source_outage=outage, now=now
    )
    return node


# --- resold time: a running term's GPUs change at the edges of the windows it sold ---------

RESOLD_PAUSE_CAUSE = "every GPU of the term is resold for now"
_PLACEMENT_SQL = (
    """
SELECT DISTINCT a.node_id, n.hostname, g.index
FROM marketplace_allocation a
JOIN inventory_node n ON n.id = a.node_id
JOIN inventory_gpu g ON g.id = a.gpu_id
WHERE a.reservation_id = %(rid)s AND a.is_live"""
    + _NOT_RESOLD_NOW
    + """
ORDER BY a.node_id, g.index
"""
)


def _placement_at(reservation_id: int, at: datetime) -> dict[int, tuple[str, tuple[int, ...]]]:
    """node id → (hostname, GPU indexes) the term runs on at `at`, as the provision step
    places it (its live GPUs less those resold for that moment)."""
    placement: dict[int, tuple[str, tuple[int, ...]]] = {}
    with connection.cursor() as cur:
        cur.execute(_PLACEMENT_SQL, {"rid": reservation_id, "now": at})
        for node_id, hostname, index in cur.fetchall():
            placement[node_id] = (hostname, placement.get(node_id, ("", ()))[1] + (index,))
    return placement


def reservation_resale_resync(
    *, reservation_id: int, placed_at: datetime, now: datetime, driver: Driver | None = None
) -> str:
    """A running term whose GPUs changed since its workload was placed at `placed_at` (a
    window it sold began or ended): its workload must not stay on GPUs sold for now, and gets
    back the ones whose sold window ended. Under the row lock, as a move off a failed GPU:

    - it holds GPUs now: its placement generation is raised and it goes active →
      provisioning; the worker restarts the workload on them (the site agents first stop the
      old generation's containers, on every node that ran one);
    - it holds none now but will again: the generation is raised and the old containers are
      stopped; the term stays active with no connection, and the history says so (the end of
      the window restarts it);
    - it holds none for the rest of the term: active → releasing (it is over for its holder).
    """
    with transaction.atomic():
        locked = (
            Reservation.objects.select_for_update(skip_locked=True)
            .filter(pk=reservation_id, status=ReservationStatus.ACTIVE)
            .first()
        )
        if locked is None:
            return "skipped"
        new = _placement_at(locked.pk, now)
        if _placement_at(locked.pk, placed_at) == new:
            return "unchanged"
        if new:
            placement_generation_raise(locked)
            reservation_transition(
                reservation=locked,
                to_status=ReservationStatus.PROVISIONING,
                cause="Its GPUs changed at the edge of a resold window: the workload restarts "
                f"on the {sum(len(i) for _, i in new.values())} GPU(s) the term holds now.",
                actor_label=ACTOR,
            )
            provisioning_kick(locked.pk)
            return "restarted"
        if Allocation.objects.filter(
            reservation=locked, is_live=True, period__endswith__gt=now
        ).exists():
            _resold_pause(locked, driver or driver_get())
            return "paused"
        reservation_transition(
            reservation=locked,
            to_status=ReservationStatus.RELEASING,
            cause="The rest of the term is resold: it ends for its holder.",
            actor_label=ACTOR,
        )
        release_kick(locked.pk)
        return "released"


def period_over_cause(reservation: Reservation) -> str:
    """Why a reservation whose period ended while it was being provisioned fails: never
    started, or started before and not running again (a move or a restart in place)."""
    if reservation.activated_at is None:
        return "The reservation's period ended before it could be provisioned."
    return (
        "The reservation's period ended while it was being started again (after a move or a "
        "restart in place); it had run until then."
    )


def _resold_pause(locked: Reservation, driver: Driver) -> None:
    """A locked active term that holds no GPUs now but will again: a new placement
    generation, no connection, a history row, and its containers stopped once this commits.
    Not a status move: it stays active (paid for) with nothing running until then."""
    placement_generation_raise(locked)
    locked.connection = {}
    locked.save(update_fields=["connection", "updated_at"])
    ReservationTransition.objects.create(
        reservation=locked,
        from_status=locked.status,
        to_status=locked.status,
        cause=f"{RESOLD_PAUSE_CAUSE}: the workload is stopped until it holds GPUs again",
        actor_label=ACTOR,
    )
    nothing = Target(
        reservation_id=locked.pk,
        public_id=locked.public_id,
        workload=locked.workload or {},
        nodes=(),
        tier=locked.tier,
        generation=locked.placement_generation,
    )
    transaction.on_commit(lambda: _stop_quietly(driver, nothing))


# --- release --------------------------------------------------------------------------------


def reservation_release_step(
    *,
    reservation_id: int,
    driver: Driver | None = None,
    check_window: float = CHECK_WINDOW_SECONDS,
) -> StepResult:
    """Take an ended (or stopped early) reservation down and complete it; GPUs free at once."""
    driver = driver or driver_get()
    with reservation_worker_lock(reservation_id) as held:
        if not held:
            return _not_held(reservation_id)
        return _release(reservation_id=reservation_id, driver=driver, window=check_window)


def _release(*, reservation_id: int, driver: Driver, window: float) -> StepResult:
    teardown = None
    with transaction.atomic():
        reservation = Reservation.objects.select_for_update().filter(pk=reservation_id).first()
        if reservation is None:
            return StepResult("noop", detail="no such reservation")
        now = timezone.now()
        if reservation.status == ReservationStatus.ACTIVE:
            if reservation.ends_at > now:
                return StepResult("noop", detail="not over yet")
            reservation = reservation_transition(
                reservation=reservation,
                to_status=ReservationStatus.RELEASING,
                cause="period ended",
                actor_label=ACTOR,
            )
        elif (
            reservation.status in TEARDOWN_STATUSES
            and Reservation.objects.filter(teardown_needed(), pk=reservation.pk).exists()
        ):
            prepared = _teardown_prepare(reservation=reservation, now=now)
            if isinstance(prepared, StepResult):
                return prepared
            teardown = prepared
        elif reservation.status != ReservationStatus.RELEASING:
            return StepResult("noop", detail=f"reservation is {reservation.status}")
        if teardown is None:
            attempt, failures, _resumed = _attempt_start(reservation, ProvisioningKind.RELEASE, now)
            target, _nodes = _target(reservation)
        if teardown is None and failures >= settings.PROVISIONING_MAX_ATTEMPTS:
            # Billing stops here either way; the GPUs of a node that never confirmed the stop
            # are freed, and staff see the attempts and errors on the reservation.
            _attempt_finish(attempt, AttemptOutcome.GAVE_UP)
            _complete(reservation, f"released after {failures} failed stop attempts (unconfirmed)")
            return StepResult("completed", detail="unconfirmed stop")

    if teardown is not None:
        attempt, failures, target = teardown
        return _teardown_stop(
            attempt=attempt, failures=failures, target=target, driver=driver, window=window
        )
    try:
        check = _wait_ready(target, probe=driver.stop, window=window)
    except (DriverError, NodeFailure, WorkloadFailure) as exc:
        failures += 1
        delay = retry_backoff(failures)
        _attempt_finish(attempt, AttemptOutcome.ERROR, error=str(exc), retry_in=delay)
        return StepResult("retry", retry_in=delay, detail=str(exc))
    if check.state == "pending":
        _attempt_finish(
            attempt, AttemptOutcome.WAITING, error=check.detail, retry_in=WAITING_RECHECK_SECONDS
        )
        return StepResult("waiting", retry_in=WAITING_RECHECK_SECONDS, detail=check.detail)

    with transaction.atomic():
        locked = Reservation.objects.select_for_update().get(pk=reservation_id)
        if locked.status != ReservationStatus.RELEASING:
            _attempt_finish(attempt, AttemptOutcome.GAVE_UP, error=f"became {locked.status}")
            return StepResult("noop", detail=f"reservation became {locked.status}")
        _complete(locked, "released")
        _attempt_finish(attempt, AttemptOutcome.SUCCEEDED)
    return StepResult("completed")


def _teardown_prepare(
    *, reservation: Reservation, now
) -> StepResult | tuple[ProvisioningAttempt, int, Target]:
    """For a reservation that ended without a release after the driver may have been asked
    to run it (cancelled while provisioning, preempted, or failed by staff, a node or its
    period's end): its GPUs were freed by the transition, but no job of it may still run and
    no container keep running on them. Records the attempt and returns what to stop; no
    status changes."""
    done = ProvisioningAttempt.objects.filter(
        reservation=reservation,
        kind=ProvisioningKind.RELEASE,
        outcome__in=[AttemptOutcome.SUCCEEDED, AttemptOutcome.GAVE_UP],
    ).exists()
    if done:
        return StepResult("noop", detail="already torn down")
    attempt, failures, _resumed = _attempt_start(reservation, ProvisioningKind.RELEASE, now)
    if failures >= settings.PROVISIONING_MAX_ATTEMPTS:
        _attempt_finish(attempt, AttemptOutcome.GAVE_UP, error="stop never confirmed")
        return StepResult("noop", detail="gave up stopping")
    # The GPUs it held when it ended: allocations cut at released_at (not later bookings), or
    # ending with its period when that ended first (failed as "period over" while provisioning).
    ended_at = min(reservation.released_at or now, reservation.ends_at)
    allocations = (
        Allocation.objects.filter(
            reservation=reservation,
            period__startswith__lt=ended_at,
            period__endswith__gte=ended_at,
        )
        .select_related("node", "gpu")
        .order_by("node_id", "gpu__index")
    )
    by_node: dict[int, NodeTarget] = {}
    for a in allocations:
        indexes = (by_node[a.node_id].gpu_indexes if a.node_id in by_node else ()) + (a.gpu.index,)
        by_node[a.node_id] = NodeTarget(a.node_id, a.node.hostname, indexes)
    target = Target(
        reservation_id=reservation.pk,
        public_id=reservation.public_id,
        workload=reservation.workload or {},
        nodes=tuple(by_node.values()),
        tier=reservation.tier,
        generation=reservation.placement_generation,
    )
    return attempt, failures, target


def _teardown_stop(
    *, attempt: ProvisioningAttempt, failures: int, target: Target, driver: Driver, window: float
) -> StepResult:
    try:
        check = _wait_ready(target, probe=driver.stop, window=window)
    except (DriverError, NodeFailure, WorkloadFailure) as exc:
        delay = retry_backoff(failures + 1)
        _attempt_finish(attempt, AttemptOutcome.ERROR, error=str(exc), retry_in=delay)
        return StepResult("retry", retry_in=delay, detail=str(exc))
    if check.state == "pending":
        _attempt_finish(
            attempt, AttemptOutcome.WAITING, error=check.detail, retry_in=WAITING_RECHECK_SECONDS
        )
        return StepResult("waiting", retry_in=WAITING_RECHECK_SECONDS, detail=check.detail)
    _attempt_finish(attempt, AttemptOutcome.SUCCEEDED)
    return StepResult("torn_down")


def _complete(reservation: Reservation, cause: str) -> Reservation:
    done = reservation_transition(
        reservation=reservation,
        to_status=ReservationStatus.COMPLETED,
        cause=cause,
        actor_label=ACTOR,
    )
    # Whatever outage is still open ends with the reservation (billing stops at released_at).
    ReservationOutage.objects.filter(reservation=done, ended_at__isnull=True).update(
        ended_at=done.released_at
    )
    return done


# --- outages --------------------------------------------------------------------------------

# The cause of a reservation's outage from the moment its container was found gone or stalled
# until its workload, restarted in place, is active again (agent_reports).
WORKLOAD_LOST_CAUSE = "workload_lost"


def _affected_reservations(node: Node, *, now: datetime) -> dict[int, datetime]:
    """Active reservations an outage of this node hits now: those with a live allocation on
    it that holds now (one moved there from a later time is not hit yet, nor a term whose
    GPUs there are resold for now: their buyer is hit), with the start of that time."""
    rows = (
        Allocation.objects.filter(
            node=node,
            is_live=True,
            reservation__status=ReservationStatus.ACTIVE,
            period__contains=now,
        )
        .values("reservation_id")
        .annotate(since=Min(Func(F("period"), function="lower")))
        .order_by("reservation_id")
    )
    return {row["reservation_id"]: row["since"] for row in rows}


@transaction.atomic
def reservation_outages_record_for_node(
    *,
    node: Node,
    started_at: datetime,
    cause: str,
    source_outage: Outage | None = None,
    now: datetime | None = None,
) -> list[ReservationOutage]:
    """Open an outage on every active reservation served by `node` now (none other is touched).

    Idempotent: a reservation that already has an open outage on this node keeps it. The
    outage starts no earlier than the reservation's activation nor its time on the node (no
    time is credited twice, none before it was there).
    """
    affected = _affected_reservations(node, now=now or timezone.now())
    created = []
    for reservation in Reservation.objects.filter(pk__in=affected).order_by("pk"):
        if ReservationOutage.objects.filter(
            reservation=reservation, node=node, ended_at__isnull=True
        ).exists():
            continue
        created.append(
            ReservationOutage.objects.create(
                reservation=reservation,
                node=node,
                source_outage=source_outage,
                started_at=max(
                    started_at, reservation.activated_at or started_at, affected[reservation.pk]
                ),
                cause=cause,
                detail=source_outage.detail if source_outage else "",
            )
        )
    return created


@transaction.atomic
def reservation_outages_close_for_node(*, node: Node, ended_at: datetime) -> int:
    """Close the open reservation outages on this node; returns how many were closed."""
    return ReservationOutage.objects.filter(
        node=node, ended_at__isnull=True, started_at__lte=ended_at
    ).update(ended_at=ended_at)


def reservation_outages_reconcile() -> tuple[int, int]:
    """Mirror inventory outages onto the active reservations they hit; (opened, closed).

    Inventory knows nothing of reservations, so this runs periodically on the marketplace
    side: each open node Outage gets a ReservationOutage on each affected active reservation,
    and reservation outages whose node outage has closed are closed at the same time.
    """
    opened = closed = 0
    # GPU outages (Outage.gpu) hit only the work on that GPU: marketplace.services.gpu_failures.
    for outage in Outage.objects.filter(ended_at__isnull=True, gpu=None).select_related("node"):
        opened += len(
            reservation_outages_record_for_node(
                node=outage.node,
                started_at=outage.started_at,
                cause=outage.cause,
                source_outage=outage,
            )
        )
    still_open = ReservationOutage.objects.filter(
        ended_at__isnull=True, source_outage__ended_at__isnull=False
    ).select_related("source_outage")
    for ro in still_open:
        closed += ReservationOutage.objects.filter(pk=ro.pk, ended_at__isnull=True).update(
            ended_at=max(ro.source_outage.ended_at, ro.started_at)
        )
    return opened, closed + _outages_close_moved_off() + workload_lost_outages_close()


def _outages_close_moved_off() -> int:
    """Close the node outages of reservations moved off the node: at the end of their time on
    it (billing counts the node's outage only that long). A GPU failure's outage is left to
    run until the workload is active again on its new GPUs (gpu_failures), and so is a lost
    workload's until it is active again after its restart."""
    on_node = Allocation.objects.filter(
        reservation_id=OuterRef("reservation_id"), node_id=OuterRef("node_id")
    )
    moved_off = (
        ReservationOutage.objects.filter(ended_at__isnull=True)
        .exclude(cause__in=[OutageCause.GPU_FAILURE, WORKLOAD_LOST_CAUSE])
        .exclude(Exists(on_node.filter(is_live=True)))
        .annotate(
            left_at=Subquery(
                on_node.exclude(period__isempty=True)
                .order_by()
                .values("reservation_id")
                .annotate(last=Max(Func(F("period"), function="upper")))
                .values("last")
            )
        )
    )
    closed = 0
    for ro in moved_off:
        closed += ReservationOutage.objects.filter(pk=ro.pk, ended_at__isnull=True).update(
            ended_at=max(ro.left_at or ro.started_at, ro.started_at)
        )
    return closed


def workload_lost_outages_close(*, reservation_id: int | None = None) -> int:
    """Close the outages of workloads restarted in place (WORKLOAD_LOST_CAUSE), of every
    reservation or of one: at their first move to active since the outage began, so billing
    resumes from then; one that ended without running again (failed while restarting,
    cancelled) at its release."""
    closed = 0
    open_outages = ReservationOutage.objects.filter(
        ended_at__isnull=True, cause=WORKLOAD_LOST_CAUSE
    ).select_related("reservation")
    if reservation_id is not None:
        open_outages = open_outages.filter(reservation_id=reservation_id)
    for outage in open_outages:
        back = reservation_active_again_at(outage) or outage.reservation.released_at
        if back is None:
            continue  # still being restarted
        closed += ReservationOutage.objects.filter(pk=outage.pk, ended_at__isnull=True).update(
            ended_at=max(back, outage.started_at)
        )
    return closed
