"""A reservation's GPU telemetry, per minute: only the minutes each of its GPUs was its own.

A GPU's history before and after the reservation belongs to other customers, so every series
is cut to the allocation's period ([lower, upper) of the allocation, a moved GPU's ending when
it was moved off).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.utils import timezone

from config.replica import read_connection
from marketplace.models import Reservation, ReservationStatus
from marketplace.services.energy import booking_energy, energy_for, energy_measured

__all__ = ["GpuSeries", "MAX_WINDOW", "reservation_telemetry", "reservation_energy"]

MAX_WINDOW = timedelta(days=7)

# A seller's allocation row of a GPU it sold for a window is kept (not live, its period the
# window) as the record of the sale: that time is the buyer's, and so are its measurements.
_NOT_SOLD_AWAY = """
   AND NOT EXISTS (SELECT 1 FROM marketplace_resalelisting l
                    WHERE l.reservation_id = a.reservation_id AND l.status = 'sold'
                      AND a.gpu_id = ANY(l.gpu_ids)
                      AND a.period <@ tstzrange(l.starts_at, l.ends_at, '[)'))"""

_SERIES_SQL = f"""
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
   AND lower(a.period) < %(until)s AND upper(a.period) > %(since)s{_NOT_SOLD_AWAY}
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
    with read_connection().cursor() as cursor:
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


_MEASURED_SQL = f"""
SELECT count(*), coalesce(sum(m.power_w_avg::numeric), 0)
  FROM marketplace_allocation a
  JOIN inventory_gpuminute m
    ON m.gpu_id = a.gpu_id AND m.minute >= lower(a.period) AND m.minute < upper(a.period)
 WHERE a.reservation_id = %(rid)s
   AND m.minute >= %(since)s AND m.minute < %(until)s
   AND m.power_w_avg IS NOT NULL
   AND NOT EXISTS (
       SELECT 1 FROM marketplace_reservationoutage o
        WHERE o.reservation_id = %(rid)s
          AND m.minute >= o.started_at AND m.minute < coalesce(o.ended_at, %(until)s)){_NOT_SOLD_AWAY}
"""


def _union_seconds(intervals: list[tuple[datetime, datetime]]) -> int:
    total, end = 0, None
    for lo, hi in sorted(intervals):
        if end is not None and lo < end:
            lo = end
        if hi > lo:
            total += int((hi - lo).total_seconds())
            end = hi
    return total


_ENDED = frozenset(
    {
        ReservationStatus.COMPLETED,
        ReservationStatus.CANCELLED,
        ReservationStatus.FAILED,
        ReservationStatus.PREEMPTED,
    }
)


def _outages(reservation: Reservation):
    """Its outages: as reservation_get_for_org loaded them, else read now."""
    loaded = getattr(reservation, "outage_list", None)
    return loaded if loaded is not None else reservation.outages.all()


def reservation_energy(*, reservation: Reservation, now: datetime | None = None):
    """The reservation's energy: before it runs, the estimate for its booked period; once it
    has run, its metered time (active, outages excluded) at the measured power where the GPUs
    reported it and at rated power where they did not."""
    if reservation.activated_at is None:
        if reservation.status in _ENDED:
            # Ended without running (cancelled, preempted or failed first): no time was used.
            return energy_for(
                site=reservation.site,
                gpu_model=reservation.gpu_model,
                gpu_count=reservation.gpu_count,
                seconds=0,
            )
        return booking_energy(reservation)
    now = now or timezone.now()
    since = reservation.activated_at
    until = min(reservation.released_at or now, reservation.ends_at, now)
    if until <= since:
        until = since
    outages = [
        (max(o.started_at, since), min(o.ended_at or until, until)) for o in _outages(reservation)
    ]
    wall = int((until - since).total_seconds()) - _union_seconds(outages)
    with read_connection().cursor() as cursor:
        cursor.execute(_MEASURED_SQL, {"rid": reservation.pk, "since": since, "until": until})
        minutes, watts = cursor.fetchone()
    return energy_measured(
        measured_wh=Decimal(watts) / 60,
        measured_gpu_seconds=60 * minutes,
        metered_gpu_seconds=max(wall, 0) * reservation.gpu_count,
        tdp_watts=reservation.gpu_model.tdp_watts,
        pue=reservation.site.pue,
        renewable_share=reservation.site.renewable_share,
        grid_carbon_g_per_kwh=reservation.site.grid_carbon_g_per_kwh,
    )
