"""What the staff dashboard reads from the marketplace: the fleet's use, reservations by state,
what runs on nodes out of service, provisioning failures and curtailment exposure.

Each is one or two statements over the whole fleet (no per-row queries): the dashboard stays
a handful of queries whatever the fleet's size.
"""

from datetime import datetime, timedelta

from django.db.models import Count, Q

from config.replica import read_connection
from inventory.models import Node, NodeStatus, Outage
from inventory.node_bookings import NodeBooking
from marketplace.models import Allocation, Curtailment, ProvisioningAttempt, Reservation, Tier
from marketplace.models.provisioning import AttemptOutcome

__all__ = [
    "node_bookings_ahead",
    "reservations_by_status",
    "gpus_in_service",
    "curtailment_exposure",
    "curtailments_recent",
    "provisioning_failures",
    "nodes_out_of_service",
    "fleet_gpus",
]


def reservations_by_status() -> dict[str, int]:
    rows = Reservation.objects.order_by().values("status").annotate(n=Count("id"))
    return {row["status"]: row["n"] for row in rows}


def gpus_in_service() -> int:
    """GPUs on nodes not retired: what the fleet could give per second (utilisation's base)."""
    return Node.objects.exclude(status=NodeStatus.RETIRED).aggregate(n=Count("gpus"))["n"] or 0


# Interruptible GPU-hours booked at each site in [now, now + hours): what a curtailment there
# in that window would interrupt.
_EXPOSURE_SQL = """
SELECT s.id, s.name, s.status,
       SUM(EXTRACT(EPOCH FROM LEAST(upper(a.period), %(until)s)
                              - GREATEST(lower(a.period), %(now)s))) / 3600 AS gpu_hours,
       COUNT(DISTINCT a.reservation_id) AS reservations
FROM marketplace_allocation a
JOIN marketplace_reservation r ON r.id = a.reservation_id
JOIN inventory_node n ON n.id = a.node_id
JOIN inventory_site s ON s.id = n.site_id
WHERE a.is_live AND r.tier = %(tier)s
  AND a.period && tstzrange(%(now)s, %(until)s, '[)')
GROUP BY s.id, s.name, s.status ORDER BY gpu_hours DESC, s.name
"""


def curtailment_exposure(*, now: datetime, hours: int = 24) -> list[dict]:
    with read_connection().cursor() as cur:
        cur.execute(
            _EXPOSURE_SQL,
            {"now": now, "until": now + timedelta(hours=hours), "tier": Tier.INTERRUPTIBLE},
        )
        return [
            {
                "site": name,
                "site_status": status,
                "gpu_hours": round(float(gpu_hours), 1),
                "reservations": count,
            }
            for _, name, status, gpu_hours, count in cur.fetchall()
        ]


# Every attempt that did not get there: errors, a failed node, a dead worker, given up.
FAILURES = (
    AttemptOutcome.ERROR,
    AttemptOutcome.NODE_FAILURE,
    AttemptOutcome.ABANDONED,
    AttemptOutcome.GAVE_UP,
)


def provisioning_failures(*, since: datetime, limit: int = 20) -> tuple[int, list]:
    failed = ProvisioningAttempt.objects.filter(outcome__in=FAILURES, started_at__gte=since)
    latest = list(
        failed.select_related("reservation__site", "reservation__organization").order_by(
            "-started_at"
        )[:limit]
    )
    return failed.count(), latest


def nodes_out_of_service() -> list[dict]:
    """Nodes draining, in maintenance or offline, and nodes with an open outage, each with the
    reservations still on it (live allocations), for staff deciding what to do next."""
    open_outages = Outage.objects.filter(ended_at__isnull=True)
    nodes = list(
        Node.objects.filter(
            status__in=[NodeStatus.DRAINING, NodeStatus.MAINTENANCE, NodeStatus.OFFLINE]
        )
        .union(Node.objects.filter(pk__in=open_outages.values("node_id")))
        .order_by("hostname")
    )
    by_id = {n.pk: {"node": n, "outages": [], "reservations": {}} for n in nodes}
    for outage in open_outages.filter(node_id__in=by_id).order_by("started_at"):
        by_id[outage.node_id]["outages"].append(outage)
    allocations = (
        Allocation.objects.filter(node_id__in=by_id, is_live=True)
        .select_related("reservation__organization")
        .order_by("reservation__ends_at")
    )
    for allocation in allocations:
        entry = by_id[allocation.node_id]["reservations"]
        r = allocation.reservation
        entry.setdefault(r.pk, {"reservation": r, "gpus": 0})["gpus"] += 1
    sites = {n.site_id for n in nodes}
    site_names = dict(
        Node.objects.filter(site_id__in=sites).values_list("site_id", "site__name").distinct()
    )
    return [
        {
            "node": row["node"],
            "site": site_names.get(row["node"].site_id, ""),
            "outages": row["outages"],
            "reservations": list(row["reservations"].values()),
        }
        for row in by_id.values()
    ]


_FLEET_SQL = """
SELECT s.name, m.name, n.status,
       COUNT(g.id) AS gpus,
       COUNT(g.id) FILTER (WHERE g.health = 'failed') AS failed,
       COUNT(g.id) FILTER (WHERE EXISTS (
           SELECT 1 FROM marketplace_allocation a
           WHERE a.gpu_id = g.id AND a.is_live AND a.period @> %(now)s::timestamptz)) AS in_use
FROM inventory_gpu g
JOIN inventory_node n ON n.id = g.node_id
JOIN inventory_site s ON s.id = n.site_id
JOIN inventory_gpumodel m ON m.id = n.gpu_model_id
WHERE n.status <> 'retired'
GROUP BY s.name, m.name, n.status ORDER BY s.name, m.name, n.status
"""


def fleet_gpus(*, now: datetime) -> list[dict]:
    """GPUs by site, model and node status now: how many, failed, and in use at `now`."""
    with read_connection().cursor() as cur:
        cur.execute(_FLEET_SQL, {"now": now})
        return [
            {"site": site, "gpu_model": model, "node_status": status, "gpus": gpus,
             "failed": failed, "in_use": in_use}
            for site, model, status, gpus, failed, in_use in cur.fetchall()
        ]  # fmt: skip


def curtailments_recent(*, now: datetime, days: int = 7, limit: int = 20) -> list:
    """Curtailments whose window was in effect in the last `days` or is still to come, newest
    first: what was asked, shed and short, and what it cost."""
    return list(
        Curtailment.objects.filter(Q(until__isnull=True) | Q(until__gte=now - timedelta(days=days)))
        .select_related("site", "demand_response_event__source")
        .order_by("-shed_at", "-pk")[:limit]
    )


def node_bookings_ahead(
    node_ids: list[int], now: datetime, gpu_ids: list[int] | None = None
) -> list[NodeBooking]:
    """The reservations holding GPUs of these nodes (only `gpu_ids` of them, if given) from
    now on, one row per node and reservation (inventory.node_bookings' reader: what a drain,
    maintenance or retirement of the nodes, or failing the GPUs, would touch)."""
    allocations = Allocation.objects.filter(
        node_id__in=node_ids, is_live=True, period__endswith__gt=now
    )
    if gpu_ids is not None:
        allocations = allocations.filter(gpu_id__in=gpu_ids)
    rows = (
        allocations.values(
            "node_id",
            "reservation__public_id",
            "reservation__organization__name",
            "reservation__status",
            "reservation__tier",
            "reservation__starts_at",
            "reservation__ends_at",
        )
        .annotate(gpus=Count("gpu_id", distinct=True))
        .order_by("reservation__starts_at", "reservation__public_id", "node_id")
    )
    return [NodeBooking(*row.values()) for row in rows]
