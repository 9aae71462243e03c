"""Time partitions of the telemetry tables: created ahead of need, dropped when expired.

Raw samples (inventory_gpusample) are partitioned by hour of `at`, the per-minute rollup
(inventory_gpuminute) by day of `minute` (PostgreSQL declarative range partitioning,
inventory migration 0013). Retention is then a DROP TABLE of a whole partition: no row-by-row
DELETE, no dead rows left for vacuum, whatever the fleet's size. `telemetry_partitions_maintain`
(beat, hourly, as `inventory.tasks.telemetry_retention`) creates the partitions for the next
day and drops those entirely past their retention; a writer that meets an hour without its
partition (the job has not run yet, a test's rolled-back one) creates it first
(`partitions_ensure`), so a write never fails for want of one.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

__all__ = [
    "RAW",
    "MINUTES",
    "PartitionedTable",
    "partitions_ensure",
    "partitions_list",
    "telemetry_partitions_maintain",
]


@dataclass(frozen=True)
class PartitionedTable:
    table: str
    step: timedelta  # one hour or one day
    ahead: timedelta  # created this far ahead of now
    retention_setting: str

    @property
    def retention(self) -> timedelta:
        return getattr(settings, self.retention_setting)

    def floor(self, at: datetime) -> datetime:
        at = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        return at.replace(hour=0) if self.step >= timedelta(days=1) else at

    def name(self, start: datetime) -> str:
        fmt = "%Y%m%d" if self.step >= timedelta(days=1) else "%Y%m%d%H"
        return f"{self.table}_p{start:{fmt}}"

    def start_of(self, name: str) -> datetime:
        suffix = name.rsplit("_p", 1)[1]
        fmt = "%Y%m%d" if self.step >= timedelta(days=1) else "%Y%m%d%H"
        return datetime.strptime(suffix, fmt).replace(tzinfo=UTC)


RAW = PartitionedTable(
    "inventory_gpusample", timedelta(hours=1), timedelta(days=1), "TELEMETRY_RAW_RETENTION"
)
MINUTES = PartitionedTable(
    "inventory_gpuminute", timedelta(days=1), timedelta(days=3), "TELEMETRY_ROLLUP_RETENTION"
)


def partitions_list(table: PartitionedTable) -> list[str]:
    """The table's partitions, oldest first."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = %s::regclass ORDER BY c.relname",
            [table.table],
        )
        return [row[0] for row in cursor.fetchall()]


def partitions_ensure(table: PartitionedTable, since: datetime, until: datetime) -> list[str]:
    """Create the missing partitions covering [since, until); returns the names created."""
    starts = []
    start = table.floor(since)
    while start < until:
        starts.append(start)
        start += table.step
    if not starts:
        return []
    names = [table.name(s) for s in starts]
    created = []
    with connection.cursor() as cursor:
        cursor.execute("SELECT n FROM unnest(%s::text[]) n WHERE to_regclass(n) IS NULL", [names])
        missing = {row[0] for row in cursor.fetchall()}
        for start, name in zip(starts, names, strict=True):
            if name not in missing:
                continue
            # IF NOT EXISTS: a concurrent writer may have just created it.
            # DDL takes no bind parameters; the bounds are datetimes of our own making.
            end = start + table.step
            cursor.execute(
                f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table.table} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{end.isoformat()}')"
            )
            created.append(name)
    return created


def partitions_drop_expired(table: PartitionedTable, now: datetime) -> list[str]:
    """Drop the partitions whose every row is older than the retention; returns their names."""
    cutoff = now - table.retention
    dropped = []
    with connection.cursor() as cursor:
        for name in partitions_list(table):
            if table.start_of(name) + table.step <= cutoff:
                cursor.execute(f"DROP TABLE {name}")
                dropped.append(name)
    return dropped


def telemetry_partitions_maintain(*, now: datetime | None = None) -> dict[str, dict]:
    """Create the telemetry tables' partitions ahead and drop the expired ones; idempotent."""
    now = now or timezone.now()
    result: dict[str, dict] = {}
    for table in (RAW, MINUTES):
        with transaction.atomic():
            created = partitions_ensure(table, now - table.retention, now + table.ahead)
            dropped = partitions_drop_expired(table, now)
        result[table.table] = {"created": created, "dropped": dropped}
    return result
