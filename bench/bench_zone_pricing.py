"""Zone pricing benchmark (not a test): what pricing from zone power prices adds to a search.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_bench REDIS_URL=redis://127.0.0.1:6379/3 \
        .venv/bin/python bench/bench_zone_pricing.py   # or: make bench

It works in its own database, <name>_zone_pricing, created and migrated when missing. It
makes --sites sites (4 GPU models, 4 nodes of 8 GPUs each per site), each in its own price
zone with --days days of hourly prices before now and two days after (what a day-ahead
market has published), then times availability_search (the selector the API and the portal
call), alternating per round between the two states of the same data:

- zones: every site in its zone, so each search reads the zones' prices (one query) and
  prices every offer from them, with the energy floor;
- baseline: the same sites with no zone (the static price, as before zone prices existed).

It prints p50 and p99 per state and tier, their ratios, and the statements per search.
Everything it creates stays for the next run (rows are matched by slug).
"""

import argparse
import os
import statistics
import sys
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DEBUG", "1")


def _own_database() -> None:
    from urllib.parse import urlparse, urlunparse

    import psycopg

    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/switchyard_bench")
    parsed = urlparse(url)
    name = parsed.path.lstrip("/") + "_zone_pricing"
    with psycopg.connect(urlunparse(parsed._replace(path="/postgres")), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = urlunparse(parsed._replace(path=f"/{name}"))


_own_database()

import django  # noqa: E402

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.test.utils import CaptureQueriesContext  # noqa: E402
from django.utils import timezone  # noqa: E402

from inventory.models import Gpu, GpuModel, Node, PriceZone, Site, ZonePrice  # noqa: E402
from marketplace.models import PricingPolicy, RateCard  # noqa: E402
from marketplace.selectors.availability import AvailabilityQuery, availability_search  # noqa: E402
from marketplace.selectors.reference import reference_cache_clear  # noqa: E402

MODELS = [("b-h100", 700), ("b-a100", 400), ("b-l40s", 350), ("b-4090", 450)]


def _setup(sites: int, days: int) -> list[Site]:
    call_command("migrate", verbosity=0)
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    models = []
    for slug, tdp in MODELS:
        model, _ = GpuModel.objects.get_or_create(
            slug=slug,
            defaults={"name": slug, "vendor": "NVIDIA", "memory_gb": 80, "tdp_watts": tdp},
        )
        RateCard.objects.get_or_create(
            gpu_model=model, site=None, defaults={"price_per_gpu_hour": Decimal("2.0000")}
        )
        models.append(model)
    if not PricingPolicy.objects.exists():
        PricingPolicy.objects.create(
            discount_1w_pct=5, discount_1m_pct=12, discount_3m_pct=20, discount_1y_pct=35,
            interruptible_discount_pct=55, floor_multiplier=Decimal("0.35"),
            ceiling_multiplier=Decimal("1.5"), energy_pass_through_pct=Decimal("20"),
        )  # fmt: skip
    made = []
    for n in range(sites):
        zone, _ = PriceZone.objects.get_or_create(
            code=f"bench-zone-{n}", defaults={"name": f"Zone {n}", "currency": "usd"}
        )
        site, created = Site.objects.get_or_create(
            slug=f"bench-site-{n}",
            defaults=dict(name=f"Site {n}", region="us-central", country="US", grid_operator="X",
                          power_capacity_kw=20000, pue=Decimal("1.15"), cooling="air",
                          energy_price_per_mwh=Decimal("40"), renewable_share=Decimal("0.5"),
                          uplink_gbps=100, status="active"),
        )  # fmt: skip
        if created:
            for model in models:
                for k in range(4):
                    node = Node.objects.create(
                        site=site, gpu_model=model, hostname=f"bz{n}-{model.slug}-{k}",
                        cpu_cores=64, ram_gb=512, disk_gb=4000, nic_gbps=100,
                    )  # fmt: skip
                    Gpu.objects.bulk_create(
                        Gpu(node=node, index=i, serial=f"{node.hostname}-{i}") for i in range(8)
                    )
        ZonePrice.objects.filter(zone=zone).delete()
        first = now - timedelta(days=days)
        ZonePrice.objects.bulk_create(
            ZonePrice(
                zone=zone,
                starts_at=first + timedelta(hours=h),
                ends_at=first + timedelta(hours=h + 1),
                price_per_mwh=Decimal(20 + (h * 7 + n) % 60),
                currency="usd",
                source="bench",
                received_at=timezone.now(),
            )  # fmt: skip
            for h in range((days + 2) * 24)
        )
        made.append((site, zone))
    with connection.cursor() as cur:  # the rows were just replaced: fresh statistics
        cur.execute("VACUUM ANALYZE inventory_zoneprice")
    return made


def _time(tier: str, term: str, hours: int, rounds: int) -> tuple[list[float], int, int]:
    start = timezone.now() + timedelta(hours=1)
    times, statements, offers = [], 0, 0
    for _ in range(rounds):
        with CaptureQueriesContext(connection) as queries:
            began = time.perf_counter()
            found = availability_search(AvailabilityQuery(
                gpu_count=8, starts_at=start, ends_at=start + timedelta(hours=hours),
                tier=tier, term=term,
            ))  # fmt: skip
            times.append(time.perf_counter() - began)
        statements, offers = len(queries.captured_queries), len(found)
    return times, statements, offers


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sites", type=int, default=24)
    parser.add_argument("--days", type=int, default=31)
    parser.add_argument("--rounds", type=int, default=10, help="alternations of the two states")
    parser.add_argument("--searches", type=int, default=20, help="searches per state per round")
    args = parser.parse_args()
    made = _setup(args.sites, args.days)
    cases = [("on_demand", "none", 4), ("interruptible", "none", 4), ("reserved", "1w", 7 * 24)]
    results = {(state, c[0]): [] for state in ("zones", "baseline") for c in cases}
    meta = {}
    for _ in range(args.rounds):
        for state in ("zones", "baseline"):
            for site, zone in made:
                Site.objects.filter(pk=site.pk).update(
                    price_zone=zone if state == "zones" else None
                )
            reference_cache_clear()
            for tier, term, hours in cases:
                _time(tier, term, hours, 2)  # warm the caches and prepared statements
                times, statements, offers = _time(tier, term, hours, args.searches)
                results[(state, tier)] += times
                meta[(state, tier)] = (statements, offers)
    for site, zone in made:
        Site.objects.filter(pk=site.pk).update(price_zone=zone)
    print(f"availability_search, {args.sites} sites × 4 models ({len(made) * 4} offers), "
          f"{args.days} days of hourly prices per zone; {args.rounds} × {args.searches} "
          "searches per state and tier")  # fmt: skip
    for tier, _, _ in cases:
        z, b = results[("zones", tier)], results[("baseline", tier)]
        print(
            f"  {tier:13} zones p50 {_p(z, 50):6.1f} ms p99 {_p(z, 99):6.1f} ms "
            f"({meta[('zones', tier)][0]} statements, {meta[('zones', tier)][1]} offers) | "
            f"baseline p50 {_p(b, 50):6.1f} ms p99 {_p(b, 99):6.1f} ms "
            f"({meta[('baseline', tier)][0]} statements) | ratio p50 "
            f"{_p(z, 50) / _p(b, 50):.2f} p99 {_p(z, 99) / _p(b, 99):.2f}"
        )


if __name__ == "__main__":
    main()
