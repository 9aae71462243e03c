"""A reservation's GPU telemetry, per minute: only the minutes each of its GPUs was its own.

A GPU's history before and after the reservation belongs to other customers, so every series
is cut to the allocation's period ([lower, upper) of the allocation, a moved GPU's ending when
it was moved off).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import connection

from marketplace.models import Reservation

__all__ = ["GpuSeries", "MAX_WINDOW", "reservation_telemetry"]

MAX_WINDOW = timedelta(days=7)

_SERIES_SQL = """
SELECT a.id, n.hostname, g.index, lower(a.period), upper(a.period),
       m.minute, m.utilization_pct_avg, m.memory_used_mib_max, m.power_w_avg,
       m.temperature_c_max
  FROM marketplace_allocation a
  JOIN inventory_gpu g ON g.id = a.gpu_id
  JOIN inventory_node n ON n.id = a.node_id
  LEFT JOIN inventory_gpuminute m
         ON m.gpu_id = a.gpu_id
        AND m.minute >= greatest(lower(a.period), %(since)s)
        AND m.minute < least(upper(a.period), %(until)s)
 WHERE a.reservation_id = %(rid)s
   AND lower(a.period) < %(until)s AND upper(a.period) > %(since)s
 ORDER BY lower(a.period), n.hostname, g.index, a.id, m.minute
"""


@dataclass
class GpuSeries:
    node: str
    index: int
    starts_at: datetime
    ends_at: datetime
    points: list[dict]


def reservation_telemetry(
    *, reservation: Reservation, since: datetime, until: datetime
) -> list[GpuSeries]:
    """Per allocated GPU, its minutes in [since, until) within its allocation."""
    series: dict[int, GpuSeries] = {}
    with connection.cursor() as cursor:
        cursor.execute(_SERIES_SQL, {"rid": reservation.pk, "since": since, "until": until})
        for row in cursor.fetchall():
            allocation_id, host, index, lower, upper, minute, util, memory, power, temp = row
            entry = series.get(allocation_id)
            if entry is None:
                entry = series[allocation_id] = GpuSeries(host, index, lower, upper, [])
            if minute is not None:
                entry.points.append(
                    {
                        "t": minute,
                        "utilization_pct": None if util is None else round(util, 1),
                        "memory_used_mib": memory,
                        "power_w": None if power is None else round(power, 1),
                        "temperature_c": temp,
                    }
                )
    return list(series.values())
