"""Provisioning records: attempts of the lifecycle tasks, site-agent jobs, reservation outages."""

from django.db import models
from django.db.models import Q

from inventory.models import Node, Outage
from marketplace.models.core import Reservation

__all__ = [
    "ProvisioningKind",
    "AttemptOutcome",
    "ProvisioningAttempt",
    "ReservationWorkerLease",
    "ProvisioningDispatch",
    "AgentJobKind",
    "AgentJobStatus",
    "AgentJob",
    "ReservationOutage",
]


class ProvisioningKind(models.TextChoices):
    PROVISION = "provision"
    RELEASE = "release"


class AttemptOutcome(models.TextChoices):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    # The driver is still working (e.g. a site agent has not reported yet); checked again soon.
    WAITING = "waiting"
    ERROR = "error"
    NODE_FAILURE = "node_failure"
    # The worker died (or lost its database session) while the attempt ran.
    ABANDONED = "abandoned"
    GAVE_UP = "gave_up"


# Outcomes that count towards PROVISIONING_MAX_ATTEMPTS.
FAILED_OUTCOMES = (AttemptOutcome.ERROR, AttemptOutcome.ABANDONED)


class ReservationWorkerLease(models.Model):
    """Which worker is acting on a reservation, until when: one row per reservation at most.

    A row, not a session advisory lock, so it holds behind a transaction-mode pooler (where a
    session's next statement may run on another server connection). A worker that dies leaves
    its row until `expires_at`, which is the task's hard time limit: no live task holds it longer.
    """

    reservation = models.OneToOneField(
        Reservation, on_delete=models.CASCADE, primary_key=True, related_name="+"
    )
    holder = models.CharField(max_length=64)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.reservation_id} held by {self.holder} until {self.expires_at}"


class ProvisioningAttempt(models.Model):
    """One run of a provision or release task for a reservation, numbered from 1.

    The unique (reservation, kind, number) key means two deliveries of the same task can never
    both record attempt n; the sweeper reads these rows to tell stuck work from slow work.
    """

    reservation = models.ForeignKey(
        Reservation, on_delete=models.CASCADE, related_name="provisioning_attempts"
    )
    kind = models.CharField(max_length=10, choices=ProvisioningKind.choices)
    number = models.PositiveIntegerField()
    outcome = models.CharField(
        max_length=20, choices=AttemptOutcome.choices, default=AttemptOutcome.RUNNING
    )
    error = models.TextField(blank=True)
    worker = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["reservation_id", "kind", "number"]
        constraints = [
            models.UniqueConstraint(
                fields=["reservation", "kind", "number"], name="provisioning_attempt_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reservation_id} {self.kind} #{self.number} {self.outcome}"


class ProvisioningDispatch(models.Model):
    """When the dispatcher last enqueued a reservation's provision or release task.

    The schedule itself is the reservation's status and times; this only keeps the dispatcher
    from enqueueing the same due reservation again on every tick while its task waits in the
    queue. A marker older than the redispatch interval (or removed after a failed enqueue)
    lets the next tick enqueue it again, so a lost message costs a delay, never the start.
    """

    reservation = models.ForeignKey(Reservation, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(max_length=10, choices=ProvisioningKind.choices)
    enqueued_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["reservation", "kind"], name="provisioning_dispatch_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reservation_id} {self.kind} enqueued {self.enqueued_at}"


class AgentJobKind(models.TextChoices):
    PREPARE = "prepare"
    START = "start"
    STOP = "stop"


class AgentJobStatus(models.TextChoices):
    QUEUED = "queued"
    LEASED = "leased"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


AGENT_JOB_FINAL = (AgentJobStatus.DONE, AgentJobStatus.FAILED, AgentJobStatus.CANCELLED)


class AgentJob(models.Model):
    """Work for the site agent of one node; agents behind NAT pull these over the API.

    Unique per (reservation, node, kind, generation): a job is created once, and once done it
    cannot be done again. The generation is the reservation's placement generation: a move
    to other GPUs raises it, so the workload is stopped and started afresh even on a node
    that already ran it. A lease that expires hands the job to the next agent that asks; only
    the current lease id may report on it.
    """

    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="agent_jobs")
    reservation = models.ForeignKey(
        Reservation, on_delete=models.CASCADE, related_name="agent_jobs"
    )
    kind = models.CharField(max_length=10, choices=AgentJobKind.choices)
    generation = models.PositiveIntegerField(
        default=0,
        db_default=0,
        help_text="The reservation's placement generation this job serves (a stop: the one "
        "it takes down).",
    )
    payload = models.JSONField(default=dict, help_text="Workload for the agent (secrets inside).")
    status = models.CharField(
        max_length=10, choices=AgentJobStatus.choices, default=AgentJobStatus.QUEUED
    )
    lease_owner = models.CharField(max_length=64, blank=True, help_text="Current lease id.")
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="How many times it was leased.")
    progress = models.JSONField(default=dict, blank=True)
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    request_id = models.CharField(
        max_length=64,
        blank=True,
        help_text="The request (Request-Id) that led to this job, carried into the agent's log.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["reservation", "node", "kind", "generation"],
                name="agent_job_unique_per_generation",
            ),
            models.CheckConstraint(
                condition=Q(status__in=AgentJobStatus.values), name="agent_job_status_valid"
            ),
            models.CheckConstraint(
                condition=~Q(status=AgentJobStatus.LEASED)
                | (Q(lease_expires_at__isnull=False) & ~Q(lease_owner="")),
                name="agent_job_leased_has_lease",
            ),
        ]
        indexes = [
            models.Index(fields=["node", "status", "id"]),
            # Staff find the jobs a request queued (the admin's search, a log's req_…).
            models.Index(fields=["request_id"], name="agent_job_request"),
        ]

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.reservation_id}#{self.generation} on {self.node_id} ({self.status})"
        )


class ReservationOutage(models.Model):
    """Time during which an active reservation was not served, because a node of it was out.

    Billing excludes these intervals from usage and computes SLA credits from them; the
    customer sees them on the reservation. Half-open [started_at, ended_at); open while ended_at
    is null.
    """

    reservation = models.ForeignKey(Reservation, on_delete=models.CASCADE, related_name="outages")
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="+")
    source_outage = models.ForeignKey(
        Outage,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="reservation_outages",
        help_text="The inventory outage this was derived from, if any.",
    )
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)
    cause = models.CharField(max_length=30)
    detail = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["reservation_id", "started_at"]
        constraints = [
            # One open outage per reservation and node: a second report extends the first.
            models.UniqueConstraint(
                fields=["reservation", "node"],
                condition=Q(ended_at__isnull=True),
                name="reservation_outage_one_open_per_node",
            ),
            models.CheckConstraint(
                condition=Q(ended_at__isnull=True) | Q(ended_at__gte=models.F("started_at")),
                name="reservation_outage_ends_after_start",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.reservation_id} outage on {self.node_id} from {self.started_at}"
