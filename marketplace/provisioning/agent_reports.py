"""What a site agent reports with each heartbeat: every container it runs and its state.

The rule: an `active` reservation whose workload is not running on a node it holds GPUs on
now ends (`active → failed`, through the transition service) when the platform learns of
it, at most one agent heartbeat later. Billing stops there (billing counts activated_at →
released_at); the customer and staff see why as the reason: the exit code, the time and the
last log lines (secrets redacted), or the container's state, or that it is gone. What that
means for the money depends on the tier (`_money_after_end`). The release task then removes
the container ("teardown").

A report is complete: the agent lists every container it manages (`ps -a` by its label)
and sends nothing when it cannot list them, so a container absent from a report it did send
is not on the node. A workload is judged "not running" on this node when:

- its container is reported in any state but `running` (`exited`, `stopped`, `dead`,
  `created`, `paused` — a paused container delivers nothing —, `restarting`, …), or
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
decision is taken again under the reservation's row lock (still active, same generation, no
stop job), so a pause, a move or a release that commits meanwhile wins.

A reservation not started through this node's agent (no agent job at all: another driver)
is judged only on a container the agent reports for it, never on one missing.

The answer carries the preemption notices of the node's reservations, which the agent writes
into their containers (/run/switchyard/preemption).
"""

import logging
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from config.errors import InvalidTransition
from inventory.heartbeats import heartbeats_buffered
from inventory.models import Node
from marketplace.models import (
    AgentJob,
    AgentJobStatus,
    Allocation,
    ListingStatus,
    ResaleListing,
    Reservation,
    ReservationStatus,
    Tier,
)
from marketplace.provisioning.drivers import _redact
from marketplace.services.gpu_failures import undelivered_refund
from marketplace.services.transitions import reservation_transition

__all__ = ["agent_workloads_report", "EXITED_STATES", "RUNNING_STATE"]

logger = logging.getLogger(__name__)
ACTOR = "system: site agent"
# The one container state (docker's and podman's) in which a workload delivers.
RUNNING_STATE = "running"
# Container states of a workload that ran and ended: the report carries its exit code.
EXITED_STATES = frozenset({"exited", "stopped", "dead"})


@dataclass(frozen=True)
class _Judged:
    """A reservation the report may end, and what may end it."""

    reservation: Reservation
    generation: int
    started_here: bool  # this node's agent started it: a missing container ends it too


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


def _log_suffix(report: dict, workload: dict) -> str:
    tail = _redact(report.get("log_tail") or "", workload)
    return f" Last log lines:\n{tail}" if tail else " It wrote no log."


def _exit_cause(report: dict, reservation: Reservation) -> str:
    state = report.get("state")
    if state in EXITED_STATES:
        what = (
            f"The workload exited with code {report.get('exit_code')} at "
            f"{report.get('finished_at') or 'an unknown time'}"
        )
    else:
        what = f"The workload is not running: its container is {state}"
    own_exit = state in EXITED_STATES
    return f"{what}; {_money_after_end(reservation, own_exit=own_exit)}" + _log_suffix(
        report, reservation.workload or {}
    )


def _missing_cause(reservation: Reservation, node: Node, now: datetime) -> str:
    return (
        f"The workload's container is gone: node {node.hostname}'s agent no longer runs it "
        f"(its report at {now.isoformat()}); {_money_after_end(reservation, own_exit=False)}"
    )


def _last_heard(node: Node) -> datetime | None:
    """The node's last heartbeat: in the database, or in the buffer not yet flushed."""
    stored = Node.objects.filter(pk=node.pk).values_list("last_heartbeat_at", flat=True).first()
    buffered = heartbeats_buffered([node.pk]).get(node.pk)
    return max((t for t in (stored, buffered) if t is not None), default=None)


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


def _judged(node: Node, active: list[Reservation], now: datetime) -> list[_Judged]:
    """The active reservations this report may end (the module's docstring says which)."""
    if not active:
        return []
    holding = _holding_here_now(node, [r.pk for r in active], now)
    jobs: dict[int, list[AgentJob]] = {}
    for job in AgentJob.objects.filter(reservation_id__in=holding).only(
        "reservation_id", "node_id", "kind", "generation", "status", "finished_at"
    ):
        jobs.setdefault(job.reservation_id, []).append(job)
    heard = _last_heard(node)
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
        judged.append(_Judged(r, r.placement_generation, started_here=True))
    return judged


def _end(item: _Judged, *, node: Node, cause: str, refund_from: datetime | None) -> bool:
    """active → failed, decided again under the row lock: still active, still the generation
    the report was judged against, and (started here) still no stop job for it. refund_from:
    the workload did not end itself, so a reserved term's rest from then is refunded (its
    cancellation terms, which billing settles as a credit, as for a GPU failure)."""
    with transaction.atomic():
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
            return False
        if (
            item.started_here
            and AgentJob.objects.filter(
                reservation=locked, node=node, kind="stop", generation=item.generation
            ).exists()
        ):
            return False
        if refund_from is not None and locked.tier == Tier.RESERVED:
            locked.cancellation = {
                "rule": "The workload's container vanished or stalled, not by its own exit: "
                "the undelivered share of the term is refunded",
                "refund_amount": str(undelivered_refund(locked, since=refund_from)),
                "failed_at": refund_from.isoformat(),
            }
            locked.save(update_fields=["cancellation", "updated_at"])
        try:
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
    active = [r for r in on_node.values() if r.status == ReservationStatus.ACTIVE]
    ended: set[str] = set()
    for item in _judged(node, active, now):
        r = item.reservation
        report = reported.get(r.public_id)
        if report is None and not item.started_here:
            continue  # nothing says this agent should run it
        if report is not None and report.get("state") == RUNNING_STATE:
            continue
        cause = _missing_cause(r, node, now) if report is None else _exit_cause(report, r)
        own_exit = report is not None and report.get("state") in EXITED_STATES
        if _end(item, node=node, cause=cause, refund_from=None if own_exit else now):
            ended.add(r.public_id)
            logger.info("reservation %s ended: its workload is not running", r.public_id)
    return [
        {
            "reservation": r.public_id,
            "container": f"sy-{r.public_id}",
            "preempt_at": r.preempt_at.isoformat(),
            "reason": r.preempt_reason,
        }
        for r in on_node.values()
        if r.preempt_at is not None
        and r.status == ReservationStatus.ACTIVE
        and r.public_id not in ended
    ]
