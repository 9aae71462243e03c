"""How many machines each tier needs for a fleet, from the per-core limits measured here.

    .venv/bin/python scripts/capacity_plan.py                       # a 1,000,000-GPU fleet
    .venv/bin/python scripts/capacity_plan.py --gpus 100000 --cores-per-machine 32

A model, not a measurement: it turns a fleet's rates (reservations, API reads, heartbeats,
telemetry, metering, webhooks) into work per second for each tier, divides by what one core
did in this repository's benchmarks on the 2-core machine (docs/benchmarks.md; the figures
and the run they come from are in LIMITS below and in docs/scaling.md), and rounds up to
machines of --cores-per-machine cores kept at --target-utilisation. Every rate and limit is a
flag, so a new benchmark figure or another fleet is one argument away.

Standard library only (runs without Django).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

# What one core did in the benchmarks (docs/scaling.md gives the run and load of each);
# "estimate" marks the few no benchmark here measures yet.
LIMITS = {
    # web (gunicorn sync workers, DEBUG off), per core.
    "web_reads_per_core": 450.0,  # the authenticated floor: 2.1-2.2 ms of gunicorn CPU
    "web_creates_per_core": 97.0,  # a create: 10.3 ms of gunicorn CPU
    "web_searches_per_core": 100.0,  # a search: ~10 ms of web CPU beside PostgreSQL's
    # a buffered heartbeat with 8 GPUs' telemetry: 3.11 ms of gunicorn CPU (the floor 1.36 ms
    # in the same bench_heartbeats.py run, 2026-12-06 17:08)
    "web_heartbeats_per_core": 320.0,
    # PostgreSQL, CPU milliseconds per operation.
    "pg_ms_per_create": 5.6,  # measured PostgreSQL CPU per create
    "pg_ms_per_heartbeat": 0.5,  # estimate: token and GPU reads, a share of a batched UPDATE
    "pg_ms_per_1k_samples": 59.4,  # batched COPY of telemetry: 16,826 samples/s on one core
    "pg_ms_per_search": 20.0,  # raw-SQL search p50 (a replica's CPU, not the primary's)
    "pg_ms_per_read": 0.5,  # estimate: a list page
    "pg_ms_per_metered_reservation": 0.05,  # estimate: accrual, set-based UPDATE … FROM a row
    # Redis executes commands on one thread: commands per second of its CPU.
    "redis_ops_per_core": 40000.0,  # 24 µs of Redis CPU per command (INFO, the shared server)
    # Celery workers, per core.
    "provisioning_tasks_per_core": 100.0,  # provisioning benchmark, -c 4 on 2 cores, quiet
    "billing_reservations_per_core_second": 20000.0,  # estimate: metering rows per core-second
    "webhook_deliveries_per_core": 200.0,  # estimate: signing and one HTTP POST (threads)
    "telemetry_samples_per_core": 16826.0,  # telemetry flush, batched COPY
}


@dataclass(frozen=True)
class Tier:
    name: str
    load: float
    unit: str
    per_core: float
    how: str
    one_writer: bool = False  # one instance takes all of it (a primary): it cannot be split

    def cores(self) -> float:
        return self.load / self.per_core


def fleet_rates(args: argparse.Namespace) -> dict[str, float]:
    nodes = args.gpus / args.gpus_per_node
    running = args.gpus * args.utilisation / args.gpus_per_reservation
    creates = running / (args.reservation_hours * 3600)
    return {
        "nodes": nodes,
        "running_reservations": running,
        "creates_per_s": creates,
        "searches_per_s": creates * args.searches_per_create,
        "reads_per_s": creates * args.reads_per_create,
        "heartbeats_per_s": nodes / args.heartbeat_seconds,
        "samples_per_s": args.gpus / args.heartbeat_seconds,
        "provision_tasks_per_s": creates * 2,  # a provision at the start, a release at the end
        "metered_per_s": running / args.metering_seconds,
        "webhooks_per_s": creates * args.events_per_reservation * args.webhook_share,
    }


def tiers(args: argparse.Namespace, limits: dict[str, float]) -> list[Tier]:
    r = fleet_rates(args)
    web_core_seconds = (
        r["creates_per_s"] / limits["web_creates_per_core"]
        + r["searches_per_s"] / limits["web_searches_per_core"]
        + r["reads_per_s"] / limits["web_reads_per_core"]
        + r["heartbeats_per_s"] / limits["web_heartbeats_per_core"]
    )
    primary_ms = (
        r["creates_per_s"] * limits["pg_ms_per_create"]
        + r["heartbeats_per_s"] * limits["pg_ms_per_heartbeat"]
        + r["samples_per_s"] / 1000 * limits["pg_ms_per_1k_samples"]
        + (r["creates_per_s"] + r["heartbeats_per_s"]) * limits["pg_ms_per_read"]
        + r["metered_per_s"] * limits["pg_ms_per_metered_reservation"]
    )
    replica_ms = (
        r["searches_per_s"] * limits["pg_ms_per_search"]
        + r["reads_per_s"] * limits["pg_ms_per_read"]
    )
    # Per API request: a rate-limit INCR+EXPIRE; per task: a push, a fetch and an ack; per
    # heartbeat: its buffer transaction (MULTI, HSET of its time, RPUSH of its samples, EXEC)
    # and its token's last use; per create: the cache reads of the reference rows.
    tasks = r["provision_tasks_per_s"] + r["webhooks_per_s"] + r["heartbeats_per_s"] / 10
    redis_ops = (
        2 * (r["creates_per_s"] + r["searches_per_s"] + r["reads_per_s"] + r["heartbeats_per_s"])
        + 3 * tasks
        + 5 * r["heartbeats_per_s"]
    )
    return [
        Tier("web (gunicorn)", web_core_seconds, "core-seconds/s", 1.0,
             "more gunicorn hosts behind a load balancer; stateless"),
        Tier("PostgreSQL primary", primary_ms / 1000, "core-seconds/s", 1.0,
             "one primary (Patroni); past its cores: partition allocations by site", True),
        Tier("PostgreSQL replicas", replica_ms / 1000, "core-seconds/s", 1.0,
             "streaming replicas behind DATABASE_REPLICA_URL (PgBouncer per host)"),
        Tier("Redis", redis_ops, "commands/s", limits["redis_ops_per_core"],
             "one primary with Sentinel; split broker and cache (CELERY_BROKER_URL, CACHE_URL)",
             True),
        Tier("Celery provisioning", r["provision_tasks_per_s"], "tasks/s",
             limits["provisioning_tasks_per_core"], "workers on -Q provisioning"),
        Tier("Celery billing", r["metered_per_s"], "reservations metered/s",
             limits["billing_reservations_per_core_second"], "workers on -Q billing"),
        Tier("Celery telemetry", r["samples_per_s"], "samples/s",
             limits["telemetry_samples_per_core"], "workers on -Q telemetry"),
        Tier("Celery webhooks", r["webhooks_per_s"], "deliveries/s",
             limits["webhook_deliveries_per_core"], "workers on -Q webhooks (threads)"),
    ]  # fmt: skip


def machines(cores: float, args: argparse.Namespace) -> int:
    usable = args.cores_per_machine * args.target_utilisation
    return max(1, math.ceil(cores / usable))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    fleet = parser.add_argument_group("the fleet")
    fleet.add_argument("--gpus", type=int, default=1_000_000)
    fleet.add_argument("--gpus-per-node", type=int, default=8)
    fleet.add_argument("--utilisation", type=float, default=0.7, help="share of GPUs booked")
    fleet.add_argument("--gpus-per-reservation", type=float, default=4.0)
    fleet.add_argument("--reservation-hours", type=float, default=12.0)
    fleet.add_argument("--searches-per-create", type=float, default=20.0)
    fleet.add_argument("--reads-per-create", type=float, default=50.0,
                       help="lists, details, usage: API reads per reservation made")  # fmt: skip
    fleet.add_argument("--heartbeat-seconds", type=float, default=30.0)
    fleet.add_argument("--metering-seconds", type=float, default=60.0)
    fleet.add_argument("--events-per-reservation", type=float, default=5.0)
    fleet.add_argument("--webhook-share", type=float, default=0.3,
                       help="share of events with a customer endpoint to send to")  # fmt: skip
    machine = parser.add_argument_group("the machines")
    machine.add_argument("--cores-per-machine", type=int, default=16)
    machine.add_argument("--target-utilisation", type=float, default=0.5,
                         help="share of each machine's cores planned for (headroom for peaks)")  # fmt: skip
    limits = parser.add_argument_group("measured per-core limits (docs/scaling.md)")
    for name, value in LIMITS.items():
        limits.add_argument(f"--{name.replace('_', '-')}", type=float, default=value)
    args = parser.parse_args(argv)
    positive = ["gpus", "gpus_per_node", "gpus_per_reservation", "reservation_hours",
                "heartbeat_seconds", "metering_seconds", "cores_per_machine", *LIMITS]  # fmt: skip
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    for name in ("utilisation", "target_utilisation", "webhook_share"):
        if not 0 < getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be in (0, 1]")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    limits = {name: getattr(args, name) for name in LIMITS}
    rates = fleet_rates(args)
    print(
        f"Fleet: {args.gpus:,} GPUs on {rates['nodes']:,.0f} nodes; "
        f"{rates['running_reservations']:,.0f} running reservations "
        f"({args.utilisation:.0%} booked, {args.gpus_per_reservation:g} GPUs for "
        f"{args.reservation_hours:g} h each)."
    )
    print(
        f"Rates: {rates['creates_per_s']:,.1f} reservations/s, {rates['searches_per_s']:,.0f} "
        f"searches/s, {rates['reads_per_s']:,.0f} API reads/s, "
        f"{rates['heartbeats_per_s']:,.0f} heartbeats/s, {rates['samples_per_s']:,.0f} "
        f"telemetry samples/s, {rates['metered_per_s']:,.0f} reservations metered/s, "
        f"{rates['webhooks_per_s']:,.1f} webhook deliveries/s."
    )
    print(
        f"Machines of {args.cores_per_machine} cores at {args.target_utilisation:.0%}:\n"
        f"{'tier':<22} {'load':>14} {'unit':<24} {'cores':>8} {'machines':>8}  how it scales"
    )
    total = 0
    for tier in tiers(args, limits):
        count = machines(tier.cores(), args)
        how, shown = tier.how, str(count)
        if tier.one_writer and count > 1:
            # One instance cannot be spread over machines: a larger one, or the work split.
            needed = math.ceil(tier.cores() / args.target_utilisation)
            how, shown, count = f"one machine of {needed}+ cores, or split; {how}", "1*", 1
        total += count
        print(
            f"{tier.name:<22} {tier.load:>14,.1f} {tier.unit:<24} {tier.cores():>8.1f} "
            f"{shown:>8}  {how}"
        )
    print(f"{'total':<22} {'':>14} {'':<24} {'':>8} {total:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
