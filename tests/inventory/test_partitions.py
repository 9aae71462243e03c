"""The telemetry tables are partitioned by time: the job creates partitions ahead of need,
rows land in the partition of their time, expired partitions are dropped whole, and a write
never fails for want of a partition (inventory/partitions.py, migration 0013)."""

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from inventory.models import GpuMinute, GpuSample
from inventory.partitions import MINUTES, RAW, partitions_list, telemetry_partitions_maintain
from inventory.telemetry import samples_copy, telemetry_rollup
from tests.factories import NodeFactory

pytestmark = pytest.mark.django_db


def row(gpu_id: int, at) -> tuple:
    return (at, gpu_id, True, 60, 500.0, 90, 1000, 1980, 2619, "", 0, 0, 0, 0, False, False, "")


def partition_of(table: str, where: str, params: list) -> list[str]:
    with connection.cursor() as cur:
        cur.execute(f"SELECT DISTINCT tableoid::regclass::text FROM {table} WHERE {where}", params)
        return [r[0] for r in cur.fetchall()]


def test_the_tables_are_partitioned_by_time():
    with connection.cursor() as cur:
        cur.execute(
            "SELECT c.relname, pg_get_partkeydef(c.oid) FROM pg_partitioned_table p "
            "JOIN pg_class c ON c.oid = p.partrelid WHERE c.relname LIKE 'inventory_gpu%%' "
            "ORDER BY 1"
        )
        assert cur.fetchall() == [
            ("inventory_gpuminute", "RANGE (minute)"),
            ("inventory_gpusample", "RANGE (at)"),
        ]


def test_the_job_creates_a_day_of_hours_and_three_days_ahead(settings):
    settings.TELEMETRY_RAW_RETENTION = timedelta(hours=6)
    settings.TELEMETRY_ROLLUP_RETENTION = timedelta(days=30)
    now = timezone.now()

    telemetry_partitions_maintain(now=now)

    hours = set(partitions_list(RAW))
    for h in range(-6, 24):
        assert RAW.name(RAW.floor(now + timedelta(hours=h))) in hours
    days = set(partitions_list(MINUTES))
    for d in range(-30, 3):
        assert MINUTES.name(MINUTES.floor(now + timedelta(days=d))) in days
    assert telemetry_partitions_maintain(now=now) == {
        "inventory_gpusample": {"created": [], "dropped": []},
        "inventory_gpuminute": {"created": [], "dropped": []},
    }


def test_a_row_lands_in_the_partition_of_its_hour_and_day():
    gpu = NodeFactory(gpus=1).gpus.get()
    at = timezone.now().replace(minute=30, second=0, microsecond=0) + timedelta(hours=2)

    samples_copy([row(gpu.pk, at)])
    assert partition_of("inventory_gpusample", "gpu_id = %s", [gpu.pk]) == [RAW.name(RAW.floor(at))]

    telemetry_rollup(now=at + timedelta(minutes=1), lookback=timedelta(minutes=2))
    assert GpuMinute.objects.filter(gpu_id=gpu.pk).count() == 1
    assert partition_of("inventory_gpuminute", "gpu_id = %s", [gpu.pk]) == [
        MINUTES.name(MINUTES.floor(at))
    ]


def test_a_write_for_an_hour_without_a_partition_creates_it_first():
    gpu = NodeFactory(gpus=1).gpus.get()
    far = timezone.now() + timedelta(days=5)  # past what the job creates ahead
    assert RAW.name(RAW.floor(far)) not in partitions_list(RAW)

    samples_copy([row(gpu.pk, far), row(gpu.pk, far + timedelta(hours=1))])

    assert GpuSample.objects.filter(gpu_id=gpu.pk).count() == 2
    assert len(partition_of("inventory_gpusample", "gpu_id = %s", [gpu.pk])) == 2


def test_expired_partitions_are_dropped_whole_and_the_rest_kept(settings):
    settings.TELEMETRY_RAW_RETENTION = timedelta(hours=6)
    gpu = NodeFactory(gpus=1).gpus.get()
    now = timezone.now().replace(minute=10, second=0, microsecond=0)
    samples_copy([row(gpu.pk, now - timedelta(hours=h)) for h in (8, 7, 6, 5)])

    result = telemetry_partitions_maintain(now=now)

    # Kept: any partition holding a row younger than 6 h (the 6-hours-ago one: 04:00 … 05:00
    # for now = 10:10 holds 04:10, which is 6 h old, so its end is past the cutoff).
    assert result["inventory_gpusample"]["dropped"][-2:] == [
        RAW.name(RAW.floor(now - timedelta(hours=8))),
        RAW.name(RAW.floor(now - timedelta(hours=7))),
    ]
    kept = sorted(GpuSample.objects.filter(gpu_id=gpu.pk).values_list("at", flat=True))
    assert kept == [now - timedelta(hours=6), now - timedelta(hours=5)]


def test_the_retention_task_is_hourly_and_runs_the_partition_job():
    from config.celery import app

    app.loader.import_default_modules()
    entry = app.conf.beat_schedule["inventory-telemetry-retention"]

    assert entry["schedule"] == 3600.0
    result = app.tasks[entry["task"]]()
    assert set(result) == {"inventory_gpusample", "inventory_gpuminute", "inventory_fleetminute"}
