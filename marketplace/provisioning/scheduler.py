"""What is due and what is stuck: the dispatcher and the sweeper (enqueueing: kicks.py).

The schedule lives in PostgreSQL (starts_at, ends_at, status), never in a countdown parked in
Redis. Beat runs the dispatcher every PROVISIONING_DISPATCH_INTERVAL_SECONDS (5 s): a
reservation starts and ends within that interval plus the queue latency (well under a second
on an idle worker) of its time. The dispatcher enqueues the provision or release task of what
is due, after its batch commits, and leaves a marker so the next ticks do not enqueue it again
while the task waits in the queue; the task makes the move (scheduled → provisioning,
active → releasing). A failed enqueue drops the marker and a lost message outlives it
(REDISPATCH_AFTER), so the next tick tries again. The sweeper re-enqueues a reservation stuck
in provisioning or releasing (a killed worker) once it has shown no progress for
PROVISIONING_STUCK_AFTER_SECONDS, and fails one whose period ended before it could start.
"""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, F, Max, OuterRef, Q, Subquery
from django.utils import timezone

from config.celery import BROKER_ERRORS, app
from marketplace.models import (
    AttemptOutcome,
    ListingStatus,
    ProvisioningAttempt,
    ProvisioningDispatch,
    ProvisioningKind,
    ResaleListing,
    Reservation,
    ReservationStatus,
    ReservationTransition,
)
from marketplace.provisioning.kicks import PROVISION_TASK, RELEASE_TASK, enqueue_now
from marketplace.provisioning.services import (
    RESOLD_PAUSE_CAUSE,
    period_over_cause,
    reservation_resale_resync,
    reservations_locked_by_workers,
    teardown_needed,
)
from marketplace.services.curtailment import reservations_preempt_due
from marketplace.services.transitions import reservation_transition

__all__ = [
    "reservations_dispatch_due",
    "reservations_sweep_stuck",
    "reservations_resale_resync",
]

logger = logging.getLogger(__name__)
# A reservation moved to provisioning/releasing whose task has not started after this long is
# enqueued again (a task waiting in a long queue just finds the work done: no harm).
_FIRST_ATTEMPT_GRACE = timedelta(seconds=20)
# A due reservation whose task was enqueued this long ago and has still not moved it is
# enqueued again (the message may have been lost; a duplicate is a no-op).
REDISPATCH_AFTER = timedelta(seconds=60)
# Workloads of reservations that ended without a release are stopped if they ended this recently
# (bounds the dispatcher's query; a day of retries is plenty).
_TEARDOWN_WINDOW = timedelta(days=1)
# One dispatcher run handles at most this many batches; the next run takes the rest.
_MAX_BATCHES_PER_RUN = 50


def _enqueue_batch(task_name: str, kind: str, reservation_ids: list[int]) -> None:
    """After commit: send the tasks over one producer; forget the markers of failed sends so
    the next tick tries those again."""
    failed: list[int] = []
    try:
        with app.producer_or_acquire() as producer:
            for pk in reservation_ids:
                try:
                    app.send_task(
                        task_name,
                        args=[pk],
                        producer=producer,
                        retry=True,
                        retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2},
                    )
                except BROKER_ERRORS:
                    failed.append(pk)
    except BROKER_ERRORS:
        failed = list(reservation_ids)
    if failed:
        logger.warning(
            "could not enqueue %s for %d reservation(s) (broker unreachable?); the next "
            "dispatch retries them",
            task_name,
            len(failed),
        )
        ProvisioningDispatch.objects.filter(reservation_id__in=failed, kind=kind).delete()


def _dispatch_batch(*, now: datetime, batch: int, starting: bool) -> int:
    kind = ProvisioningKind.PROVISION if starting else ProvisioningKind.RELEASE
    recently_enqueued = ProvisioningDispatch.objects.filter(
        reservation_id=OuterRef("pk"), kind=kind, enqueued_at__gt=now - REDISPATCH_AFTER
    )
    if starting:
        due = Reservation.objects.filter(
            status__in=[ReservationStatus.PENDING, ReservationStatus.SCHEDULED], starts_at__lte=now
        )
        order = ("starts_at", "pk")
    else:
        stopped = ProvisioningAttempt.objects.filter(
            reservation_id=OuterRef("pk"),
            kind=ProvisioningKind.RELEASE,
            outcome__in=[AttemptOutcome.SUCCEEDED, AttemptOutcome.GAVE_UP],
        )
        # Due to end, or ended without a release after its workload may have been started
        # (cancelled while provisioning, preempted, failed): the release task stops what the
        # driver was asked to run for the latter (see services._teardown_prepare).
        due = Reservation.objects.filter(
            Q(status=ReservationStatus.ACTIVE, ends_at__lte=now)
            | (teardown_needed() & Q(released_at__gte=now - _TEARDOWN_WINDOW) & ~Exists(stopped))
        )
        order = ("ends_at", "pk")
    with transaction.atomic():
        # Rows a task or another dispatcher holds are skipped; the next run gets them.
        ids = list(
            due.exclude(Exists(recently_enqueued))
            .select_for_update(skip_locked=True, of=("self",))
            .order_by(*order)
            .values_list("pk", flat=True)[:batch]
        )
        if ids:
            ProvisioningDispatch.objects.bulk_create(
                [ProvisioningDispatch(reservation_id=pk, kind=kind, enqueued_at=now) for pk in ids],
                update_conflicts=True,
                unique_fields=["reservation", "kind"],
                update_fields=["enqueued_at"],
            )
            task = PROVISION_TASK if starting else RELEASE_TASK
            transaction.on_commit(lambda: _enqueue_batch(task, kind, ids))
    return len(ids)


def reservations_dispatch_due(*, now: datetime | None = None, batch: int | None = None) -> dict:
    """Preempt what a curtailment notice ends now, then enqueue the provision task of every
    reservation due to start and the release task of every one due to end (or ended without a
    release after its workload may have started: a teardown), in small SKIP LOCKED batches,
    after each batch commits.

    The tasks make the moves themselves (scheduled → provisioning, active → releasing), in
    parallel on the workers: the dispatcher's own work per reservation is a marker row.
    """
    now = now or timezone.now()
    batch = batch or settings.PROVISIONING_DISPATCH_BATCH
    # Notices that ran out first: a preempted running reservation is then torn down below.
    counts = {
        "preempted": reservations_preempt_due(now=now),
        # Before the starts below: a seller leaves the GPUs a buyer starts on in this tick.
        "resold": reservations_resale_resync(now=now),
        "started": 0,
        "ended": 0,
    }
    for key, starting in (("ended", False), ("started", True)):
        for _ in range(_MAX_BATCHES_PER_RUN):
            n = _dispatch_batch(now=now, batch=batch, starting=starting)
            counts[key] += n
            if n < batch:
                break
    return counts


# Edges of resold windows older than this are not looked for again (the dispatcher runs every
# few seconds; a day bounds the query).
_RESALE_EDGE_WINDOW = timedelta(days=1)


def reservations_resale_resync(*, now: datetime | None = None, limit: int = 200) -> int:
    """Running reserved terms with a resold window that began or ended since their workload
    was placed (their last move to provisioning, or their pause): each is restarted on the
    GPUs it holds now, paused, or released (provisioning.services.reservation_resale_resync).
    Returns how many changed."""
    now = now or timezone.now()
    since = now - _RESALE_EDGE_WINDOW
    placed_at = Subquery(
        ReservationTransition.objects.filter(reservation_id=OuterRef("reservation_id"))
        .filter(
            Q(to_status=ReservationStatus.PROVISIONING)
            | Q(
                from_status=ReservationStatus.ACTIVE,
                to_status=ReservationStatus.ACTIVE,
                cause__startswith=RESOLD_PAUSE_CAUSE,
            )
        )
        .order_by("-at", "-id")
        .values("at")[:1]
    )
    edges = (
        ResaleListing.objects.filter(
            status=ListingStatus.SOLD, reservation__status=ReservationStatus.ACTIVE
        )
        .filter(Q(starts_at__gt=since, starts_at__lte=now) | Q(ends_at__gt=since, ends_at__lte=now))
        .annotate(placed_at=placed_at)
        .filter(
            Q(starts_at__lte=now, starts_at__gt=F("placed_at"))
            | Q(ends_at__lte=now, ends_at__gt=F("placed_at"))
        )
        .values_list("reservation_id", "placed_at")
    )
    due = dict(sorted(edges[:limit]))
    changed = 0
    for reservation_id, placed in due.items():
        outcome = reservation_resale_resync(
            reservation_id=reservation_id, placed_at=placed, now=now
        )
        changed += outcome not in ("skipped", "unchanged")
    return changed


def reservations_sweep_stuck(
    *, now: datetime | None = None, stuck_after=None, limit: int = 500
) -> dict:
    """Re-enqueue provisioning/releasing reservations nobody is working on and that showed no
    progress for `stuck_after`; fail those still provisioning after their period ended.

    The step itself counts the attempts a dead worker left behind and gives up after
    PROVISIONING_MAX_ATTEMPTS, so re-enqueueing here always ends.
    """
    now = now or timezone.now()
    stuck_after = settings.PROVISIONING_STUCK_AFTER if stuck_after is None else stuck_after
    busy = reservations_locked_by_workers()
    # Only the attempts of the step the reservation is in (a releasing one had provision ones).
    same_kind = Q(
        status=ReservationStatus.PROVISIONING, provisioning_attempts__kind="provision"
    ) | Q(status=ReservationStatus.RELEASING, provisioning_attempts__kind="release")
    candidates = (
        Reservation.objects.filter(
            status__in=[ReservationStatus.PROVISIONING, ReservationStatus.RELEASING]
        )
        .annotate(
            last_started=Max("provisioning_attempts__started_at", filter=same_kind),
            last_finished=Max("provisioning_attempts__finished_at", filter=same_kind),
            next_attempt=Max("provisioning_attempts__next_attempt_at", filter=same_kind),
        )
        .order_by("updated_at", "pk")[:limit]
    )
    counts = {"requeued": 0, "failed": 0}
    for r in candidates:
        if r.pk in busy:
            continue
        if r.status == ReservationStatus.PROVISIONING and now >= r.ends_at:
            with transaction.atomic():
                locked = Reservation.objects.select_for_update(skip_locked=True).filter(
                    pk=r.pk, status=ReservationStatus.PROVISIONING
                )
                for row in locked:
                    reservation_transition(
                        reservation=row,
                        to_status=ReservationStatus.FAILED,
                        cause=period_over_cause(row),
                        actor_label="system: provisioning sweeper",
                    )
                    counts["failed"] += 1
            continue
        last_activity = max(
            t for t in (r.updated_at, r.last_started, r.last_finished, r.next_attempt) if t
        )
        # No attempt at all yet: the enqueue after the state change was probably lost (a
        # broker outage, or a caller that did not kick), so do not wait the full deadline.
        deadline = stuck_after if r.last_started else min(stuck_after, _FIRST_ATTEMPT_GRACE)
        if now - last_activity < deadline:
            continue
        task = PROVISION_TASK if r.status == ReservationStatus.PROVISIONING else RELEASE_TASK
        logger.warning(
            "reservation %s stuck in %s since %s; re-enqueueing",
            r.public_id,
            r.status,
            last_activity,
        )
        if enqueue_now(task, r.pk):
            counts["requeued"] += 1
    return counts
