"""Placement: pick specific GPUs for a reservation and insert its allocations.

Best fit: a request that fits on one node goes to the node with the fewest free GPUs that still
fits it (filling partly used nodes first keeps whole nodes free for large requests); a request
larger than the biggest node takes whole free nodes at the site, largest first, and uses only
as many GPUs of the last node as it needs.

Concurrency: PostgreSQL's exclusion constraint is what makes double booking impossible. To keep
racing clients from deadlocking inside the constraint check, each attempt first locks the
chosen node rows FOR UPDATE in id order, then re-reads which of their GPUs are free (a fresh
snapshot, so it sees what the previous lock holder committed), then bulk-inserts. An exclusion
violation (23P01) or deadlock (40P01) is "taken": roll back to the attempt's savepoint, place
again, and after a few attempts answer NotAvailable.
"""

from datetime import datetime
from decimal import Decimal

from django.db import IntegrityError, OperationalError, connection, transaction
from psycopg.types.range import Range

from config.dates import iso_utc
from config.db import model_columns, model_from_row
from config.errors import NotAvailable
from inventory.models import Node, NodeStatus, Site, SiteStatus
from marketplace.models import Allocation, Reservation
from marketplace.rules import choose_nodes
from marketplace.selectors.availability import curtailment_overlapping, node_free_capacity

__all__ = [
    "allocation_place",
    "curtailment_headroom_take",
    "site_curtailed_refusal",
    "MAX_PLACEMENT_ATTEMPTS",
]

# Each retry re-reads capacities, so it only fails again if yet another node filled up meanwhile.
MAX_PLACEMENT_ATTEMPTS = 8
_TAKEN_SQLSTATES = {"23P01", "40P01"}

# The chosen nodes locked FOR UPDATE in id order, the lock every booking takes first (an
# extension locks its nodes in the same order, so the two cannot deadlock), with what decides
# whether each may take the booking now: its status and reliability (of the locked row, so
# current), its site's status and whether maintenance overlaps the window.
_LOCK_NODES_SQL = f"""
SELECT {model_columns(Node, "n")}, s.status, EXISTS (
           SELECT 1 FROM inventory_maintenancewindow w
           WHERE w.node_id = n.id AND w.period && tstzrange(%(starts_at)s, %(ends_at)s, '[)'))
FROM inventory_node n JOIN inventory_site s ON s.id = n.site_id
WHERE n.id = ANY(%(node_ids)s) ORDER BY n.id FOR UPDATE OF n
"""
# The GPUs of the (locked) nodes that are free for the window, in placement order: not
# failed, and no live allocation in their `busy` periods (kept with the allocations by
# triggers, so what the previous lock holder committed is there). One table, so planning it
# costs little, unlike the joins the lock statement has.
_FREE_GPUS_SQL = """
SELECT g.id, g.node_id FROM inventory_gpu g
WHERE g.node_id = ANY(%(node_ids)s) AND g.health <> 'failed'
  AND NOT (g.busy && tstzrange(%(starts_at)s, %(ends_at)s, '[)'))
ORDER BY g.node_id, g.index
"""
# One statement for all the allocations. Stamped by the database's clock, in a statement
# after the node locks: a grid curtailment tells what was booked after its call by comparing
# this with its own stamp, taken the same way under the same locks, so the two never come
# from two hosts' clocks (marketplace.services.curtailment).
_INSERT_SQL = """
INSERT INTO marketplace_allocation (reservation_id, gpu_id, node_id, period, is_live, created_at)
SELECT %(reservation_id)s, t.gpu_id, t.node_id, %(period)s, true, statement_timestamp()
FROM unnest(%(gpu_ids)s::bigint[], %(node_ids)s::bigint[]) AS t(gpu_id, node_id)
RETURNING gpu_id, id, created_at
"""


# The grid curtailments of the nodes' site whose window overlaps the period, locked (id order),
# with the booking's time inside each window; if each has unsold over-shed for the new draw all
# through that time (what is sold at once there: marketplace_curtailment_sold_kw; none before
# its victims' notice ends, when that is after the window's start), the draw is
# taken from all of them, a take each; the first that has not is returned and nothing written.
_HEADROOM_TAKE_SQL = """
WITH draw AS (
    SELECT %(gpus)s * m.tdp_watts * s.pue / 1000.0 AS kw, s.id AS site_id
    FROM inventory_node n
    JOIN inventory_site s ON s.id = n.site_id
    JOIN inventory_gpumodel m ON m.id = n.gpu_model_id
    WHERE n.id = %(node_id)s),
c AS (
    SELECT c.id, c.shed_at, c.until, c.headroom_kw, c.preempt_at,
           tstzrange(%(lo)s, %(hi)s, '[)') * tstzrange(c.shed_at, c.until, '[)') AS inside
    FROM marketplace_curtailment c, draw
    WHERE c.site_id = draw.site_id AND c.called_off_at IS NULL
      AND tstzrange(c.shed_at, c.until, '[)') && tstzrange(%(lo)s, %(hi)s, '[)')
    ORDER BY c.id FOR UPDATE OF c),
blocked AS (
    SELECT c.shed_at, c.until FROM c, draw
    WHERE c.headroom_kw
          - marketplace_curtailment_sold_kw(c.id, lower(c.inside), upper(c.inside)) < draw.kw
       -- victims given the minimum notice run past the window's start: nothing is over-shed
       -- until they stop
       OR (c.preempt_at > c.shed_at AND c.inside && tstzrange(c.shed_at, c.preempt_at, '[)'))
    ORDER BY c.shed_at LIMIT 1),
taken AS (
    INSERT INTO marketplace_curtailmenttake (curtailment_id, reservation_id, kw, period, created_at)
    SELECT c.id, %(reservation_id)s, draw.kw, c.inside, now()
    FROM c, draw WHERE NOT EXISTS (SELECT 1 FROM blocked))
SELECT shed_at, until FROM blocked
"""


def curtailment_headroom_take(
    *,
    reservation_id: int,
    node_id: int,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
) -> None:
    """Sell new load at the node's site for [starts_at, ends_at) only where its grid
    curtailments leave room (what they shed beyond their target, less what is sold at once
    there already); NotAvailable otherwise. The reservation's take ends when it leaves the
    live statuses (marketplace.services.transitions), giving the room back.

    Under the caller's node locks: a curtailment being planned locks every node of the site
    first, so a booking and a curtailment at one site are taken one after the other."""
    with connection.cursor() as cur:
        cur.execute(
            _HEADROOM_TAKE_SQL,
            {
                "gpus": gpu_count,
                "node_id": node_id,
                "lo": starts_at,
                "hi": ends_at,
                "reservation_id": reservation_id,
            },
        )
        blocked = cur.fetchone()
    if blocked is not None:
        site = Site.objects.filter(nodes__pk=node_id).only("name").first()
        raise NotAvailable(
            f"{site or 'The site'} is shedding load for its grid operator "
            f"{_curtailment_window_text(*blocked)}: nothing more is sold there for that time.",
            code="site_curtailed",
        )


def _curtailment_window_text(shed_at: datetime, until: datetime | None) -> str:
    """ "from <time> to <time>", to the second, as the API writes times."""
    window = f"from {iso_utc(shed_at.replace(microsecond=0))}"
    return window + (f" to {iso_utc(until.replace(microsecond=0))}" if until else "")


def site_curtailed_refusal(
    *, site_id: int, starts_at: datetime, ends_at: datetime
) -> NotAvailable | None:
    """The refusal (409 `site_curtailed`) naming the site's first grid curtailment in effect
    whose window overlaps the period, or None if none does: why a site that has the GPUs
    sells none of them then."""
    curtailed = curtailment_overlapping(site_id=site_id, starts_at=starts_at, ends_at=ends_at)
    if curtailed is None:
        return None
    return NotAvailable(
        f"{curtailed.site} is shedding load for its grid operator "
        f"{_curtailment_window_text(curtailed.shed_at, curtailed.until)}: nothing more is sold "
        "there for that time.",
        code="site_curtailed",
    )


class _Taken(Exception):
    """Another transaction took some of the planned GPUs since we read the capacities."""


def _sqlstate(exc: Exception) -> str | None:
    return getattr(getattr(exc, "__cause__", None), "sqlstate", None)


def allocation_place(
    *,
    reservation: Reservation,
    site_id: int,
    gpu_model_id: int,
    gpu_count: int,
    starts_at: datetime,
    ends_at: datetime,
    first_plan: list[tuple[int, int]] | None = None,
    min_reliability: Decimal | None = None,
    moved: bool = False,
) -> list[Allocation]:
    """Allocate `gpu_count` GPUs at one site to `reservation`; NotAvailable if they cannot be.

    `moved`: the GPUs replace ones the reservation held at this site (a failed GPU, a failed
    node), so they add no load there: a curtailment's window is not asked for room.

    `first_plan`, from a read the caller has just made (the offer being booked), is tried
    first without reading the site again; it is checked under the node locks like any plan.
    `min_reliability` (the floor the booking was searched with) keeps every plan, the first
    included, to nodes at or above it. Must run inside the caller's transaction (the
    reservation row is not yet committed).
    """
    if not connection.in_atomic_block:
        raise RuntimeError("allocation_place must run inside a transaction")
    period = Range(starts_at, ends_at, "[)")
    for attempt in range(MAX_PLACEMENT_ATTEMPTS):
        if attempt == 0 and first_plan:
            plan = first_plan
        else:
            capacities = node_free_capacity(
                site_id=site_id,
                gpu_model_id=gpu_model_id,
                starts_at=starts_at,
                ends_at=ends_at,
                min_reliability=min_reliability,
                # A move asks a curtailment's window for no room: it adds no draw there.
                gpu_count=0 if moved else gpu_count,
            )
            plan = choose_nodes(capacities, gpu_count)
        if not plan:
            break
        try:
            # A savepoint per attempt: rolling it back also releases that attempt's node locks.
            with transaction.atomic():
                return _lock_and_insert(
                    reservation=reservation,
                    plan=plan,
                    period=period,
                    min_reliability=min_reliability,
                    moved=moved,
                )
        except _Taken:
            continue
        except (IntegrityError, OperationalError) as exc:
            if _sqlstate(exc) not in _TAKEN_SQLSTATES:
                raise
    if not moved:
        # GPUs that are free but held back by a grid curtailment's window: say so (a quote
        # taken after the curtailment was announced), not that they were taken.
        free = node_free_capacity(
            site_id=site_id,
            gpu_model_id=gpu_model_id,
            starts_at=starts_at,
            ends_at=ends_at,
            min_reliability=min_reliability,
            gpu_count=0,
        )
        refusal = choose_nodes(free, gpu_count) and site_curtailed_refusal(
            site_id=site_id, starts_at=starts_at, ends_at=ends_at
        )
        if refusal:
            raise refusal
    raise NotAvailable(
        f"{gpu_count} GPU(s) are no longer free at this site for the requested period.",
        code="not_available",
    )


def _lock_and_insert(
    *, reservation: Reservation, plan, period: Range, min_reliability: Decimal | None, moved: bool
) -> list[Allocation]:
    node_ids = sorted(node_id for node_id, _ in plan)
    window = {"node_ids": node_ids, "starts_at": period.lower, "ends_at": period.upper}
    columns = len(Node._meta.concrete_fields)
    with connection.cursor() as cur:
        # The lock, and the node rows the allocations are returned with (the caller shows
        # their hostnames without reading again).
        cur.execute(_LOCK_NODES_SQL, window)
        nodes, bookable = {}, set()
        for row in cur.fetchall():
            node = model_from_row(Node, row[:columns])
            site_status, in_maintenance = row[columns:]
            nodes[node.pk] = node
            reliable = min_reliability is None or (
                node.reliability_30d is not None and node.reliability_30d >= min_reliability
            )
            if (
                node.status == NodeStatus.AVAILABLE
                and site_status == SiteStatus.ACTIVE
                and not in_maintenance
                and reliable
            ):
                bookable.add(node.pk)
        # A fresh snapshot, taken once the locks are held: it sees what the previous holder
        # of any of them committed.
        cur.execute(_FREE_GPUS_SQL, window)
        free_by_node: dict[int, list[int]] = {}
        for gpu_id, node_id in cur.fetchall():
            if node_id in bookable:
                free_by_node.setdefault(node_id, []).append(gpu_id)
        gpu_ids, gpu_node_ids = [], []
        for node_id, take in plan:
            free = free_by_node.get(node_id, [])
            if len(free) < take:
                raise _Taken
            gpu_ids += free[:take]
            gpu_node_ids += [node_id] * take
        if not moved:
            curtailment_headroom_take(
                reservation_id=reservation.pk,
                node_id=node_ids[0],
                gpu_count=len(gpu_ids),
                starts_at=period.lower,
                ends_at=period.upper,
            )
        cur.execute(
            _INSERT_SQL,
            {
                "reservation_id": reservation.pk,
                "gpu_ids": gpu_ids,
                "node_ids": gpu_node_ids,
                "period": period,
            },
        )
        inserted = {gpu_id: (allocation_id, at) for gpu_id, allocation_id, at in cur.fetchall()}
    # As a query loads them (saved, from this database), with the rows in hand attached.
    names = [f.attname for f in Allocation._meta.concrete_fields]
    allocations = []
    for gpu_id, node_id in zip(gpu_ids, gpu_node_ids, strict=True):
        row = {
            "id": inserted[gpu_id][0],
            "reservation_id": reservation.pk,
            "gpu_id": gpu_id,
            "node_id": node_id,
            "period": period,
            "is_live": True,
            "created_at": inserted[gpu_id][1],
        }
        allocation = Allocation.from_db(connection.alias, names, [row[n] for n in names])
        allocation.reservation, allocation.node = reservation, nodes[node_id]
        allocations.append(allocation)
    return allocations
