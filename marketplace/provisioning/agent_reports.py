"""What a site agent reports with each heartbeat: every container it runs and its state.

The rule, for an `active` reservation whose workload is not running on a node it holds GPUs on
now, decided when the platform learns of it (at most one agent heartbeat later):

- Its process exited by itself (`exited`, `stopped`, `dead`, with an exit code): the customer's
  own ending. It ends (`active → failed`, through the transition service); billing stops there
  (billing counts activated_at → released_at), and a reserved term's rest is not refunded.
- Its container vanished, stalled or was stopped from outside (missing, `created`, `paused`,
  `restarting`, …, or ended with the agent's `stopped_by`: the runtime records a stop or kill
  through it, or it ended before the node's last boot): not the customer's doing (a node
  reboot, a restarted runtime, an operator's `rm`, `stop` or `kill`). It is restarted in
  place, every tier alike, as a move off a failed GPU restarts it: a new placement generation on
  the same allocations, `active → provisioning` with the reason, and the provisioning worker
  (the agents: the old generation's stop, then a fresh prepare and start) runs it again. A
  reservation outage (WORKLOAD_LOST_CAUSE) runs from the report until it is active again, so
  metered tiers are not charged for the gap and the SLA counts it as downtime.
- A crash loop is not restarted for ever: once it was restarted PROVISIONING_WORKLOAD_RESTARTS
  times within PROVISIONING_WORKLOAD_RESTART_WINDOW, the next vanish ends it (`active →
  failed`, and a reserved term's undelivered rest is refunded), the reason saying so.

Billed to the last time it was seen running, not to the report that finds it gone: the
heartbeat before the node's previous report, which judged it and found it running (else that
report would have acted), or the start that left it running, or its last activation, whichever
is latest (`_seen_running_at`). The outage of a restart runs from then; an end's released_at
is then, or an exit's own time (`finished_at`) when the runtime gives one between then and
now. The node's last report is remembered in Redis (REPORTED_KEY: the heartbeat it was built
after); without that record (Redis lost it, the node's first report) billing runs to this
report, as it always could. A reservation not started through this node's agent is judged
only on a container reported for it, so a report that did not list it proves nothing: it is
billed to the report, or to its exit's own time.

The customer and staff see why as the reason: the exit code, the time and the last log lines
(secrets redacted), or the container's state, or that it is gone. The release task (after an
end) or the new generation's prepare (after a restart) removes the old container.

A report is complete: the agent lists every container it manages (`ps -a` by its label)
and sends nothing when it cannot list them, so a container absent from a report it did send
is not on the node. A workload is judged "not running" on this node when:

- its container is reported in any state but `running`, or
- it is missing from the report, and the node's agent started it: the start job of the
  reservation's current placement generation on this node is done.

Only once the report cannot predate the container: the start job finished before the
node's last heartbeat (the agent sends a heartbeat, then lists its containers, then reports,
in that order and one at a time; the agent completes a start only once the container runs).
A report built before that heartbeat may not show the new container yet, or still show the
leftover one the start replaced.

Never judged: a reservation that is not active (before, the start job judges the container;
after, it is stopping), one whose GPUs on this node are all resold for now (a term paused
for resale, `_resold_pause`, or about to be), a start of the current generation that is not
done, and a container stopped on purpose: a stop job of the current generation on this node
exists (a stop runs `stop` then `rm`, and a report in between shows it exited). The
decision, end or restart, is taken again under the reservation's row lock (still active,
same generation, no stop job), so a pause, a move or a release that commits meanwhile wins.

A reservation not started through this node's agent (no agent job at all: another driver)
is judged only on a container the agent reports for it, never on one missing.

A container reported for a reservation that no longer holds this node (it ended, or moved
off) is a leftover whose stop did not take it down (the stop failed, or another agent with
this node's token ran it): it still holds its GPUs, which may be sold again. Its stop on this
node (of the latest generation an agent started here) is queued again, or queued if there
was none, so the agent removes it and a start on those GPUs waits for that
(`_leftovers_stop`). Once a stop ended it is queued again only after the node heartbeated
and AGENT_JOB_LEASE passed, so a container no stop can remove is retried about once a lease.

The answer carries the preemption notices of the node's reservations, which the agent writes
into their containers (/run/switchyard/preemption).
"""

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from django.conf import settings
from django.db import transaction
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from config.dates import iso_utc
from config.errors import InvalidTransition
from inventory.heartbeats import heartbeats_buffered
from inventory.models import Node, OutageCause
from inventory.telemetry import buffer_client
from marketplace.models import (
    AgentJob,
    AgentJobStatus,
    Allocation,
    ListingStatus,
    ResaleListing,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    ReservationTransition,
    Tier,
)
from marketplace.models.provisioning import AGENT_JOB_FINAL
from marketplace.provisioning.agent_jobs import agent_job_enqueue
from marketplace.provisioning.drivers import _redact
from marketplace.provisioning.kicks import provisioning_kick
from marketplace.provisioning.services import (
    WORKLOAD_LOST_CAUSE,
    placement_generation_raise,
    workload_lost_outages_close,
)
from marketplace.services.gpu_failures import undelivered_refund
from marketplace.services.transitions import reservation_transition

__all__ = [
    "REPORTED_KEY",
    "agent_workloads_report",
    "EXITED_STATES",
    "RUNNING_STATE",
    "STOPPED_FROM_OUTSIDE",
    "workload_restarts",
    "workload_restarts_summary",
]

logger = logging.getLogger(__name__)
ACTOR = "system: site agent"
# The one container state (docker's and podman's) in which a workload delivers.
RUNNING_STATE = "running"
# Container states of a workload that ran and ended: the report carries its exit code.
EXITED_STATES = frozenset({"exited", "stopped", "dead"})
# What stopped an exited container from outside its workload (the agent's `stopped_by`), as
# the reason says it: the site's doing, not the customer's exit. "site": a cause a newer agent
# names that this server does not know.
STOPPED_FROM_OUTSIDE = {
    "runtime": "The workload was stopped from outside it: node {node}'s container runtime "
    "stopped or killed its container (a site operator, or the runtime shutting down), with "
    "code {code} at {at}",
    "reboot": "The workload was stopped by a restart of node {node}: its container ended with "
    "code {code} at {at}, before the node last booted",
    "site": "The workload was stopped from outside it on node {node}, with code {code} at {at}",
}
# Redis hash, node id → epoch of the heartbeat the node's last applied report followed.
REPORTED_KEY = "switchyard:workloads:reported_after"


@dataclass(frozen=True)
class _Judged:
    """A reservation the report may end, and what may end it."""

    reservation: Reservation
    generation: int
    started_here: bool  # this node's agent started it: a missing container ends it too
    running_at: datetime | None = None  # its start here finished, the container running


def _money_after_end(reservation: Reservation, *, own_exit: bool) -> str:
    """What the end means for the bill, true per tier (docs/money.md). own_exit: the workload
    ended itself (its process exited); otherwise its container vanished or stalled, which is
    not the customer's doing, and a reserved term's undelivered rest is refunded."""
    if reservation.tier != Tier.RESERVED:
        return "the reservation ended and the rest of its time is not charged."
    if own_exit:
        return (
            "the reservation ended. A reserved term is charged in full when it is booked: "
            "the rest of the term is not refunded when its workload ends itself."
        )
    return "the reservation ended, and the undelivered rest of the reserved term is refunded."


def _money_after_restart(reservation: Reservation) -> str:
    """What the restart means for the bill, per tier (docs/money.md)."""
    if reservation.tier == Tier.RESERVED:
        return "the time until it runs again counts as downtime of the term under the SLA."
    return "the time until it runs again is not charged."


def _log_suffix(report: dict, workload: dict) -> str:
    tail = _redact(report.get("log_tail") or "", workload)
    return f" Last log lines:\n{tail}" if tail else " It wrote no log."


def _not_running(report: dict | None, node: Node, now: datetime) -> str:
    """What the report says of the workload, as the reason's first half."""
    if report is None:
        return (
            f"The workload's container is gone: node {node.hostname}'s agent no longer runs it "
            f"(its report at {now.isoformat()})"
        )
    state = report.get("state")
    if state in EXITED_STATES:
        at = report.get("finished_at") or "an unknown time"
        if report.get("stopped_by"):
            text = STOPPED_FROM_OUTSIDE.get(report["stopped_by"], STOPPED_FROM_OUTSIDE["site"])
            return text.format(node=node.hostname, code=report.get("exit_code"), at=at)
        if report.get("oom_killed"):
            return (
                f"The workload ran out of memory: killed with code {report.get('exit_code')} "
                f"at {at} for using more memory than its share of the node"
            )
        return f"The workload exited with code {report.get('exit_code')} at {at}"
    return f"The workload is not running: its container is {state}"


def _last_heard(node: Node) -> datetime | None:
    """The node's last heartbeat: in the database, or in the buffer not yet flushed."""
    stored = Node.objects.filter(pk=node.pk).values_list("last_heartbeat_at", flat=True).first()
    buffered = heartbeats_buffered([node.pk]).get(node.pk)
    return max((t for t in (stored, buffered) if t is not None), default=None)


def _reported_after(node: Node) -> datetime | None:
    """The heartbeat the node's last applied report followed (REPORTED_KEY); None when there
    is no record of one, or Redis is down."""
    try:
        value = buffer_client().hget(REPORTED_KEY, str(node.pk))
    except (redis.RedisError, OSError):
        return None
    return None if value is None else datetime.fromtimestamp(float(value), tz=UTC)


def _reported_after_set(node: Node, heard: datetime) -> None:
    """Remember that this report, which followed the heartbeat `heard`, was applied."""
    try:
        buffer_client().hset(REPORTED_KEY, str(node.pk), f"{heard.timestamp():.6f}")
    except (redis.RedisError, OSError):
        logger.warning("could not record node %s's workload report", node.hostname)


def _last_active_at(reservation: Reservation) -> datetime | None:
    """When it last became active (its first activation, or its return after a restart)."""
    return (
        ReservationTransition.objects.filter(
            reservation=reservation, to_status=ReservationStatus.ACTIVE
        )
        .order_by("-at")
        .values_list("at", flat=True)
        .first()
    ) or reservation.activated_at


def _seen_running_at(item: _Judged, *, reported_after: datetime | None, now: datetime):
    """The last time the workload was known running on this node (the module's docstring),
    or None when nothing proves one after its start: the heartbeat before the node's previous
    report (which judged it, and found it running), its start's end here, its last
    activation, whichever is latest."""
    if not item.started_here or reported_after is None:
        return None
    known = [reported_after, item.running_at, _last_active_at(item.reservation)]
    return min(max(t for t in known if t is not None), now)


def _exit_time(value: str | None) -> datetime | None:
    """A container's exit time as the runtime printed it (RFC 3339, or Go's
    "2006-01-02 15:04:05.999 +0000 UTC"); None if absent or without a zone."""
    if not value:
        return None
    text = value.removesuffix(" UTC").replace(" +", "+").replace(" -", "-")
    try:
        parsed = parse_datetime(text.replace(" ", "T", 1))
    except ValueError:
        return None
    return parsed if parsed is not None and parsed.tzinfo is not None else None


def _exited_at(item: _Judged, report: dict, *, seen: datetime | None, now: datetime):
    """When a workload that exited by itself stopped delivering: the runtime's exit time,
    no earlier than it was last seen running (or its last activation) and no later than now;
    without one, when it was last seen running, else now."""
    finished = _exit_time(report.get("finished_at"))
    if finished is None:
        return seen or now
    floor = seen or max(
        t for t in (item.running_at, _last_active_at(item.reservation)) if t is not None
    )
    return min(max(finished, floor), now)


def _holding_here_now(node: Node, reservation_ids: list[int], now: datetime) -> set[int]:
    """Those of the reservations holding a GPU on this node now that is not resold now."""
    held = Allocation.objects.filter(
        node=node, reservation_id__in=reservation_ids, is_live=True, period__contains=now
    ).values_list("reservation_id", "gpu_id")
    sold: dict[int, set[int]] = {}
    for rid, gpu_ids in ResaleListing.objects.filter(
        reservation_id__in=reservation_ids,
        status=ListingStatus.SOLD,
        starts_at__lte=now,
        ends_at__gt=now,
    ).values_list("reservation_id", "gpu_ids"):
        sold.setdefault(rid, set()).update(gpu_ids)
    return {rid for rid, gpu_id in held if gpu_id not in sold.get(rid, ())}


def _judged(
    node: Node, active: list[Reservation], now: datetime, *, heard: datetime | None
) -> list[_Judged]:
    """The active reservations this report may end (the module's docstring says which).
    heard: the node's last heartbeat, which this report followed."""
    if not active:
        return []
    holding = _holding_here_now(node, [r.pk for r in active], now)
    jobs: dict[int, list[AgentJob]] = {}
    for job in AgentJob.objects.filter(reservation_id__in=holding).only(
        "reservation_id", "node_id", "kind", "generation", "status", "finished_at"
    ):
        jobs.setdefault(job.reservation_id, []).append(job)
    judged = []
    for r in active:
        if r.pk not in holding:
            continue  # every GPU of it here is resold for now: its container is stopped
        its_jobs = jobs.get(r.pk, [])
        if not its_jobs:
            judged.append(_Judged(r, r.placement_generation, started_here=False))
            continue
        here = [
            j for j in its_jobs if j.node_id == node.pk and j.generation == r.placement_generation
        ]
        if any(j.kind == "stop" for j in here):
            continue  # stopped on purpose
        start = next((j for j in here if j.kind == "start"), None)
        if (
            start is None
            or start.status != AgentJobStatus.DONE
            or start.finished_at is None
            or heard is None
            or start.finished_at >= heard
        ):
            continue  # not started here yet, or the report may predate the container
        judged.append(
            _Judged(r, r.placement_generation, started_here=True, running_at=start.finished_at)
        )
    return judged


def _locked_if_still_judged(item: _Judged, *, node: Node) -> Reservation | None:
    """The reservation under its row lock, if the judgement still holds: still active, still
    the generation the report was judged against, and (started here) still no stop job for
    it on this node. Call inside a transaction."""
    locked = (
        Reservation.objects.select_for_update()
        .filter(
            pk=item.reservation.pk,
            status=ReservationStatus.ACTIVE,
            placement_generation=item.generation,
        )
        .first()
    )
    if locked is None:
        return None
    if (
        item.started_here
        and AgentJob.objects.filter(
            reservation=locked, node=node, kind="stop", generation=item.generation
        ).exists()
    ):
        return None
    return locked


def _end(item: _Judged, *, node: Node, cause: str, released_at: datetime) -> bool:
    """active → failed by its own exit, decided again under the row lock
    (_locked_if_still_judged), billed until released_at."""
    with transaction.atomic():
        locked = _locked_if_still_judged(item, node=node)
        return locked is not None and _fail(
            locked, cause=cause, refund_from=None, released_at=released_at
        )


def _fail(
    locked: Reservation, *, cause: str, refund_from: datetime | None, released_at: datetime
) -> bool:
    """active → failed, billed until released_at (when it stopped delivering, at most now).
    refund_from: the workload did not end itself, so a reserved term's rest from then is
    refunded (its cancellation terms, which billing settles as a credit, as for a GPU
    failure)."""
    try:
        with transaction.atomic():  # all of it, or nothing if the move is refused
            if refund_from is not None and locked.tier == Tier.RESERVED:
                locked.cancellation = {
                    "rule": "The workload's container vanished or stalled, not by its own "
                    "exit: the undelivered share of the term is refunded",
                    "refund_amount": str(undelivered_refund(locked, since=refund_from)),
                    "failed_at": iso_utc(refund_from),
                }
                locked.save(update_fields=["cancellation", "updated_at"])
            # The transition keeps a released_at already set (as after a customer's stop).
            Reservation.objects.filter(pk=locked.pk).update(released_at=released_at)
            reservation_transition(
                reservation=locked,
                to_status=ReservationStatus.FAILED,
                cause=cause,
                actor_label=ACTOR,
            )
    except InvalidTransition:  # cannot happen under the lock; said rather than hidden
        logger.warning("could not end %s after its workload stopped", locked.public_id)
        return False
    return True


def workload_restarts(reservation: Reservation, *, since: datetime | None = None) -> int:
    """Restarts in place of this reservation (its history): all, or those after `since`."""
    restarts = ReservationTransition.objects.filter(
        reservation=reservation,
        from_status=ReservationStatus.ACTIVE,
        to_status=ReservationStatus.PROVISIONING,
        actor_label=ACTOR,
    )
    if since is not None:
        restarts = restarts.filter(at__gt=since)
    return restarts.count()


def _restarts_used(locked: Reservation, *, now: datetime) -> int:
    """Restarts in place of this reservation within the window up to now."""
    return workload_restarts(locked, since=now - settings.PROVISIONING_WORKLOAD_RESTART_WINDOW)


def workload_restarts_summary(reservation: Reservation, *, now: datetime) -> str:
    """For staff: how many times it was restarted in place, and how many of those count
    towards the crash-loop limit now."""
    window = settings.PROVISIONING_WORKLOAD_RESTART_WINDOW
    return (
        f"{workload_restarts(reservation)} in all; "
        f"{workload_restarts(reservation, since=now - window)} within the last "
        f"{_window_text()} (at most {settings.PROVISIONING_WORKLOAD_RESTARTS})"
    )


def _window_text() -> str:
    seconds = int(settings.PROVISIONING_WORKLOAD_RESTART_WINDOW.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    return f"{seconds // 60} min" if seconds % 60 == 0 else f"{seconds} s"


def _restart_or_end(
    item: _Judged, *, node: Node, what: str, log: str, now: datetime, lost_at: datetime
) -> str:
    """A vanished or stalled workload, under the row lock (_locked_if_still_judged): restarted
    in place, or ended with its rest refunded once its restarts in the window are used up.
    lost_at: when it was last known running (at most now), where its outage or its billing
    ends. Returns "restarted", "ended" or "" (nothing done: the judgement no longer holds)."""
    with transaction.atomic():
        locked = _locked_if_still_judged(item, node=node)
        if locked is None:
            return ""
        allowed = settings.PROVISIONING_WORKLOAD_RESTARTS
        used = _restarts_used(locked, now=now)
        if used >= allowed:
            why = (
                f"it was restarted in place {used} time(s) within {_window_text()}, the most "
                "allowed, so it is not restarted again"
                if allowed
                else "restarts in place are turned off"
            )
            cause = f"{what}; {why}: {_money_after_end(locked, own_exit=False)}{log}"
            ended = _fail(locked, cause=cause, refund_from=lost_at, released_at=lost_at)
            return "ended" if ended else ""
        cause = (
            f"{what}; it restarts in place on the same GPUs (restart {used + 1} of at most "
            f"{allowed} within {_window_text()}), and {_money_after_restart(locked)}{log}"
        )
        _restart(locked, node=node, cause=cause, detail=what, lost_at=lost_at)
        return "restarted"


def _restart(
    locked: Reservation, *, node: Node, cause: str, detail: str, lost_at: datetime
) -> None:
    """As a move off a failed GPU restarts a workload (gpu_failures), on the same allocations:
    a new placement generation (the agents stop what is left of the old container, then
    prepare and start it afresh), active → provisioning, the provisioning worker woken; and
    an outage from lost_at (when it was last known running) until it is active again (closed
    by reservation_outages_reconcile).
    The outage of its last restart, should the sweep not have closed it yet, closes first (it
    is active again, so that one is over), and so does any other open on this node
    (_open_outage_hand_over): a node's would end when the node is back (a reboot) or the
    workload moves off it, while the workload is down until it answers again."""
    placement_generation_raise(locked)
    workload_lost_outages_close(reservation_id=locked.pk)
    _open_outage_hand_over(locked, node=node, lost_at=lost_at)
    ReservationOutage.objects.create(
        reservation=locked,
        node=node,
        started_at=lost_at,
        cause=WORKLOAD_LOST_CAUSE,
        detail=detail,
    )
    reservation_transition(
        reservation=locked,
        to_status=ReservationStatus.PROVISIONING,
        cause=cause,
        actor_label=ACTOR,
    )
    provisioning_kick(locked.pk)


def _open_outage_hand_over(locked: Reservation, *, node: Node, lost_at: datetime) -> None:
    """End the reservation's outage still open on this node (one at a time, a constraint), so
    the workload's own runs on from lost_at (when it was last seen running): a node's
    (silence, hardware; its sweep has not closed it yet, or the node is still down) at
    lost_at, the two back to back; a GPU failure's, whose sweep has not run since the moved
    workload became active, at that activation, as the sweep would. Billing counts the node's
    own outage from inventory either way."""
    for outage in ReservationOutage.objects.filter(reservation=locked, node=node, ended_at=None):
        end = lost_at
        if outage.cause == OutageCause.GPU_FAILURE:
            back = (
                ReservationTransition.objects.filter(
                    reservation=locked, to_status=ReservationStatus.ACTIVE, at__gt=outage.started_at
                )
                .order_by("at")
                .values_list("at", flat=True)
                .first()
            )
            end = min(back or lost_at, lost_at)
        ReservationOutage.objects.filter(pk=outage.pk, ended_at=None).update(
            ended_at=max(end, outage.started_at)
        )


# A reservation in one of these holding a live allocation on the node may have its container
# there: it is not a leftover (a stop job of its own takes it down when it ends).
_HOLDS_NODE = (
    ReservationStatus.PENDING,
    ReservationStatus.SCHEDULED,
    ReservationStatus.PROVISIONING,
    ReservationStatus.ACTIVE,
    ReservationStatus.RELEASING,
)


def _leftovers_stop(node: Node, public_ids: set[str], now: datetime) -> None:
    """Queue again (or queue) the stop of each reported container whose reservation no
    longer holds this node (the module's docstring says when)."""
    leftovers = list(
        Reservation.objects.filter(public_id__in=public_ids).exclude(
            status__in=_HOLDS_NODE,
            pk__in=Allocation.objects.filter(node=node, is_live=True).values("reservation_id"),
        )
    )
    if not leftovers:
        return
    jobs: dict[int, list[AgentJob]] = {}
    for job in AgentJob.objects.filter(
        reservation__in=leftovers, node=node, kind__in=["start", "stop"]
    ).order_by("-generation"):
        jobs.setdefault(job.reservation_id, []).append(job)
    heard = _last_heard(node)
    settled = min(heard or now, now - settings.AGENT_JOB_LEASE)
    for r in leftovers:
        its = jobs.get(r.pk, [])
        start = next((j for j in its if j.kind == "start" and j.attempts), None)
        if start is None:
            continue  # no agent started it here: not ours to stop
        stop = next((j for j in its if j.kind == "stop" and j.generation == start.generation), None)
        if stop is None:
            grace = settings.PROVISIONING_STOP_GRACE_SECONDS
            payload = {
                k: start.payload[k]
                for k in ("reservation", "generation", "gpu_indexes", "container_name")
                if k in start.payload
            }
            payload["grace_seconds"] = grace.get(r.tier, max(grace.values()))
            agent_job_enqueue(
                reservation_id=r.pk,
                node_id=node.pk,
                kind="stop",
                generation=start.generation,
                payload=payload,
            )
        elif stop.status in AGENT_JOB_FINAL and (stop.finished_at or stop.updated_at) < settled:
            AgentJob.objects.filter(pk=stop.pk, status__in=AGENT_JOB_FINAL).update(
                status=AgentJobStatus.QUEUED, lease_owner="", lease_expires_at=None,
                finished_at=None, error="",
            )  # fmt: skip
        else:
            continue
        logger.warning(
            "node %s still runs the container of %s (%s): its stop is queued again",
            node.hostname, r.public_id, r.status,
        )  # fmt: skip


def agent_workloads_report(*, node: Node, containers: list[dict]) -> list[dict]:
    """Apply one complete report of the node's containers; returns the preemption notices.

    Only reservations with a live allocation on this node are touched: an agent cannot end
    another node's reservation by naming it.
    """
    now = timezone.now()
    on_node = {
        r.public_id: r
        for r in Reservation.objects.filter(
            pk__in=Allocation.objects.filter(node=node, is_live=True).values("reservation_id"),
            status__in=[ReservationStatus.PROVISIONING, ReservationStatus.ACTIVE],
        ).order_by("pk")
    }
    # One container per reservation (named after it); should another carry its label, the
    # one with its name is the one judged.
    reported: dict[str, dict] = {}
    for report in containers:
        rid = report.get("reservation", "")
        if rid and (rid not in reported or report.get("name") == f"sy-{rid}"):
            reported[rid] = report
    stray = {rid for rid in reported if rid not in on_node}
    if stray:
        _leftovers_stop(node, stray, now)
    active = [r for r in on_node.values() if r.status == ReservationStatus.ACTIVE]
    # Recorded while the node holds a live reservation (one being started too), so the first
    # report after an activation finds its predecessor's.
    heard = _last_heard(node) if on_node else None
    reported_after = _reported_after(node) if active else None
    left_active: set[str] = set()
    for item in _judged(node, active, now, heard=heard):
        r = item.reservation
        report = reported.get(r.public_id)
        if report is None and not item.started_here:
            continue  # nothing says this agent should run it
        if report is not None and report.get("state") == RUNNING_STATE:
            continue
        what = _not_running(report, node, now)
        log = "" if report is None else _log_suffix(report, r.workload or {})
        seen = _seen_running_at(item, reported_after=reported_after, now=now)
        exited = report is not None and report.get("state") in EXITED_STATES
        if exited and not report.get("stopped_by"):
            # Its own exit: the customer's ending, never restarted.
            cause = f"{what}; {_money_after_end(r, own_exit=True)}{log}"
            exited_at = _exited_at(item, report, seen=seen, now=now)
            ended = _end(item, node=node, cause=cause, released_at=exited_at)
            outcome = "ended" if ended else ""
        else:
            # Stopped from outside, with nothing later proving it ran: from its exit time.
            lost_at = seen or (_exited_at(item, report, seen=None, now=now) if exited else now)
            outcome = _restart_or_end(item, node=node, what=what, log=log, now=now, lost_at=lost_at)
        if outcome:
            left_active.add(r.public_id)
            logger.info("reservation %s %s: its workload is not running", r.public_id, outcome)
    if heard is not None:
        # Applied in full: the next report may take this one's heartbeat as a time its
        # judged workloads were seen running.
        _reported_after_set(node, heard)
    return [
        {
            "reservation": r.public_id,
            "container": f"sy-{r.public_id}",
            "preempt_at": iso_utc(r.preempt_at),
            "reason": r.preempt_reason,
        }
        for r in on_node.values()
        if r.preempt_at is not None
        and r.status == ReservationStatus.ACTIVE
        and r.public_id not in left_active
    ]
