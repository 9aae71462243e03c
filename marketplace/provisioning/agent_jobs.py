"""The job queue site agents pull from: enqueue, lease, progress, complete, fail.

A job is leased to one agent at a time under a random lease id with an expiry; progress
extends it. An expired lease is handed out again (the first agent is presumed dead); only the
holder of the current lease id may report, and a job done once stays done.
"""

import secrets
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import BooleanField, Exists, F, Func, OuterRef, Q
from django.utils import timezone

from config.errors import Conflict, NotFound
from config.request_id import current_request_id
from inventory.models import Node, NodeStatus
from marketplace.models import (
    AgentJob,
    AgentJobStatus,
    Reservation,
    ReservationStatus,
)
from marketplace.models.provisioning import AGENT_JOB_FINAL
from marketplace.provisioning.kicks import provisioning_kick, release_kick

__all__ = [
    "agent_job_enqueue",
    "agent_job_lease",
    "agent_job_progress",
    "agent_job_complete",
    "agent_job_fail",
    "AGENT_JOB_WAITING_SQL",
]

# A prepare or start job is handed out only while its reservation is in one of these
# statuses, and only to a node in one of these (a stop job always is).
_LIVE = (
    ReservationStatus.PENDING,
    ReservationStatus.SCHEDULED,
    ReservationStatus.PROVISIONING,
    ReservationStatus.ACTIVE,
)
_WORKLOAD_NODE_STATUSES = (NodeStatus.AVAILABLE, NodeStatus.DRAINING)
_WORKLOAD_KINDS = ("prepare", "start")
# work_waiting is read before the heartbeat brings an offline node back (available or
# draining again), so its prepare and start jobs count already.
_WAITING_NODE_STATUSES = (*_WORKLOAD_NODE_STATUSES, NodeStatus.OFFLINE)


def _sql_in(choices) -> str:
    return ", ".join(f"'{choice.value}'" for choice in choices)


# Whether agent_job_lease could hand the node a job now or soon, for the heartbeat's answer
# (registered with inventory.agent_work by marketplace.apps): one queued, or leased with its
# lease run out, that the lease would hand out rather than cancel or hold back: a stop, or a
# prepare or start of a live reservation's current placement on a node in service (an
# offline node counts: the heartbeat that reads this brings it back). A start still waiting
# for its prepare counts: the node is busy with that prepare anyway. Read through the index
# on (node, status, id); the reservation and the node by their primary keys.
AGENT_JOB_WAITING_SQL = (
    f"EXISTS (SELECT 1 FROM {AgentJob._meta.db_table} j WHERE j.node_id = {{node_id}}"
    f" AND j.status IN ('{AgentJobStatus.QUEUED.value}', '{AgentJobStatus.LEASED.value}')"
    f" AND (j.status = '{AgentJobStatus.QUEUED.value}'"
    " OR j.lease_expires_at <= statement_timestamp())"
    " AND (j.kind = 'stop' OR ("
    f"EXISTS (SELECT 1 FROM {Reservation._meta.db_table} r WHERE r.id = j.reservation_id"
    f" AND r.status IN ({_sql_in(_LIVE)}) AND r.placement_generation <= j.generation)"
    f" AND EXISTS (SELECT 1 FROM {Node._meta.db_table} wn WHERE wn.id = j.node_id"
    f" AND wn.status IN ({_sql_in(_WAITING_NODE_STATUSES)})))))"
)


def agent_job_enqueue(
    *, reservation_id: int, node_id: int, kind: str, payload: dict, generation: int = 0
) -> AgentJob:
    """Queue a job once; a second call for the same (reservation, node, kind, generation)
    returns the first."""
    key = {"reservation_id": reservation_id, "node_id": node_id, "kind": kind}
    key["generation"] = generation
    existing = AgentJob.objects.filter(**key).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return AgentJob.objects.create(
                **key,
                payload=payload,
                # The task that queues the job runs under the id of the request that enqueued it.
                request_id=_request_id_or_blank(),
            )
    except IntegrityError:
        # Another worker queued it between our read and our insert.
        return AgentJob.objects.get(**key)


def _request_id_or_blank() -> str:
    request_id = current_request_id()
    return "" if request_id == "-" else request_id


@transaction.atomic
def agent_job_lease(*, node: Node, lease_seconds: int | None = None) -> AgentJob | None:
    """Lease the node's next job, or None. Rows another agent is leasing are skipped.

    Never a prepare or start job whose reservation is no longer live or was placed again since
    (it is cancelled instead) or on a node out of service; a stop job is always handed out."""
    now = timezone.now()
    lease = (
        timedelta(seconds=lease_seconds) if lease_seconds is not None else settings.AGENT_JOB_LEASE
    )
    same_place = {"reservation_id": OuterRef("reservation_id"), "node_id": OuterRef("node_id")}
    prepare_not_done = AgentJob.objects.filter(
        **same_place, kind="prepare", generation=OuterRef("generation")
    ).exclude(status=AgentJobStatus.DONE)
    # A container on this node is still being taken down (a stop never waits for anything, so
    # nothing waits in a circle; a stop that failed or was cancelled no longer holds a start
    # back, one whose lease expired is handed out again first): this reservation's container
    # of an earlier generation, or another reservation's on any of the GPUs the start needs
    # (e.g. a seller's, whose GPUs were resold from this moment).
    stop_open = AgentJob.objects.filter(
        Q(reservation_id=OuterRef("reservation_id"), generation__lt=OuterRef("generation"))
        | (
            ~Q(reservation_id=OuterRef("reservation_id"))
            & Q(_JsonArraysOverlap("payload__gpu_indexes", OuterRef("payload__gpu_indexes")))
        ),
        node_id=OuterRef("node_id"),
        kind="stop",
        status__in=[AgentJobStatus.QUEUED, AgentJobStatus.LEASED],
    )
    available = AgentJob.objects.filter(node=node).filter(
        Q(status=AgentJobStatus.QUEUED) | Q(status=AgentJobStatus.LEASED, lease_expires_at__lte=now)
    )
    # Only the job row is locked (not its reservation, which a worker may hold); the statuses
    # come along through the joins to say whether the job may still run.
    candidates = (
        available.select_for_update(skip_locked=True, of=("self",))
        # A node out of service (maintenance, offline, retired) gets stops only.
        .filter(Q(kind="stop") | Q(node__status__in=_WORKLOAD_NODE_STATUSES))
        # A start job waits for its prepare job, and for the stops of containers in its way.
        .exclude(Q(kind="start") & (Exists(prepare_not_done) | Exists(stop_open)))
        .annotate(
            reservation_status=F("reservation__status"),
            reservation_generation=F("reservation__placement_generation"),
        )
        .order_by("id")
    )
    job = candidates.first()
    while job is not None and job.kind != "stop" and not _may_run(job):
        # Its reservation ended (cancelled, failed, preempted, released), or moved on to a
        # later placement since (its agent lost the lease mid-job): its prepare and start must
        # not run (an old start would put the workload back on GPUs it left). Rare, so the
        # check rides on the lease's own query, and all such jobs of the node are cancelled at
        # once when one turns up: those no other agent's lease has locked (waiting for them
        # could deadlock with that agent doing the same).
        workload = available.filter(kind__in=_WORKLOAD_KINDS)
        for moot, error in (
            (
                workload.exclude(reservation__status__in=_LIVE),
                "Not handed out: its reservation is no longer live.",
            ),
            (
                workload.filter(generation__lt=F("reservation__placement_generation")),
                "Not handed out: its reservation was placed again since.",
            ),
        ):
            AgentJob.objects.filter(
                pk__in=moot.select_for_update(skip_locked=True, of=("self",)).values("pk")
            ).update(status=AgentJobStatus.CANCELLED, error=error, finished_at=now)
        job = candidates.first()
    if job is None:
        return None
    job.status = AgentJobStatus.LEASED
    job.lease_owner = secrets.token_urlsafe(24)
    job.lease_expires_at = now + lease
    job.attempts += 1
    job.save(update_fields=["status", "lease_owner", "lease_expires_at", "attempts", "updated_at"])
    return job


def _may_run(job: AgentJob) -> bool:
    """A prepare or start (annotated by agent_job_lease) is of a live reservation's current
    placement."""
    return job.reservation_status in _LIVE and job.generation >= job.reservation_generation


class _JsonArraysOverlap(Func):
    """Whether two JSON arrays (jsonb) have an element in common."""

    output_field = BooleanField()

    def as_sql(self, compiler, connection, **extra_context):
        left, right = (compiler.compile(e) for e in self.get_source_expressions())
        sql = (
            f"EXISTS (SELECT 1 FROM jsonb_array_elements({left[0]}) AS a(v)"
            f" JOIN jsonb_array_elements({right[0]}) AS b(v) ON a.v = b.v)"
        )
        return sql, (*left[1], *right[1])


def _locked_job(*, node: Node, job_id: int) -> AgentJob:
    job = AgentJob.objects.select_for_update().filter(pk=job_id, node=node).first()
    if job is None:
        raise NotFound("No such job for this node.", code="job_not_found")
    return job


def _refuse_unless_holder(job: AgentJob, lease_id: str) -> None:
    if job.status in (AgentJobStatus.DONE, AgentJobStatus.FAILED, AgentJobStatus.CANCELLED):
        raise Conflict(f"The job is already {job.status}.", code="job_finished")
    if job.status != AgentJobStatus.LEASED or not secrets.compare_digest(job.lease_owner, lease_id):
        raise Conflict(
            "This lease is no longer valid: the job was handed to another agent.",
            code="lease_lost",
            field="lease_id",
        )


@transaction.atomic
def agent_job_progress(
    *, node: Node, job_id: int, lease_id: str, progress: dict, lease_seconds: int | None = None
) -> AgentJob:
    """Record progress and extend the lease. Refused once the lease passed to someone else."""
    job = _locked_job(node=node, job_id=job_id)
    _refuse_unless_holder(job, lease_id)
    lease = (
        timedelta(seconds=lease_seconds) if lease_seconds is not None else settings.AGENT_JOB_LEASE
    )
    job.progress = progress
    job.lease_expires_at = timezone.now() + lease
    job.save(update_fields=["progress", "lease_expires_at", "updated_at"])
    return job


def _finish(job: AgentJob, *, status: str, result: dict, error: str) -> AgentJob:
    job.status = status
    job.result = result
    job.error = error
    job.finished_at = timezone.now()
    job.save(update_fields=["status", "result", "error", "finished_at", "updated_at"])
    # The reservation's task is waiting for this: wake it now rather than at its next check.
    if job.kind == "stop":
        release_kick(job.reservation_id)
    else:
        provisioning_kick(job.reservation_id)
    return job


@transaction.atomic
def agent_job_complete(*, node: Node, job_id: int, lease_id: str, result: dict) -> AgentJob:
    """Mark the job done with its result. Repeating the same completion is harmless.

    A holder whose lease expired may still complete while nobody else has taken the job;
    once it was handed out again, only the new holder may.
    """
    job = _locked_job(node=node, job_id=job_id)
    if job.status == AgentJobStatus.DONE and secrets.compare_digest(job.lease_owner, lease_id):
        return job
    _refuse_unless_holder(job, lease_id)
    done = _finish(job, status=AgentJobStatus.DONE, result=result, error="")
    if done.kind == "start":
        _late_start_stop(done)
    return done


def _late_start_stop(start: AgentJob) -> None:
    """A start that an agent completed after its reservation ended (it held the lease when the
    teardown cancelled what was still queued), or after the reservation moved to a later
    placement (it held the lease when the move superseded it), left a container running: the
    stop of its generation on that node runs again, though it may have run before the
    container existed. (An agent's stop leaves a later generation's container alone.)"""
    moot = (
        Reservation.objects.filter(pk=start.reservation_id)
        .filter(~Q(status__in=_LIVE) | Q(placement_generation__gt=start.generation))
        .exists()
    )
    if not moot:
        return
    rerun = AgentJob.objects.filter(
        reservation_id=start.reservation_id,
        node_id=start.node_id,
        kind="stop",
        generation=start.generation,
        status__in=AGENT_JOB_FINAL,
    ).update(
        status=AgentJobStatus.QUEUED, lease_owner="", lease_expires_at=None, finished_at=None,
        error="",
    )  # fmt: skip
    if rerun:
        release_kick(start.reservation_id)


@transaction.atomic
def agent_job_fail(
    *,
    node: Node,
    job_id: int,
    lease_id: str,
    error: str,
    node_failure: bool = False,
    stopped_by: str | None = None,
) -> AgentJob:
    """Mark the job failed. node_failure says the node itself is bad (not the workload);
    stopped_by that the site stopped its container from outside (the driver retries it)."""
    job = _locked_job(node=node, job_id=job_id)
    if job.status == AgentJobStatus.FAILED and secrets.compare_digest(job.lease_owner, lease_id):
        return job
    _refuse_unless_holder(job, lease_id)
    result: dict = {"node_failure": node_failure}
    if stopped_by:
        result["stopped_by"] = stopped_by
    return _finish(job, status=AgentJobStatus.FAILED, result=result, error=error)
