"""Benchmark: 1,000 reservations starting at once, through real Celery and Redis.

    DEBUG=1 DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_prov_bench \
    REDIS_URL=redis://127.0.0.1:6379/6 .venv/bin/python bench/bench_provisioning.py

Not a test: it prints figures. It migrates the database it is given, starts its own worker
(`celery -A config worker -c CONCURRENCY`, default 4) on a Celery queue of its own, with the
simulated driver at zero latency, and then, in the same run:

1. baseline: COUNT no-op tasks (marketplace.tasks.noop), time until the worker ran them all;
2. provisioning: COUNT scheduled reservations (1 GPU each) all due now; one dispatcher task
   (what beat sends every 5 s) enqueues a provision task each, which moves its reservation
   to provisioning and on to active;
   time until every one is active.

The goal is a provisioning rate of at least 30 % of the no-op rate. The bench's rows are
deleted at the end.

The latest figures and the machine they were measured on are in docs/benchmarks.md.
"""

import argparse
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

import django  # noqa: E402

django.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402
from psycopg.types.range import Range  # noqa: E402
from redis import Redis  # noqa: E402

from config.celery import app  # noqa: E402
from inventory.models import Gpu, GpuModel, Node, Site, SiteStatus  # noqa: E402
from marketplace.models import (  # noqa: E402
    Allocation,
    Organization,
    Reservation,
    ReservationStatus,
    ReservationTransition,
)


def _worker(concurrency: int, log_path: str | None, queue: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "SIMULATED_DRIVER_LATENCY_SECONDS": "0",
        "LOG_LEVEL": "WARNING",
        # As in production: DEBUG off (DEBUG logs every SQL query, which skews the figures).
        "DEBUG": "0",
        "SECRET_KEY": os.environ.get("SECRET_KEY") or uuid.uuid4().hex * 2,
        "SECURE_SSL_REDIRECT": "0",
        # The dispatcher runs in the worker: its enqueues must land in the bench's queue too.
        "CELERY_TASK_DEFAULT_QUEUE": queue,
    }
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "config",
            "worker",
            "-l",
            "info" if log_path else "warning",
            "-c",
            str(concurrency),
            "-n",
            f"bench-{os.getpid()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-Q",
            queue,
        ],
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "w") if log_path else subprocess.DEVNULL,  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    # Ready when it has run a first no-op.
    redis = Redis.from_url(settings.REDIS_URL)
    key = f"bench:warmup:{uuid.uuid4().hex}"
    for _ in range(concurrency * 4):
        app.send_task("marketplace.tasks.noop", args=[key])
    deadline = time.monotonic() + 60
    while int(redis.get(key) or 0) < concurrency * 4:
        if time.monotonic() > deadline:
            raise SystemExit("the worker did not start")
        time.sleep(0.05)
    redis.delete(key)
    return process


def _inventory(count: int, tag: str) -> tuple[Site, GpuModel, list[Gpu]]:
    site = Site.objects.create(
        slug=f"bench-{tag}",
        name="Bench site",
        region="bench",
        country="US",
        grid_operator="ERCOT",
        power_capacity_kw=Decimal("50000"),
        pue=Decimal("1.1"),
        cooling="immersion",
        energy_price_per_mwh=Decimal("30"),
        renewable_share=Decimal("0.5"),
        uplink_gbps=400,
        status=SiteStatus.ACTIVE,
    )
    model, _ = GpuModel.objects.get_or_create(
        slug="bench-h100",
        defaults=dict(name="Bench H100", vendor="NVIDIA", memory_gb=80, tdp_watts=700),
    )
    nodes = Node.objects.bulk_create(
        Node(
            site=site,
            hostname=f"bench-{tag}-{i:04d}",
            gpu_model=model,
            cpu_cores=96,
            ram_gb=1024,
            disk_gb=15000,
            nic_gbps=400,
        )
        for i in range((count + 7) // 8)
    )
    gpus = Gpu.objects.bulk_create(
        Gpu(node=n, index=i, serial=f"{n.hostname}-{i}") for n in nodes for i in range(8)
    )
    return site, model, gpus[:count]


def _book(count: int, site: Site, model: GpuModel, gpus: list[Gpu], tag: str) -> list[int]:
    """What reservation_create leaves behind for a start-now booking: scheduled + allocations."""
    org = Organization.objects.create(name=f"Bench {tag}", slug=f"bench-{tag}")
    now = timezone.now()
    ends = now + timedelta(hours=1)
    with transaction.atomic():
        reservations = Reservation.objects.bulk_create(
            Reservation(
                organization=org,
                gpu_model=model,
                site=site,
                gpu_count=1,
                tier="on_demand",
                starts_at=now,
                ends_at=ends,
                currency="usd",
                price_per_gpu_hour=Decimal("2.0"),
                total_amount=Decimal("2.00"),
                status=ReservationStatus.SCHEDULED,
                workload={"ports": [8888]},
            )
            for _ in range(count)
        )
        Allocation.objects.bulk_create(
            Allocation(reservation=r, gpu=g, node_id=g.node_id, period=Range(now, ends, "[)"))
            for r, g in zip(reservations, gpus, strict=True)
        )
        ReservationTransition.objects.bulk_create(
            ReservationTransition(
                reservation=r,
                from_status="",
                to_status="scheduled",
                cause="bench",
                actor_label="bench",
            )
            for r in reservations
        )
    return [r.pk for r in reservations]


def _cleanup(site: Site, tag: str) -> None:
    reservations = Reservation.objects.filter(site=site)
    Allocation.objects.filter(reservation__in=reservations).delete()
    reservations.delete()
    Organization.objects.filter(slug=f"bench-{tag}").delete()
    Node.objects.filter(site=site).delete()
    site.delete()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--worker-log", help="Keep the worker's info log in this file.")
    args = parser.parse_args()
    count = args.count

    call_command("migrate", verbosity=0)
    redis = Redis.from_url(settings.REDIS_URL)
    tag = uuid.uuid4().hex[:8]
    # A queue of the bench's own: nothing else in that Redis is touched or consumed.
    queue = f"bench-{tag}"
    app.conf.task_default_queue = queue
    site, model, gpus = _inventory(count, tag)
    worker = _worker(args.concurrency, args.worker_log, queue)
    try:
        # 1. Baseline: no-op tasks through the same worker and broker.
        key = f"bench:noop:{tag}"
        began = time.monotonic()
        for _ in range(count):
            app.send_task("marketplace.tasks.noop", args=[key])
        while int(redis.get(key) or 0) < count:
            time.sleep(0.01)
        noop_seconds = time.monotonic() - began

        # 2. Provisioning: all due now, one dispatcher run, until all are active.
        ids = _book(count, site, model, gpus, tag)
        began = time.monotonic()
        app.send_task("marketplace.tasks.reservations_dispatch_due")
        active = Reservation.objects.filter(pk__in=ids, status=ReservationStatus.ACTIVE)
        while active.count() < count:
            if time.monotonic() - began > 600:
                raise SystemExit(f"only {active.count()} of {count} active after 600 s")
            time.sleep(0.1)
        provision_seconds = time.monotonic() - began
        lags = sorted(
            (r.activated_at - r.starts_at).total_seconds()
            for r in Reservation.objects.filter(pk__in=ids).only("activated_at", "starts_at")
        )
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(timeout=30)
        _cleanup(site, tag)
        redis.delete(queue, f"bench:noop:{tag}")

    noop_rate = count / noop_seconds
    provision_rate = count / provision_seconds
    print(
        f"worker concurrency {args.concurrency}, {count} tasks / reservations, zero driver latency"
    )
    print(f"no-op tasks:   {noop_seconds:7.2f} s  {noop_rate:8.1f} tasks/s")
    print(f"provisioning:  {provision_seconds:7.2f} s  {provision_rate:8.1f} reservations/s")
    print(f"ratio:         {provision_rate / noop_rate:7.1%} of the no-op rate (goal >= 30%)")
    print(
        f"start lag (activated_at - starts_at): p50 {lags[len(lags) // 2]:.2f} s, "
        f"max {lags[-1]:.2f} s (plus up to the 5 s dispatch interval in production)"
    )


if __name__ == "__main__":
    main()
