"""Burn-in before sale: a failed GPU, or a node back from maintenance (or newly installed and put
in maintenance), runs the site's burn-in command through its agent and is sold again only if
it passes (exit 0 within the time limit).

While it runs, nothing is sold: the GPUs stay failed, the node stays in maintenance. A pass
returns them (recorded as "burn-in #N passed"); a failure or timeout keeps them out with the
output for staff to read. Staff can still force a return without burn-in (the GPU and node
actions "Return to service", whose reason is recorded).
"""

from datetime import timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from config.errors import Conflict, InvalidTransition, NotFound, ValidationFailed
from inventory.models import BurnIn, BurnInStatus, Gpu, GpuHealth, Node, NodeStatus
from inventory.services import status_change
from inventory.telemetry import gpu_return_to_service

__all__ = [
    "OUTPUT_LIMIT",
    "burn_in_request",
    "burn_in_lease",
    "burn_in_report",
    "burn_ins_expire",
]

OUTPUT_LIMIT = 64 * 1024
# A running burn-in whose agent has not reported this long after its limit has failed.
REPORT_GRACE = timedelta(minutes=5)
ACTOR = "system: burn-in"


@transaction.atomic
def burn_in_request(
    *,
    node: Node,
    gpus: list[Gpu] | None = None,
    reason: str,
    requested_by: str,
) -> BurnIn:
    """Queue a burn-in of `gpus` (failed GPUs of the node) or of the whole node (in
    maintenance) with its site's command."""
    if not reason or not reason.strip():
        raise ValidationFailed("A burn-in needs a reason.", field="reason")
    locked = Node.objects.select_for_update().select_related("site").get(pk=node.pk)
    site = locked.site
    if not site.burn_in_command:
        raise ValidationFailed(
            f"Site {site.slug} has no burn-in command; set one, or return it to service "
            "directly (the reason is recorded).",
            code="no_burn_in_command",
            field="burn_in_command",
        )
    indexes: list[int] = []
    if gpus:
        for gpu in gpus:
            if gpu.node_id != locked.pk:
                raise ValidationFailed(f"GPU {gpu} is not on {locked.hostname}.", field="gpus")
            if gpu.health != GpuHealth.FAILED:
                raise InvalidTransition(
                    f"GPU {gpu} is {gpu.health}: only a failed GPU is burned in before sale "
                    "(a GPU in sale may be running a customer's work).",
                    field="health",
                )
        indexes = sorted(gpu.index for gpu in gpus)
    elif locked.status != NodeStatus.MAINTENANCE:
        raise InvalidTransition(
            f"Node {locked.hostname} is {locked.status}: put it in maintenance first, so "
            "nothing is sold on it while it is tested.",
            field="status",
        )
    try:
        with transaction.atomic():
            burn_in = BurnIn.objects.create(
                node=locked,
                gpu_indexes=indexes,
                command=site.burn_in_command,
                time_limit_seconds=site.burn_in_time_limit_seconds,
                reason=reason.strip(),
                requested_by=requested_by,
            )
    except IntegrityError:
        raise Conflict(
            f"Node {locked.hostname} already has a burn-in queued or running.",
            code="burn_in_open",
        ) from None
    if indexes:
        Gpu.objects.filter(node=locked, index__in=indexes).update(
            health_reason=f"burn-in #{burn_in.pk} queued: {reason.strip()}"
        )
    return burn_in


@transaction.atomic
def burn_in_lease(*, node: Node, now=None) -> BurnIn | None:
    """The node's queued burn-in, now running; None if there is none.

    Only on what is still out of sale: a burn-in of the node needs it in maintenance, one of
    GPUs runs on those still failed. One whose node or GPUs staff returned to service while it
    waited (the return needs no burn-in) is cancelled, not run: a stress test on GPUs in sale
    would run beside, or on, a customer's workload."""
    now = now or timezone.now()
    while True:
        burn_in = (
            BurnIn.objects.select_for_update(skip_locked=True)
            .filter(node=node, status=BurnInStatus.QUEUED)
            .order_by("pk")
            .first()
        )
        if burn_in is None:
            return None
        moot = _burn_in_moot(burn_in)
        if moot is None:
            break
        burn_in.status, burn_in.finished_at = BurnInStatus.CANCELLED, now
        burn_in.output = f"Cancelled before it ran: {moot}"
        burn_in.save(update_fields=["status", "finished_at", "output"])
    burn_in.status, burn_in.started_at = BurnInStatus.RUNNING, now
    burn_in.save(update_fields=["status", "started_at", "gpu_indexes"])
    return burn_in


def _burn_in_moot(burn_in: BurnIn) -> str | None:
    """Why the queued burn-in must not run any more, or None; a GPU burn-in is narrowed to its
    GPUs still failed (not saved here)."""
    if not burn_in.gpu_indexes:
        status = Node.objects.filter(pk=burn_in.node_id).values_list("status", flat=True).get()
        if status != NodeStatus.MAINTENANCE:
            return f"the node is {status}, no longer in maintenance."
        return None
    still_failed = sorted(
        Gpu.objects.filter(
            node_id=burn_in.node_id, index__in=burn_in.gpu_indexes, health=GpuHealth.FAILED
        ).values_list("index", flat=True)
    )
    if not still_failed:
        return "its GPUs were returned to service."
    burn_in.gpu_indexes = still_failed
    return None


@transaction.atomic
def burn_in_report(
    *, node: Node, burn_in_id: int, exit_code: int | None, timed_out: bool, output: str
) -> BurnIn:
    """The agent's result: pass (exit 0, in time) returns the GPUs or node to sale."""
    # The node before its GPUs, as a heartbeat locks them (inventory.services), or the two
    # could deadlock.
    Node.objects.select_for_update(no_key=True).filter(pk=node.pk).first()
    burn_in = BurnIn.objects.select_for_update().filter(pk=burn_in_id, node=node).first()
    if burn_in is None:
        raise NotFound("No such burn-in on this node.")
    if burn_in.status != BurnInStatus.RUNNING:
        raise Conflict(f"Burn-in {burn_in_id} is {burn_in.status}.", code="burn_in_not_running")
    passed = exit_code == 0 and not timed_out
    burn_in.status = BurnInStatus.PASSED if passed else BurnInStatus.FAILED
    burn_in.exit_code, burn_in.timed_out = exit_code, timed_out
    burn_in.output = output[-OUTPUT_LIMIT:]
    burn_in.finished_at = timezone.now()
    burn_in.save(update_fields=["status", "exit_code", "timed_out", "output", "finished_at"])
    gpus = Gpu.objects.filter(node=node, health=GpuHealth.FAILED)
    if burn_in.gpu_indexes:
        gpus = gpus.filter(index__in=burn_in.gpu_indexes)
    # The result speaks for the state the run tested: a GPU whose health changed since it
    # began (staff returned it, then it failed again) has a failure this run never saw, and a
    # node whose status changed meanwhile is no longer the node it tested.
    gpus = gpus.exclude(health_changes__at__gte=burn_in.started_at)
    if passed:
        why = f"burn-in #{burn_in.pk} passed ({burn_in.command})"
        for gpu in gpus.order_by("index"):
            gpu_return_to_service(gpu=gpu, actor=None, actor_label=ACTOR, reason=why)
        fresh = Node.objects.get(pk=node.pk)
        if (
            not burn_in.gpu_indexes
            and fresh.status == NodeStatus.MAINTENANCE
            and not fresh.status_changes.filter(at__gte=burn_in.started_at).exists()
        ):
            status_change(
                action="return_to_service", node=fresh, actor=None, actor_label=ACTOR, reason=why
            )
    else:
        what = "timed out" if timed_out else f"exit {exit_code}"
        gpus.update(health_reason=f"burn-in #{burn_in.pk} failed ({what}); see its output")
    return burn_in


def burn_ins_expire(*, now=None) -> int:
    """Fail running burn-ins whose agent went quiet past the time limit and a grace period."""
    now = now or timezone.now()
    expired = 0
    for burn_in in BurnIn.objects.filter(status=BurnInStatus.RUNNING).select_related("node"):
        if burn_in.started_at + timedelta(seconds=burn_in.time_limit_seconds) + REPORT_GRACE < now:
            burn_in_report(
                node=burn_in.node,
                burn_in_id=burn_in.pk,
                exit_code=None,
                timed_out=True,
                output=burn_in.output + "\n[no report from the agent within the time limit]",
            )
            expired += 1
    return expired
