"""Writes to the inventory: status changes, maintenance windows, node tokens and heartbeats.

Every status change goes through `_status_change`: it locks the row, checks the transition
tables below, and records a StatusChange, so no status moves unrecorded. Staff actions reach
it through `status_change` (drain, maintenance, return to service, retire, activate, curtail),
the system's through `node_mark_offline` and a heartbeat's resume.

Outages of cause heartbeat_missed span [went silent, heard again): the sweeper opens them and
only the next heartbeat closes them, whatever staff did in between. Outages of other causes
(hardware failure recorded by staff or the provisioning driver, …) close when staff return the
node to service.
"""

import functools
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange
from django.utils import timezone

from config.db import model_columns, model_from_row
from config.errors import Conflict, InvalidTransition, ValidationFailed
from inventory.agent_work import agent_work_waiting_sql
from inventory.heartbeats import (
    flushed_through,
    heartbeat_buffer_push,
    heartbeats_buffered,
    node_last_heard_bound,
    token_use_buffer,
    write_through_after,
)
from inventory.models import (
    Gpu,
    GpuHealth,
    MaintenanceWindow,
    Node,
    NodeStatus,
    NodeToken,
    Outage,
    OutageCause,
    Site,
    SiteStatus,
    StatusChange,
)
from inventory.telemetry import (
    gpu_health_apply,
    telemetry_changes_state,
    telemetry_matched,
    telemetry_record,
    telemetry_rows,
)

SWEEPER_LABEL = "system: heartbeat sweeper"


@dataclass(frozen=True)
class Transition:
    """An action's allowed source statuses and the status(es) it may lead to; a staff action
    (status_change) leads to one, a system move (offline, resume) has its own service."""

    verb: str
    sources: frozenset[str]
    targets: frozenset[str]
    staff: bool = True


def _t(verb: str, sources: set[str], targets: set[str], *, staff: bool = True) -> Transition:
    return Transition(verb, frozenset(sources), frozenset(targets), staff)


# Every way a node's status may change. Offline is entered only by the heartbeat sweeper and
# left by a heartbeat (back to what it was before the silence) or by staff to maintenance or
# retirement; staff cannot declare a silent node available. Retired is final.
NODE_TRANSITIONS: dict[str, Transition] = {
    "drain": _t("drain", {NodeStatus.AVAILABLE}, {NodeStatus.DRAINING}),
    "set_maintenance": _t(
        "put in maintenance",
        {NodeStatus.AVAILABLE, NodeStatus.DRAINING, NodeStatus.OFFLINE},
        {NodeStatus.MAINTENANCE},
    ),
    "return_to_service": _t(
        "return to service", {NodeStatus.DRAINING, NodeStatus.MAINTENANCE}, {NodeStatus.AVAILABLE}
    ),
    "retire": _t(
        "retire",
        {NodeStatus.AVAILABLE, NodeStatus.DRAINING, NodeStatus.MAINTENANCE, NodeStatus.OFFLINE},
        {NodeStatus.RETIRED},
    ),
    "mark_offline": _t(
        "mark offline",
        {NodeStatus.AVAILABLE, NodeStatus.DRAINING},
        {NodeStatus.OFFLINE},
        staff=False,
    ),
    "resume": _t(
        "resume",
        {NodeStatus.OFFLINE},
        {NodeStatus.AVAILABLE, NodeStatus.DRAINING},
        staff=False,
    ),
}

# Every way a site's status may change. Retired is final.
SITE_TRANSITIONS: dict[str, Transition] = {
    "activate": _t("activate", {SiteStatus.COMMISSIONING}, {SiteStatus.ACTIVE}),
    "curtail": _t("curtail", {SiteStatus.ACTIVE}, {SiteStatus.CURTAILED}),
    "set_maintenance": _t(
        "put in maintenance", {SiteStatus.ACTIVE, SiteStatus.CURTAILED}, {SiteStatus.MAINTENANCE}
    ),
    "return_to_service": _t(
        "return to service", {SiteStatus.CURTAILED, SiteStatus.MAINTENANCE}, {SiteStatus.ACTIVE}
    ),
    "retire": _t(
        "retire",
        {SiteStatus.COMMISSIONING, SiteStatus.ACTIVE, SiteStatus.CURTAILED, SiteStatus.MAINTENANCE},
        {SiteStatus.RETIRED},
    ),
}


def _label(actor: AbstractBaseUser | None, actor_label: str | None) -> str:
    if actor_label:
        return actor_label
    if actor is not None:
        return actor.get_username()
    raise ValidationFailed("A change without a user needs an actor_label.", field="actor_label")


def _check(kind: str, name: str, transition: Transition, current: str, target: str) -> None:
    if current in transition.sources and target in transition.targets:
        return
    if current == target:
        why = f"it is already {current}"
    elif current == "retired":
        why = f"a retired {kind} cannot come back"
    else:
        sources = ", ".join(sorted(transition.sources))
        why = f"'{transition.verb}' applies only to {kind}s that are {sources}"
    raise InvalidTransition(
        f"Cannot {transition.verb} {kind} {name} (from {current} to {target}): {why}.",
        field="status",
    )


def _status_change(
    *,
    model: type[Node] | type[Site],
    obj: Node | Site,
    action: str,
    to_status: str,
    actor: AbstractBaseUser | None,
    actor_label: str | None,
    reason: str,
) -> Node | Site:
    """Lock the row, check the move, change it and record who, when and why."""
    label = _label(actor, actor_label)
    if not reason or not reason.strip():
        raise ValidationFailed("A status change needs a reason.", field="reason")
    locked = model.objects.select_for_update().get(pk=obj.pk)
    current = locked.status
    if model is Node:
        _check("node", locked.hostname, NODE_TRANSITIONS[action], current, to_status)
    else:
        _check("site", locked.slug, SITE_TRANSITIONS[action], current, to_status)
    locked.status = to_status
    fields = ["status", "updated_at"]
    if model is Node:
        locked.status_changed_at = timezone.now()
        fields.append("status_changed_at")
    locked.save(update_fields=fields)
    StatusChange.objects.create(
        node=locked if model is Node else None,
        site=locked if model is Site else None,
        from_status=current,
        to_status=to_status,
        actor=actor,
        actor_label=label,
        reason=reason.strip(),
    )
    obj.status = locked.status
    if model is Node:
        obj.status_changed_at = locked.status_changed_at
    return locked


@transaction.atomic
def status_change(
    *,
    action: str,
    actor: AbstractBaseUser | None,
    reason: str,
    actor_label: str | None = None,
    node: Node | None = None,
    site: Site | None = None,
) -> Node | Site:
    """A staff action on a node or a site (one of them): an action of NODE_TRANSITIONS or
    SITE_TRANSITIONS, which names the status it leads to. Locked, checked and recorded by
    _status_change; the few actions with a consequence beyond the status have it here:

    - a site is retired only once all its nodes are;
    - a node is retired only when none of its GPUs is booked from now on (a running workload
      would be left without an agent, still billed; a booked one would be moved at its start,
      or fail): drain it first, and retire it once its bookings end;
    - a node returned to service ends its open outages of any cause but silence (staff say
      the fault is fixed; a heartbeat outage ends only when the agent is heard again);
    - a retired node's agent tokens are revoked (a retired node has no agent).
    """
    if (node is None) == (site is None):
        raise TypeError("status_change takes a node or a site")
    model, obj, table = (Node, node, NODE_TRANSITIONS) if node else (Site, site, SITE_TRANSITIONS)
    transition = table.get(action)
    if transition is None or not transition.staff:
        raise ValidationFailed(f"Unknown action {action!r}.", code="unknown_action", field="action")
    (to_status,) = transition.targets
    if model is Site and action == "retire":
        _site_retire_check(site)
    elif model is Node and action == "retire":
        _node_retire_check(node)
    changed = _status_change(
        model=model,
        obj=obj,
        action=action,
        to_status=to_status,
        actor=actor,
        actor_label=actor_label,
        reason=reason,
    )
    if model is Node and action == "return_to_service":
        # A GPU's own outage ends only when that GPU is returned (inventory.telemetry).
        Outage.objects.filter(
            node=changed, gpu=None, ended_at__isnull=True, started_at__lt=changed.status_changed_at
        ).exclude(cause=OutageCause.HEARTBEAT_MISSED).update(ended_at=changed.status_changed_at)
    elif model is Node and action == "retire":
        NodeToken.objects.filter(node=changed, revoked_at__isnull=True).update(
            revoked_at=changed.status_changed_at
        )
    return changed


def _node_retire_check(node: Node) -> None:
    # Under the node's lock, which placement and extensions take before they book its GPUs:
    # a booking either committed before (and is seen here) or finds the node retired.
    locked = Node.objects.select_for_update().get(pk=node.pk)
    if locked.status == NodeStatus.RETIRED:
        return  # _status_change refuses it, with the usual words
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*), max(upper(busy)) FROM inventory_gpu"
            " WHERE node_id = %s AND busy && tstzrange(now(), NULL)",
            [locked.pk],
        )
        gpus, until = cur.fetchone()
    if gpus:
        raise InvalidTransition(
            f"Cannot retire node {locked.hostname}: {gpus} of its GPUs are booked until "
            f"{until.isoformat()} (running or booked reservations). Drain it, so nothing new "
            "is booked there, and retire it once those bookings end.",
            code="node_booked",
            field="status",
        )


def _site_retire_check(site: Site) -> None:
    locked = Site.objects.select_for_update().get(pk=site.pk)
    if locked.status != SiteStatus.RETIRED:
        live = locked.nodes.exclude(status=NodeStatus.RETIRED).count()
        if live:
            raise InvalidTransition(
                f"Cannot retire site {locked.slug} (from {locked.status} to retired): "
                f"{live} of its nodes are not retired; retire them first.",
                field="status",
            )


def node_silent_since(node: Node) -> datetime | None:
    """The later of the last heartbeat and the last status change (values as loaded)."""
    times = [t for t in (node.last_heartbeat_at, node.status_changed_at) if t is not None]
    return max(times) if times else None


@transaction.atomic
def node_mark_offline(*, node: Node, reason: str, actor_label: str = SWEEPER_LABEL) -> Node:
    """The system's move: a silent node goes offline and a heartbeat outage opens.

    The outage starts when the node went silent (its last heartbeat, or its last status change
    if that was later), not when the sweeper noticed. If an outage is already open (say a
    hardware failure staff recorded), that one goes on and no second one opens.
    """
    fresh = Node.objects.select_for_update().get(pk=node.pk)
    silent_since = node_silent_since(fresh)
    locked = _status_change(
        model=Node,
        obj=node,
        action="mark_offline",
        to_status=NodeStatus.OFFLINE,
        actor=None,
        actor_label=actor_label,
        reason=reason,
    )
    if not Outage.objects.filter(node=locked, gpu=None, ended_at__isnull=True).exists():
        Outage.objects.create(
            node=locked,
            started_at=silent_since or locked.status_changed_at,
            cause=OutageCause.HEARTBEAT_MISSED,
            detail=reason,
        )
    return locked


@transaction.atomic
def nodes_mark_silent_offline(*, now: datetime | None = None, limit: int = 500) -> list[int]:
    """Mark offline every watched node silent for longer than NODE_OFFLINE_AFTER.

    Only nodes that have heartbeated at least once are watched: a node racked but whose agent
    was never started is not an outage, and staff see it in the admin (no last heartbeat).
    Maintenance and retired nodes are not expected to talk. Rows another transaction holds are
    skipped; the next run picks them up.
    """
    now = now or timezone.now()
    cutoff = now - settings.NODE_OFFLINE_AFTER
    silent = list(
        Node.objects.select_for_update(skip_locked=True)
        .filter(
            status__in=[NodeStatus.AVAILABLE, NodeStatus.DRAINING],
            last_heartbeat_at__isnull=False,
            last_heartbeat_at__lt=cutoff,
        )
        .exclude(status_changed_at__gte=cutoff)
        .order_by("pk")[:limit]
    )
    # Heartbeats may wait in the buffer (inventory.heartbeats): a node counts as silent only
    # if the latest heartbeat it may have sent is before the cutoff.
    through = flushed_through()
    lag = write_through_after()
    unsettled = [n.pk for n in silent if through is None or through < n.last_heartbeat_at + lag]
    buffered = heartbeats_buffered(unsettled)
    marked = []
    for node in silent:
        known, latest = node_last_heard_bound(node, through=through, buffered=buffered.get(node.pk))
        if latest >= cutoff:
            continue
        if known > node.last_heartbeat_at:  # the buffer knew better: the outage starts there
            Node.objects.filter(pk=node.pk).update(last_heartbeat_at=known)
            node.last_heartbeat_at = known
        seconds = int((now - node_silent_since(node)).total_seconds())
        node_mark_offline(node=node, reason=f"No heartbeat for {seconds} s.")
        marked.append(node.pk)
    return marked


@transaction.atomic
def maintenance_window_create(
    *,
    node: Node,
    start: datetime,
    end: datetime,
    reason: str,
    actor: AbstractBaseUser | None = None,
) -> MaintenanceWindow:
    """Plan downtime [start, end) for a node; refuses one that overlaps another window, one
    on a retired node (`node_retired`) and one that has already ended (`window_in_past`)."""
    if timezone.is_naive(start) or timezone.is_naive(end):
        raise ValidationFailed("Maintenance times must be timezone-aware.", field="period")
    if end <= start:
        raise ValidationFailed("A maintenance window must end after it starts.", field="period")
    if not reason or not reason.strip():
        raise ValidationFailed("A maintenance window needs a reason.", field="reason")
    # Under the node's lock, which retirement takes: a node retired meanwhile is seen retired.
    locked = Node.objects.select_for_update().get(pk=node.pk)
    window = MaintenanceWindow(
        node=locked,
        period=DateTimeTZRange(start, end, "[)"),
        reason=reason.strip(),
        created_by=actor,
    )
    errors = window.plan_errors(now=timezone.now())
    if errors:
        field, error = next(iter(errors.items()))
        raise ValidationFailed(error.message, code=error.code, field=field)
    try:
        # A savepoint, so the caller's transaction survives the constraint violation.
        with transaction.atomic():
            window.save()
            return window
    except IntegrityError as exc:
        if "maintenance_no_overlap_per_node" not in str(exc):
            raise
        raise Conflict(
            f"Node {node.hostname} already has a maintenance window overlapping "
            f"{start.isoformat()} – {end.isoformat()}.",
            code="maintenance_overlap",
            field="period",
        ) from None


# --- Node tokens ---------------------------------------------------------------------------

TOKEN_PREFIX = "nt_"


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@transaction.atomic
def node_token_issue(*, node: Node, label: str = "") -> tuple[NodeToken, str]:
    """Create a token for the node's agent. The secret is returned once and never stored."""
    if node.status == NodeStatus.RETIRED:
        raise InvalidTransition(f"Node {node.hostname} is retired; it gets no agent token.")
    for _ in range(5):
        prefix = TOKEN_PREFIX + secrets.token_hex(4)
        secret = f"{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                token = NodeToken.objects.create(
                    node=node, prefix=prefix, secret_hash=token_hash(secret), label=label
                )
        except IntegrityError:
            continue  # a prefix collision (one in four billion): draw again
        return token, secret
    raise Conflict("Could not draw a unique token prefix; try again.")


@transaction.atomic
def node_token_revoke(*, token: NodeToken) -> NodeToken:
    """Revoke a token; revoking twice keeps the first revocation time."""
    NodeToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db(fields=["revoked_at"])
    return token


_TOKEN_SQL = f"""
SELECT {model_columns(NodeToken, "t")}, {model_columns(Node, "n")}
  FROM {NodeToken._meta.db_table} t JOIN {Node._meta.db_table} n ON n.id = t.node_id
 WHERE t.prefix = %s AND t.revoked_at IS NULL
"""
# The heartbeat's one read: the token, its node, the node's GPUs as one array per column (a
# row per GPU would repeat the node's columns, and loading them cost more than the second
# query this saves), and whether work waits for its agent (inventory.agent_work). Built at
# first use, once every app has registered its agent work.
_GPU_ARRAYS = ", ".join(f'array_agg(g."{f.column}")' for f in Gpu._meta.concrete_fields)
_GPUS_OF_N = f"SELECT {_GPU_ARRAYS} FROM {Gpu._meta.db_table} g WHERE g.node_id = n.id"
_TOKEN_WIDTH = len(NodeToken._meta.concrete_fields)
_TOKEN_NODE_WIDTH = _TOKEN_WIDTH + len(Node._meta.concrete_fields)


@functools.cache
def _token_gpus_sql() -> str:
    return f"""
SELECT {model_columns(NodeToken, "t")}, {model_columns(Node, "n")}, a.*,
       {agent_work_waiting_sql("n.id")}
  FROM {NodeToken._meta.db_table} t JOIN {Node._meta.db_table} n ON n.id = t.node_id
 CROSS JOIN LATERAL ({_GPUS_OF_N}) a
 WHERE t.prefix = %s AND t.revoked_at IS NULL
"""


@functools.cache
def _node_gpus_sql() -> str:
    return f"""
SELECT a.*, {agent_work_waiting_sql("n.id")}
  FROM {Node._meta.db_table} n CROSS JOIN LATERAL ({_GPUS_OF_N}) a
 WHERE n.id = %s
"""


class HeartbeatRead(NamedTuple):
    """What a heartbeat reads besides its token: the node's GPUs by index (unlocked), and
    whether work waits for its agent (a job or a burn-in to lease: inventory.agent_work)."""

    gpus: dict[int, Gpu]
    work_waiting: bool


def _heartbeat_read(columns: tuple) -> HeartbeatRead:
    """The GPU arrays (None when the node has none) and the work flag, as the reads end."""
    *arrays, work_waiting = columns
    gpus = (
        [model_from_row(Gpu, values) for values in zip(*arrays, strict=True)] if arrays[0] else []
    )
    return HeartbeatRead({gpu.index: gpu for gpu in gpus}, bool(work_waiting))


def node_heartbeat_read(node: Node) -> HeartbeatRead:
    """The node's GPUs and whether work waits for its agent, in one query (every heartbeat
    that DRF answers reads them: SQL)."""
    with connection.cursor() as cursor:
        cursor.execute(_node_gpus_sql(), [node.pk])
        return _heartbeat_read(cursor.fetchone())


# The shape node_token_issue draws: nt_, 8 hex digits, _, then token_urlsafe's alphabet.
_TOKEN_SHAPE = re.compile(r"nt_[0-9a-f]{8}_[A-Za-z0-9_-]{1,128}", re.ASCII)


def _token_read(sql: str, secret: str) -> list[tuple]:
    if not _TOKEN_SHAPE.fullmatch(secret):
        # Not one we issued: no lookup (a NUL in the header would be a DataError, a 500).
        return []
    # Every agent request makes this read: SQL, not the ORM, whose compiling cost more than
    # running it (config/db.py); tests/test_db_rows.py holds its rows to the ORM's.
    with connection.cursor() as cursor:
        cursor.execute(sql, [secret[: len(TOKEN_PREFIX) + 8]])
        return cursor.fetchall()


def _token_accept(secret: str, row: tuple | None) -> NodeToken | None:
    """The token in `row` if the secret is its own (hashes compared in constant time, also
    when there is no row), its use noted; else None."""
    token = None
    if row is not None:
        token = model_from_row(NodeToken, row[:_TOKEN_WIDTH])
        token.node = model_from_row(Node, row[_TOKEN_WIDTH:_TOKEN_NODE_WIDTH])
    expected = token.secret_hash if token else token_hash("")
    if not hmac.compare_digest(expected, token_hash(secret)) or token is None:
        return None
    now = timezone.now()
    # At most once a minute per token, and after its first use buffered for the heartbeat
    # flush (a fleet's tokens would otherwise cost an UPDATE each a minute); written at once
    # the first time, and if Redis is down.
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() >= 60:
        if token.last_used_at is None or not token_use_buffer(token_id=token.pk, at=now):
            NodeToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


def node_token_authenticate(secret: str) -> NodeToken | None:
    """The live token this secret belongs to (its node loaded), or None."""
    rows = _token_read(_TOKEN_SQL, secret)
    return _token_accept(secret, rows[0] if rows else None)


def node_token_authenticate_with_gpus(secret: str) -> tuple[NodeToken, HeartbeatRead] | None:
    """node_token_authenticate and node_heartbeat_read of its node in one query, or None."""
    rows = _token_read(_token_gpus_sql(), secret)
    token = _token_accept(secret, rows[0] if rows else None)
    if token is None:
        return None
    return token, _heartbeat_read(rows[0][_TOKEN_NODE_WIDTH:])


# --- Heartbeats ----------------------------------------------------------------------------


def node_heartbeat_accept(
    *,
    node: Node,
    gpus: dict[int, Gpu],
    gpu_reports: list[dict] | None = None,
    agent_version: str | None = None,
    actor_label: str = "node agent",
    telemetry: dict | None = None,
) -> Node:
    """A validated heartbeat, on the cheapest path that keeps its meaning.

    `node` and `gpus` (the node's GPUs by index) are rows as the request loaded them, unlocked.
    A routine heartbeat, one that changes nothing but the node's last-heard time and adds
    telemetry samples, is buffered (inventory.heartbeats) and written in a batch a few seconds
    later. Anything that must act at once goes through node_heartbeat_record, under the node's
    lock, as before: a node coming back from offline (or heard for the first time), a GPU
    whose health or over-temperature run changes, a health report from an older agent, a new
    agent version or unreadable-telemetry reason, a node whose database time is older than
    the write-through bound, and every heartbeat while Redis is down.
    """
    now = timezone.now()
    if telemetry is not None:
        telemetry = telemetry_matched(report=telemetry, gpus=gpus)
    last = node.last_heartbeat_at
    locked_path = (
        node.status == NodeStatus.OFFLINE
        or last is None
        or now - last > write_through_after()
        or bool(gpu_reports)
        or (agent_version is not None and agent_version != node.agent_version)
        or (
            telemetry is not None
            and telemetry_changes_state(node=node, report=telemetry, gpus=gpus, now=now)
        )
    )
    if not locked_path:
        samples = telemetry_rows(report=telemetry, gpus=gpus, now=now) if telemetry else []
        if heartbeat_buffer_push(node_id=node.pk, at=now, samples=samples):
            node.last_heartbeat_at = now
            return node
    return node_heartbeat_record(
        node=node,
        gpu_reports=gpu_reports,
        agent_version=agent_version,
        actor_label=actor_label,
        telemetry=telemetry,
    )


@transaction.atomic
def node_heartbeat_record(
    *,
    node: Node,
    gpu_reports: list[dict] | None = None,
    agent_version: str | None = None,
    actor_label: str = "node agent",
    telemetry: dict | None = None,
) -> Node:
    """Record that the node is alive, the health its agent reports per GPU, and its telemetry.

    A node the sweeper had marked offline goes back to the status it had before it went
    silent (available or draining: a drain stays a drain), and its heartbeat outage closes.
    A GPU reported failed (by the agent, or by the health rules from its telemetry: see
    inventory.telemetry) opens an outage for that GPU only: the node still serves its other
    GPUs, and the marketplace does not sell failed GPUs. Failed is sticky until staff return it.
    """
    now = timezone.now()
    # FOR NO KEY UPDATE, node then its GPUs: heartbeats of the node still take turns, and
    # staff's GPU actions (which lock the GPU, then check the node as their outage's foreign
    # key) wait for the heartbeat instead of being overwritten by the health it read, or
    # deadlocking with it. Everything that locks both takes the node first.
    locked = Node.objects.select_for_update(no_key=True).get(pk=node.pk)
    reports = gpu_reports or []
    readings = (telemetry or {}).get("gpus") or []
    by_index: dict[int, Gpu] = {}
    if reports or readings:
        by_index = {
            gpu.index: gpu
            for gpu in Gpu.objects.select_for_update(no_key=True).filter(node=locked).order_by("pk")
        }
    for position, reading in enumerate(readings):
        if reading["index"] not in by_index:
            raise ValidationFailed(
                f"Node {locked.hostname} has no GPU with index {reading['index']}.",
                code="unknown_gpu",
                field=f"telemetry.gpus.{position}.index",
            )
    if reports:
        seen: set[int] = set()
        for position, report in enumerate(reports):
            index = report["index"]
            if index in seen:
                raise ValidationFailed(
                    f"GPU {index} is reported twice.",
                    code="duplicate",
                    field=f"gpus.{position}.index",
                )
            seen.add(index)
            if index not in by_index:
                raise ValidationFailed(
                    f"Node {locked.hostname} has no GPU with index {index}.",
                    code="unknown_gpu",
                    field=f"gpus.{position}.index",
                )
            gpu = by_index[index]
            gpu_health_apply(
                gpu=gpu,
                health=GpuHealth(report["health"]),
                reason="reported by the node agent",
                actor_label=actor_label,
                now=now,
                save=False,
            )
            gpu.health_reported_at = now
        Gpu.objects.bulk_update(
            [by_index[i] for i in sorted(seen)], ["health", "health_reason", "health_reported_at"]
        )
    if telemetry is not None:
        telemetry_record(
            node=locked, report=telemetry, gpus=by_index, now=now, actor_label=actor_label
        )
    locked.last_heartbeat_at = now
    # Not updated_at: that tracks edits to the node's description, not its liveness.
    fields = ["last_heartbeat_at"]
    if agent_version is not None and agent_version != locked.agent_version:
        locked.agent_version = agent_version
        fields.append("agent_version")
    locked.save(update_fields=fields)
    Outage.objects.filter(
        node=locked, ended_at__isnull=True, cause=OutageCause.HEARTBEAT_MISSED, started_at__lt=now
    ).update(ended_at=now)
    if locked.status == NodeStatus.OFFLINE:
        went_offline = (
            StatusChange.objects.filter(node=locked, to_status=NodeStatus.OFFLINE)
            .order_by("-at", "-id")
            .first()
        )
        was_draining = went_offline is not None and went_offline.from_status == NodeStatus.DRAINING
        offline_for = int((now - went_offline.at).total_seconds()) if went_offline else 0
        locked = _status_change(
            model=Node,
            obj=locked,
            action="resume",
            to_status=NodeStatus.DRAINING if was_draining else NodeStatus.AVAILABLE,
            actor=None,
            actor_label=actor_label,
            reason=f"Heartbeat received after {offline_for} s offline.",
        )
    node.last_heartbeat_at = locked.last_heartbeat_at
    node.status = locked.status
    return locked
