"""Reliability over the last 30 days, per GPU, node and site (hourly, marketplace.tasks).

- GPU: the share of its window it was not out: 1 − (union of its node's outages and its own
  GPU outages, failures included) ÷ its window. The window is the last 30 days, or since the
  node was added if later.
- Node: the mean of its GPUs' figures × the share of provisioning attempts on it that did not
  end in a node failure (1 when none was made in the window).
- Site: the mean of its nodes' figures weighted by their GPUs.

Retired nodes are left out. Figures are 0 to 1 with 4 decimal places, rounded half-up.
"""

from collections import defaultdict
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db import connection, transaction
from django.utils import timezone

from marketplace.models import AttemptOutcome

__all__ = ["WINDOW", "reliability_compute"]

WINDOW = timedelta(days=30)
_PLACES = Decimal("0.0001")

_GPU_DOWNTIME_SQL = """
WITH win AS (
    SELECT g.id AS gpu_id, g.node_id,
           tstzrange(greatest(%(since)s, n.created_at), %(now)s) AS w
    FROM inventory_gpu g JOIN inventory_node n ON n.id = g.node_id
    WHERE n.status <> 'retired'
), down AS (
    SELECT win.gpu_id,
           range_agg(tstzrange(o.started_at, coalesce(o.ended_at, %(now)s)) * win.w) AS m
    FROM win
    JOIN inventory_outage o
      ON o.node_id = win.node_id AND (o.gpu_id IS NULL OR o.gpu_id = win.gpu_id)
     AND o.started_at < upper(win.w) AND coalesce(o.ended_at, %(now)s) > lower(win.w)
    GROUP BY win.gpu_id
)
SELECT win.gpu_id, win.node_id,
       coalesce(extract(epoch FROM upper(win.w) - lower(win.w)), 0),
       coalesce((SELECT sum(extract(epoch FROM upper(r) - lower(r))) FROM unnest(down.m) r), 0)
FROM win LEFT JOIN down ON down.gpu_id = win.gpu_id
"""

# Provisioning attempts per node in the window: a node failure counts against the node the
# reservation was placed on (its allocations, live or past).
_ATTEMPTS_SQL = """
SELECT a.node_id, count(DISTINCT p.id),
       count(DISTINCT p.id) FILTER (WHERE p.outcome = %(node_failure)s)
FROM marketplace_provisioningattempt p
JOIN marketplace_allocation a ON a.reservation_id = p.reservation_id
WHERE p.started_at >= %(since)s AND p.started_at < %(now)s AND p.kind = 'provision'
GROUP BY a.node_id
"""


def _fraction(value: Decimal) -> Decimal:
    return min(max(value, Decimal(0)), Decimal(1)).quantize(_PLACES, rounding=ROUND_HALF_UP)


def reliability_compute(*, now: datetime | None = None) -> dict:
    """Compute and store every figure; returns how many GPUs, nodes and sites got one."""
    now = now or timezone.now()
    params = {"since": now - WINDOW, "now": now, "node_failure": AttemptOutcome.NODE_FAILURE}
    with connection.cursor() as cursor:
        cursor.execute(_GPU_DOWNTIME_SQL, params)
        gpu_rows = cursor.fetchall()
        cursor.execute(_ATTEMPTS_SQL, params)
        attempts = {node_id: (total, failed) for node_id, total, failed in cursor.fetchall()}
        cursor.execute("SELECT id, site_id FROM inventory_node WHERE status <> 'retired'")
        site_of = dict(cursor.fetchall())

    gpu_figure: dict[int, Decimal] = {}
    per_node: dict[int, list[Decimal]] = defaultdict(list)
    for gpu_id, node_id, window, down in gpu_rows:
        window, down = Decimal(window), Decimal(down)
        figure = _fraction(1 - down / window) if window > 0 else Decimal(1)
        gpu_figure[gpu_id] = figure
        per_node[node_id].append(figure)
    node_figure: dict[int, Decimal] = {}
    for node_id, figures in per_node.items():
        total, failed = attempts.get(node_id, (0, 0))
        success = Decimal(1) - Decimal(failed) / Decimal(total) if total else Decimal(1)
        node_figure[node_id] = _fraction(sum(figures) / len(figures) * success)
    weighted: dict[int, list[tuple[Decimal, int]]] = defaultdict(list)
    for node_id, figure in node_figure.items():
        weighted[site_of[node_id]].append((figure, len(per_node[node_id])))
    site_figure = {
        site_id: _fraction(sum(f * n for f, n in rows) / sum(n for _f, n in rows))
        for site_id, rows in weighted.items()
    }

    with transaction.atomic(), connection.cursor() as cursor:
        for table, figures in (
            ("inventory_gpu", gpu_figure),
            ("inventory_node", node_figure),
            ("inventory_site", site_figure),
        ):
            if figures:
                cursor.execute(
                    f"UPDATE {table} t SET reliability_30d = v.r "
                    "FROM unnest(%s::bigint[], %s::numeric[]) AS v(id, r) WHERE t.id = v.id",
                    [list(figures), list(figures.values())],
                )
    return {"gpus": len(gpu_figure), "nodes": len(node_figure), "sites": len(site_figure)}
