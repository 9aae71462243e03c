"""Billing benchmark (not a test): a metering and billing run over 10,000 reservations in
1,000 organisations — wall time and the number of Stripe API calls.

    createdb -h 127.0.0.1 -U postgres sy_bill_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_bill_bench REDIS_URL=redis://127.0.0.1:6379/5 \
        .venv/bin/python bench/bench_billing.py [--orgs 1000] [--per-org 10]

Half the organisations are prepaid (funded well above their recharge threshold), half postpaid.
Each has `--per-org` active on-demand reservations of one GPU (each on its own GPU, with its
allocation), 1 in 10 nodes has had an outage. The run:
1. meters every reservation (usage_meter_run: ledger lines, funding states),
2. meters again a minute later (the steady-state, incremental run),
3. aggregates the completed hour of postpaid usage and sends the meter events through the
   outbox, with the stripe library's HTTP client replaced by a counting one (nothing leaves
   the machine; the requests are exactly those that would go to api.stripe.com).
Everything runs in one transaction that is rolled back at the end: the database is left as
it was (it only needs the schema, which the script migrates).
"""

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DEBUG", "1")

import django  # noqa: E402

django.setup()

import stripe  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402
from psycopg.types.range import Range  # noqa: E402

from billing.models import BillingAccount, BillingMode, LedgerEntry, LedgerKind  # noqa: E402
from billing.services.metering import usage_meter_run  # noqa: E402
from billing.services.postpaid import usage_report_postpaid_run  # noqa: E402
from billing.stripe_gateway import StripeGateway, build_client, set_gateway_override  # noqa: E402
from billing.tasks import outbox_flush  # noqa: E402
from inventory.models import Gpu, GpuModel, Node, Outage, OutageCause, Site  # noqa: E402
from marketplace.models import Allocation, Organization, Reservation  # noqa: E402


class CountingHTTPClient(stripe.HTTPClient):
    name = "counting"

    def __init__(self):
        super().__init__()
        self.calls = []

    def request(self, method, url, headers, post_data=None, *, _usage=None):
        self.calls.append((method, url))
        return json.dumps({"object": "billing.meter_event", "identifier": "x"}), 200, {}

    def close(self):
        pass


class Rollback(Exception):
    pass


def build(orgs: int, per_org: int, now):
    site = Site.objects.create(slug="bench-billing", name="Bench", region="us", country="US",
                               grid_operator="ERCOT", power_capacity_kw=Decimal("1000"),
                               pue=Decimal("1.1"), cooling="air", energy_price_per_mwh=Decimal("40"),
                               renewable_share=Decimal("0.5"), uplink_gbps=100, status="active")  # fmt: skip
    model, _ = GpuModel.objects.get_or_create(slug="bench-gpu", defaults={
        "name": "Bench GPU", "vendor": "NVIDIA", "memory_gb": 80, "tdp_watts": 700,
        "interconnect": "NVLink"})  # fmt: skip
    total = orgs * per_org
    nodes = Node.objects.bulk_create(
        Node(site=site, gpu_model=model, hostname=f"bench-{i:05d}", cpu_model="x", cpu_cores=64,
             ram_gb=512, disk_gb=1000, nic_gbps=100) for i in range((total + 7) // 8)
    )  # fmt: skip
    gpus = Gpu.objects.bulk_create(
        Gpu(node=n, index=i, serial=f"{n.hostname}-{i}") for n in nodes for i in range(8)
    )[:total]
    organizations = Organization.objects.bulk_create(
        Organization(name=f"Bench {i}", slug=f"bench-{i}") for i in range(orgs)
    )
    BillingAccount.objects.bulk_create(
        BillingAccount(organization=o, currency="usd", stripe_customer_id=f"cus_bench{i}",
                       default_payment_method_id=f"pm_bench{i}",
                       mode=BillingMode.PREPAID if i % 2 == 0 else BillingMode.POSTPAID)
        for i, o in enumerate(organizations)
    )  # fmt: skip
    LedgerEntry.objects.bulk_create(
        LedgerEntry(organization=o, kind=LedgerKind.CREDIT, amount_minor=100000, currency="usd",
                    idempotency_key=f"bench:{o.pk}")
        for i, o in enumerate(organizations) if i % 2 == 0
    )  # fmt: skip
    start = now - timedelta(minutes=50)
    reservations = Reservation.objects.bulk_create(
        Reservation(organization=organizations[i // per_org], gpu_model=model, site=site,
                    gpu_count=1, tier="on_demand", starts_at=start, ends_at=start + timedelta(hours=8),
                    currency="usd", price_per_gpu_hour=Decimal("2.0000"),
                    total_amount=Decimal("16.00"), status="active", activated_at=start)
        for i in range(total)
    )  # fmt: skip
    Allocation.objects.bulk_create(
        [Allocation(reservation=r, gpu=g, node_id=g.node_id, period=Range(r.starts_at, r.ends_at, "[)"))
         for r, g in zip(reservations, gpus, strict=True)],
        batch_size=5000,  # PostgreSQL takes at most 65,535 parameters in one statement
    )  # fmt: skip
    Outage.objects.bulk_create(
        Outage(node=n, started_at=start + timedelta(minutes=5), ended_at=start + timedelta(minutes=12),
               cause=OutageCause.HARDWARE_FAILURE)
        for n in nodes[::10]
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--orgs", type=int, default=1000)
    parser.add_argument("--per-org", type=int, default=10)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    settings.STRIPE_SECRET_KEY = settings.STRIPE_SECRET_KEY or "sk_test_bench"
    settings.STRIPE_API_BASE = ""
    counter = CountingHTTPClient()
    set_gateway_override(StripeGateway(build_client(http_client=counter)))
    now = timezone.now().replace(microsecond=0)
    figures = {}
    try:
        with transaction.atomic():
            t = time.perf_counter()
            build(args.orgs, args.per_org, now)
            figures["setup_s"] = time.perf_counter() - t

            t = time.perf_counter()
            figures["lines_first_run"] = usage_meter_run(now=now)
            figures["meter_first_s"] = time.perf_counter() - t
            calls_after_metering = len(counter.calls)

            t = time.perf_counter()
            figures["lines_second_run"] = usage_meter_run(now=now + timedelta(minutes=1))
            figures["meter_second_s"] = time.perf_counter() - t

            next_hour = now.replace(minute=0, second=0) + timedelta(hours=1, minutes=1)
            t = time.perf_counter()
            figures["aggregates"] = usage_report_postpaid_run(now=next_hour)
            figures["sent"] = 0
            while sent := outbox_flush(limit=500):
                figures["sent"] += sent
            figures["report_s"] = time.perf_counter() - t
            figures["stripe_calls_metering"] = calls_after_metering
            figures["stripe_calls_total"] = len(counter.calls)
            raise Rollback
    except Rollback:
        pass
    finally:
        set_gateway_override(None)

    total = args.orgs * args.per_org
    print(f"{total} reservations in {args.orgs} organisations "
          f"({args.orgs // 2} prepaid, {args.orgs - args.orgs // 2} postpaid)")  # fmt: skip
    print(f"setup (bulk inserts):              {figures['setup_s']:7.1f} s")
    print(f"metering run 1 (50 min of usage):  {figures['meter_first_s']:7.1f} s, "
          f"{figures['lines_first_run']} ledger lines, "
          f"{total / figures['meter_first_s']:.0f} reservations/s")  # fmt: skip
    print(f"metering run 2 (+1 min):           {figures['meter_second_s']:7.1f} s, "
          f"{figures['lines_second_run']} ledger lines")  # fmt: skip
    print(f"postpaid report + outbox send:     {figures['report_s']:7.1f} s, "
          f"{figures['aggregates']} hourly aggregates, {figures['sent']} sent")  # fmt: skip
    print(f"Stripe API calls: {figures['stripe_calls_total']} in total "
          f"({figures['stripe_calls_metering']} during metering) for {total} reservations "
          f"= {figures['stripe_calls_total'] / args.orgs:.2f} per organisation, "
          f"{figures['stripe_calls_total'] / total:.2f} per reservation")  # fmt: skip


if __name__ == "__main__":
    main()
