"""Raw telemetry samples partitioned by hour, the per-minute rollup by day (docs/retention.md).

Each table is rebuilt as a range-partitioned table of the same columns (the samples' primary
key becomes (id, at): a partitioned table's keys include its partition key), with partitions
from the oldest row still inside its retention to a day ahead; the rows are copied over. The
models do not change: Django reads and writes the parent table as before.
"""

from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import migrations

TABLES = [
    # table, partition column, primary key, other indexes, step, retention setting
    ("inventory_gpusample", "at", "(id, at)", ["CREATE INDEX gpusample_at_brin ON {t} USING brin (at)"], timedelta(hours=1), "TELEMETRY_RAW_RETENTION"),
    ("inventory_gpuminute", "minute", "(gpu_id, minute)", [], timedelta(days=1), "TELEMETRY_ROLLUP_RETENTION"),
]  # fmt: skip


def _floor(at: datetime, step: timedelta) -> datetime:
    at = at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return at.replace(hour=0) if step >= timedelta(days=1) else at


def _name(table: str, start: datetime, step: timedelta) -> str:
    return f"{table}_p{start:{'%Y%m%d' if step >= timedelta(days=1) else '%Y%m%d%H'}}"


def partition(apps, schema_editor):
    cursor = schema_editor.connection.cursor()
    now = datetime.now(UTC)
    for table, column, pkey, indexes, step, retention in TABLES:
        old = f"{table}_unpartitioned"
        cursor.execute(f"ALTER TABLE {table} RENAME TO {old}")
        cursor.execute(f"ALTER TABLE {old} RENAME CONSTRAINT {table}_pkey TO {old}_pkey")
        if table == "inventory_gpusample":
            cursor.execute("ALTER INDEX gpusample_at_brin RENAME TO gpusample_at_brin_old")
        cursor.execute(
            f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY) "
            f"PARTITION BY RANGE ({column})"
        )
        cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY {pkey}")
        for index in indexes:
            cursor.execute(index.format(t=table))
        since = now - getattr(settings, retention)
        cursor.execute(f"SELECT min({column}) FROM {old} WHERE {column} >= %s", [since])
        oldest = cursor.fetchone()[0] or since
        start = _floor(min(oldest, since), step)
        while start < now + timedelta(days=1):
            cursor.execute(
                f"CREATE TABLE {_name(table, start, step)} PARTITION OF {table} "
                f"FOR VALUES FROM ('{start.isoformat()}') TO ('{(start + step).isoformat()}')"
            )
            start += step
        cursor.execute(
            f"INSERT INTO {table} OVERRIDING SYSTEM VALUE SELECT * FROM {old} "
            f"WHERE {column} >= %s AND {column} < %s",
            [_floor(min(oldest, since), step), start],
        )
        if table == "inventory_gpusample":
            cursor.execute(
                "SELECT setval(pg_get_serial_sequence('inventory_gpusample', 'id'), "
                "(SELECT coalesce(max(id), 0) + 1 FROM inventory_gpusample_unpartitioned), false)"
            )
        cursor.execute(f"DROP TABLE {old}")


def unpartition(apps, schema_editor):
    cursor = schema_editor.connection.cursor()
    for table, _column, pkey, indexes, _step, _retention in TABLES:
        old = f"{table}_partitioned"
        cursor.execute(f"ALTER TABLE {table} RENAME TO {old}")
        cursor.execute(f"ALTER TABLE {old} RENAME CONSTRAINT {table}_pkey TO {old}_pkey")
        if table == "inventory_gpusample":
            cursor.execute("ALTER INDEX gpusample_at_brin RENAME TO gpusample_at_brin_old")
        cursor.execute(f"CREATE TABLE {table} (LIKE {old} INCLUDING DEFAULTS INCLUDING IDENTITY)")
        key = "(id)" if table == "inventory_gpusample" else pkey
        cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_pkey PRIMARY KEY {key}")
        for index in indexes:
            cursor.execute(index.format(t=table))
        cursor.execute(f"INSERT INTO {table} OVERRIDING SYSTEM VALUE SELECT * FROM {old}")
        if table == "inventory_gpusample":
            cursor.execute(
                "SELECT setval(pg_get_serial_sequence('inventory_gpusample', 'id'), "
                "(SELECT coalesce(max(id), 0) + 1 FROM inventory_gpusample), false)"
            )
        cursor.execute(f"DROP TABLE {old}")


class Migration(migrations.Migration):
    dependencies = [("inventory", "0012_heartbeat_buffer")]

    operations = [migrations.RunPython(partition, unpartition)]
