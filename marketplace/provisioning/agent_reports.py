"""What a site agent reports with each heartbeat: every container it runs and its state.

The rule for a workload that exits while its reservation is active: the reservation ends
(`active → failed`, through the transition service) when the platform learns of it, at most
one agent heartbeat after the exit. Billing stops there (billing counts activated_at →
released_at), so the rest of the booked time is not charged; the customer and staff see the
exit code, the time and the last log lines (secrets redacted) as the reason. The release
task then removes the container ("teardown").

The answer carries the preemption notices of the node's reservations, which the agent writes
into their containers (/run/switchyard/preemption).
"""

import logging

from config.errors import InvalidTransition
from inventory.models import Node
from marketplace.models import Allocation, Reservation, ReservationStatus
from marketplace.provisioning.drivers import _redact
from marketplace.services.transitions import reservation_transition

__all__ = ["agent_workloads_report", "EXITED_STATES"]

logger = logging.getLogger(__name__)
ACTOR = "system: site agent"
# Container states (docker's and podman's) of a workload that is no longer running.
EXITED_STATES = frozenset({"exited", "stopped", "dead"})


def _exit_cause(report: dict, workload: dict) -> str:
    cause = (
        f"The workload exited with code {report.get('exit_code')} at "
        f"{report.get('finished_at') or 'an unknown time'}; the reservation ended and the rest "
        "of its time is not charged."
    )
    tail = _redact(report.get("log_tail") or "", workload)
    return f"{cause} Last log lines:\n{tail}" if tail else f"{cause} It wrote no log."


def agent_workloads_report(*, node: Node, containers: list[dict]) -> list[dict]:
    """Apply one report of the node's containers; returns the preemption notices to deliver.

    Only reservations with a live allocation on this node are touched: an agent cannot end
    another node's reservation by naming it.
    """
    on_node = {
        r.public_id: r
        for r in Reservation.objects.filter(
            pk__in=Allocation.objects.filter(node=node, is_live=True).values("reservation_id"),
            status__in=[ReservationStatus.PROVISIONING, ReservationStatus.ACTIVE],
        )
    }
    ended: set[str] = set()
    for report in containers:
        reservation = on_node.get(report.get("reservation", ""))
        if reservation is None or reservation.status != ReservationStatus.ACTIVE:
            continue  # before active the start job judges the container; after, it is stopping
        if report.get("state") not in EXITED_STATES:
            continue
        try:
            reservation_transition(
                reservation=reservation,
                to_status=ReservationStatus.FAILED,
                cause=_exit_cause(report, reservation.workload or {}),
                actor_label=ACTOR,
            )
        except InvalidTransition:  # it moved meanwhile (released, preempted): nothing to end
            logger.warning("could not end %s after its workload exited", reservation.public_id)
            continue
        ended.add(reservation.public_id)
        logger.info("reservation %s ended: its workload exited", reservation.public_id)
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
