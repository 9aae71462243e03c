"""Telemetry ingestion benchmark (not a test): can the heartbeat's write path keep up with a
fleet of 100,000 GPUs reporting every 30 s (3,334 samples/s)?

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_tel_bench REDIS_URL=redis://127.0.0.1:6379/5 \
        .venv/bin/python bench/bench_telemetry.py [--fleet-nodes 12500] [--nodes 1000] [--workers 2]

Builds a fleet of `--fleet-nodes` 8-GPU nodes (100,000 GPUs by default), then:
1. heartbeats `--nodes` of them without telemetry (liveness only: what a heartbeat costs
   anyway), then with the H100 telemetry report the agent's parser makes from
   tests/agent/fixtures/telemetry/nvidia_h100_healthy.xml: node_heartbeat_record, one
   committed transaction per node as the API makes it (node lock, GPU rows, health rules,
   the samples pushed to the Redis buffer), in `--workers` processes;
2. the flush of that buffer into inventory_gpusample (telemetry_flush: batched COPY);
3. a plain COPY of the same rows (same columns, same values), one per node with a commit
   each, in the same number of processes, and one COPY of all of them in one statement;
4. the per-minute rollup of those samples, and the on-disk bytes per sample and per minute row
   (heap and indexes), from which the storage per GPU and day follows.
The fleet and every row written are deleted at the end; the two telemetry tables are emptied
(TRUNCATE) at the start, so their sizes are this run's rows (use a database of its own).
"""

import argparse
import multiprocessing
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DEBUG", "1")

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection, connections, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from agent.gpu_telemetry import parse_nvidia_smi_xml  # noqa: E402
from inventory import telemetry  # noqa: E402
from inventory.models import Gpu, GpuMinute, GpuModel, GpuSample, HealthRules, Node, Site  # noqa: E402
from inventory.services import node_heartbeat_record  # noqa: E402
from inventory.telemetry import (  # noqa: E402
    BUFFER_KEY,
    _buffer,
    _sample_row,
    samples_copy,
    telemetry_flush,
    telemetry_rollup,
)

PREFIX = "tel-bench-"
FIXTURE = ROOT / "tests/agent/fixtures/telemetry/nvidia_h100_healthy.xml"
TARGET = 100_000 / 30


def fleet_create(count: int) -> list[int]:
    site, _ = Site.objects.get_or_create(
        slug=f"{PREFIX}site",
        defaults=dict(
            name="Telemetry bench", region="us-central", country="US", grid_operator="ERCOT",
            power_capacity_kw=50000, pue="1.20", cooling="hydro", energy_price_per_mwh="40",
            renewable_share="0.5", uplink_gbps=400, status="active",
        ),
    )  # fmt: skip
    model, _ = GpuModel.objects.get_or_create(
        slug=f"{PREFIX}h100",
        defaults=dict(name="H100 bench", vendor="nvidia", memory_gb=80, tdp_watts=700),
    )
    nodes = Node.objects.bulk_create(
        Node(site=site, gpu_model=model, hostname=f"{PREFIX}{i:06d}", cpu_cores=96, ram_gb=1024,
             disk_gb=15360, nic_gbps=400)
        for i in range(count)
    )  # fmt: skip
    Gpu.objects.bulk_create(
        (Gpu(node=n, index=i, serial=f"{n.hostname}-{i}") for n in nodes for i in range(8)),
        batch_size=20_000,
    )
    return [n.pk for n in nodes]


def fleet_delete() -> None:
    """Raw deletes: the ORM's cascade would collect 100,000 GPUs into one IN list."""
    like = [PREFIX + "%"]
    nodes = "SELECT id FROM inventory_node WHERE hostname LIKE %s"
    gpus = f"SELECT id FROM inventory_gpu WHERE node_id IN ({nodes})"
    with connection.cursor() as cur:
        cur.execute(f"DELETE FROM inventory_gpusample WHERE gpu_id IN ({gpus})", like)
        cur.execute(f"DELETE FROM inventory_gpuminute WHERE gpu_id IN ({gpus})", like)
        cur.execute(f"DELETE FROM inventory_gpuhealthchange WHERE gpu_id IN ({gpus})", like)
        cur.execute(f"DELETE FROM inventory_gpu WHERE node_id IN ({nodes})", like)
        cur.execute(f"DELETE FROM inventory_node WHERE id IN ({nodes})", like)
        cur.execute("DELETE FROM inventory_site WHERE slug LIKE %s", like)
        cur.execute("DELETE FROM inventory_gpumodel WHERE slug LIKE %s", like)


def _heartbeats(node_ids: list[int], with_telemetry: bool = True) -> float:
    connections.close_all()  # a forked worker opens its own connection
    telemetry._redis = None
    report = parse_nvidia_smi_xml(FIXTURE.read_text()) if with_telemetry else None
    nodes = list(Node.objects.filter(pk__in=node_ids))
    start = time.perf_counter()
    for node in nodes:
        node_heartbeat_record(node=node, telemetry=report, actor_label="bench agent")
    return time.perf_counter() - start


def _bare_heartbeats(node_ids: list[int]) -> float:
    return _heartbeats(node_ids, with_telemetry=False)


def _plain_copies(rows_by_node: list[list[tuple]]) -> float:
    connections.close_all()
    start = time.perf_counter()
    for rows in rows_by_node:
        with transaction.atomic():
            samples_copy(rows)
    return time.perf_counter() - start


def _parallel(function, shares: list, workers: int) -> float:
    connections.close_all()
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(function, shares)
    return time.perf_counter() - start


def _split(items: list, parts: int) -> list[list]:
    return [items[i::parts] for i in range(parts)]


def _bytes(table: str) -> int:
    """Heap and indexes of a table, summed over its partitions (both telemetry tables are
    partitioned by time: docs/retention.md)."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT coalesce(sum(pg_total_relation_size(inhrelid)), 0) FROM pg_inherits "
            "WHERE inhparent = %s::regclass",
            [table],
        )
        return cur.fetchone()[0] or 0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fleet-nodes", type=int, default=12_500)
    parser.add_argument("--nodes", type=int, default=1_000, help="nodes heartbeating per pass")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    fleet_delete()
    with connection.cursor() as cur:  # fresh tables, so their sizes are this run's rows
        cur.execute("TRUNCATE inventory_gpusample, inventory_gpuminute")
    HealthRules.current()
    report = parse_nvidia_smi_xml(FIXTURE.read_text())

    t0 = time.perf_counter()
    node_ids = fleet_create(args.fleet_nodes)
    print(f"fleet: {args.fleet_nodes:,} nodes, {8 * args.fleet_nodes:,} GPUs "
          f"({time.perf_counter() - t0:.1f} s to create)")  # fmt: skip
    try:
        sample_nodes = node_ids[: args.nodes]
        samples = 8 * len(sample_nodes)
        rows_by_node = []
        gpus = Gpu.objects.filter(node_id__in=sample_nodes).order_by("node_id", "index")
        now = timezone.now()
        by_node: dict[int, list[tuple]] = {}
        for gpu in gpus.values_list("pk", "node_id", "index"):
            by_node.setdefault(gpu[1], []).append(_sample_row(gpu[0], report["gpus"][gpu[2]], now))
        rows_by_node = list(by_node.values())
        GpuSample.objects.all().count()  # warm the catalogue

        _buffer().delete(BUFFER_KEY)
        shares = _split(sample_nodes, args.workers)
        bare_s = _parallel(_bare_heartbeats, shares, args.workers)
        heartbeat_s = _parallel(_heartbeats, shares, args.workers)
        connections.close_all()
        start = time.perf_counter()
        flushed = telemetry_flush()
        flush_s = time.perf_counter() - start
        assert flushed == samples, (flushed, samples)
        copy_s = _parallel(_plain_copies, _split(rows_by_node, args.workers), args.workers)
        connections.close_all()
        all_rows = [row for rows in rows_by_node for row in rows]
        start = time.perf_counter()
        with transaction.atomic():
            samples_copy(all_rows)
        one_copy_s = time.perf_counter() - start

        raw_rows = GpuSample.objects.filter(gpu__node__hostname__startswith=PREFIX).count()
        raw_bytes = _bytes("inventory_gpusample") / max(raw_rows, 1)
        start = time.perf_counter()
        minutes = telemetry_rollup(now=now + timedelta(minutes=1), lookback=timedelta(minutes=2))
        rollup_s = time.perf_counter() - start
        minute_bytes = _bytes("inventory_gpuminute") / max(GpuMinute.objects.count(), 1)

        def rate(seconds: float) -> str:
            return f"{samples / seconds:,.0f} samples/s ({samples / seconds / TARGET:.1f}× need)"

        print(f"samples per pass: {samples:,} ({len(sample_nodes):,} node heartbeats of 8 GPUs), "
              f"{args.workers} worker process(es); the fleet needs {TARGET:,.0f} samples/s")  # fmt: skip

        def per_beat(seconds: float) -> str:
            return f"{1000 * seconds * args.workers / len(sample_nodes):.2f} ms per heartbeat"

        print(f"  heartbeats without telemetry (liveness only):     {bare_s:.2f} s, "
              f"{per_beat(bare_s)}")  # fmt: skip
        print(f"  heartbeats with telemetry (rules, buffer push):   {heartbeat_s:.2f} s, "
              f"{per_beat(heartbeat_s)} = {rate(heartbeat_s)}")  # fmt: skip
        print(
            f"  flush of the buffer into the table (1 process):   {flush_s:.2f} s = {rate(flush_s)}"
        )
        print(
            f"  plain COPY of the same rows, one per node+commit: {copy_s:.2f} s = {rate(copy_s)}"
        )
        print(f"  plain COPY of the same rows in one statement:     {one_copy_s:.2f} s = "
              f"{rate(one_copy_s)}")  # fmt: skip
        print(f"  the flush runs at {one_copy_s / flush_s * 100:.0f} % of the one-statement COPY's "
              f"rate; telemetry adds {per_beat(heartbeat_s - bare_s)}")  # fmt: skip
        print(f"rollup of {minutes:,} GPU-minutes: {rollup_s:.2f} s")
        print(f"storage: {raw_bytes:.0f} B per raw sample (heap + BRIN + pkey); "
              f"{minute_bytes:.0f} B per GPU-minute row (heap + pkey)")  # fmt: skip
        print(f"  per GPU: raw {raw_bytes * 120 * 6 / 1024:.0f} KiB for 6 h at 30 s; rollup "
              f"{minute_bytes * 1440 / 1024:.0f} KiB per day, "
              f"{minute_bytes * 1440 * 30 / 1024**2:.1f} MiB for 30 days")  # fmt: skip
    finally:
        connections.close_all()
        fleet_delete()


if __name__ == "__main__":
    main()
