"""Billing benchmark (not a test): the metering run over 10,000 and 100,000 running reservations
(10 per organisation) — wall time and SQL statements per run, against a bare UPDATE … FROM
over the same rows, and the number of Stripe API calls.

    createdb -h 127.0.0.1 -U postgres sy_bill_bench
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_bill_bench REDIS_URL=redis://127.0.0.1:6379/5 \
        .venv/bin/python bench/bench_billing.py [--sizes 10000,100000] [--per-org 10]

For each size: half the organisations prepaid (funded well above their recharge threshold),
half postpaid; every reservation an active on-demand GPU (each on its own GPU, with its
allocation), activated 50 minutes before the hour; 1 node in 10 had an outage. Runs:
1. the first run, which opens an accrual for every reservation (once in its life) and books
   its 50+ minutes (timed at the last minute of the booking spread, where all are due);
2. a steady run a minute later (accrue only: no ledger line);
3. the run just after the hour, which books the lines of the reservations whose
   id % BILLING_USAGE_BOOK_SPREAD_MINUTES is 0, as each of the hour's first `spread` runs books
   its share (the heaviest steady-state run);
4. the bare statement: `UPDATE billing_usageaccrual … FROM marketplace_reservation` setting
   one column on the same rows, the floor a set-based run cannot beat;
5. the postpaid hourly aggregation and its meter events through the outbox, with the stripe
   library's HTTP client replaced by a counting one (nothing leaves the machine).
Then the funding gate's read of one organisation's money position, which every booking makes
under the organisation's account lock, for an organisation with --position-holds reservations
booked ahead (a hold each) and 20 running ones (an accrual and a hold each): the gate's
statement, the same figures summed from every hold (as the gate read them before billing
migration 0009), and as the baseline a bare read of the organisation's balance row.
Each size runs in one transaction that is rolled back at the end (tables ANALYZEd first): the
database is left as it was (it only needs the schema, which the script migrates).
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
from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402
from psycopg.types.range import Range  # noqa: E402

from billing.models import (  # noqa: E402
    BillingAccount,
    BillingMode,
    Hold,
    LedgerEntry,
    LedgerKind,
    UsageAccrual,
)
from billing.services.holds import POSITION_FROM_EVERY_HOLD_SQL, money_position  # noqa: E402
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


class StatementCounter:
    """Counts the SQL statements sent through Django's connection (execute_wrapper)."""

    def __init__(self):
        self.count = 0

    def __call__(self, execute, sql, params, many, context):
        self.count += 1
        return execute(sql, params, many, context)


def timed(run):
    counter = StatementCounter()
    with connection.execute_wrapper(counter):
        t = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - t
    return elapsed, counter.count, result


def site_and_model() -> tuple[Site, GpuModel]:
    """The benchmark's one site and GPU model (each measurement's transaction makes its own)."""
    site, _ = Site.objects.get_or_create(slug="bench-billing", defaults={
        "name": "Bench", "region": "us", "country": "US", "grid_operator": "ERCOT",
        "power_capacity_kw": Decimal("1000"), "pue": Decimal("1.1"), "cooling": "air",
        "energy_price_per_mwh": Decimal("40"), "renewable_share": Decimal("0.5"),
        "uplink_gbps": 100, "status": "active"})  # fmt: skip
    model, _ = GpuModel.objects.get_or_create(slug="bench-gpu", defaults={
        "name": "Bench GPU", "vendor": "NVIDIA", "memory_gb": 80, "tdp_watts": 700,
        "interconnect": "NVLink"})  # fmt: skip
    return site, model


def build(orgs: int, per_org: int, now):
    site, model = site_and_model()
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
    start = now - timedelta(minutes=50)  # `now` is 10 s past an hour
    reservations = Reservation.objects.bulk_create(
        Reservation(organization=organizations[i // per_org], gpu_model=model, site=site,
                    gpu_count=1, tier="on_demand", starts_at=start, ends_at=start + timedelta(hours=8),
                    currency="usd", price_per_gpu_hour=Decimal("2.0000"),
                    total_amount=Decimal("16.00"), status="active", activated_at=start)
        for i in range(total)
    )  # fmt: skip
    # Setup only: the allocations' statement triggers (each GPU's busy multirange, which
    # metering does not read) are skipped for the bulk insert; the metering runs are not.
    with connection.cursor() as cur:
        cur.execute("SET LOCAL session_replication_role = replica")
    Allocation.objects.bulk_create(
        [Allocation(reservation=r, gpu=g, node_id=g.node_id, period=Range(r.starts_at, r.ends_at, "[)"))
         for r, g in zip(reservations, gpus, strict=True)],
        batch_size=5000,  # PostgreSQL takes at most 65,535 parameters in one statement
    )  # fmt: skip
    with connection.cursor() as cur:
        cur.execute("SET LOCAL session_replication_role = DEFAULT")
    Outage.objects.bulk_create(
        Outage(node=n, started_at=start + timedelta(minutes=5), ended_at=start + timedelta(minutes=12),
               cause=OutageCause.HARDWARE_FAILURE)
        for n in nodes[::10]
    )  # fmt: skip


BARE_UPDATE_SQL = """
UPDATE billing_usageaccrual a SET accrued_until = %s
FROM marketplace_reservation r WHERE r.id = a.reservation_id
"""


def measure(orgs: int, per_org: int, counter: "CountingHTTPClient", now) -> dict:
    figures: dict = {}
    calls_before = len(counter.calls)
    try:
        with transaction.atomic():
            t = time.perf_counter()
            build(orgs, per_org, now)
            with connection.cursor() as cur:
                cur.execute("ANALYZE")
            figures["setup_s"] = time.perf_counter() - t

            # The hour's lines are spread over its first `spread` minutes (id % spread): the
            # first run is timed at the last of them, where every reservation's is due.
            spread = settings.BILLING_USAGE_BOOK_SPREAD_MINUTES
            first_at = now + timedelta(minutes=spread - 1)
            figures["first"] = timed(lambda: usage_meter_run(now=first_at))
            hour = now.replace(minute=0, second=0) + timedelta(hours=1, seconds=10)

            def bare():
                with connection.cursor() as cur:
                    cur.execute(BARE_UPDATE_SQL, [first_at])
                    return cur.rowcount

            # On the rows as the first run left them, as the steady run finds them.
            figures["bare"] = timed(bare)
            figures["steady"] = timed(lambda: usage_meter_run(now=first_at + timedelta(minutes=1)))
            # Minute 0 of the next hour: books the reservations whose id % spread is 0, as each
            # of the hour's first `spread` runs books its share (about 1/spread of them).
            figures["hourly"] = timed(lambda: usage_meter_run(now=hour))
            figures["lines"] = LedgerEntry.objects.filter(kind=LedgerKind.USAGE).count()

            calls_after_metering = len(counter.calls)
            t = time.perf_counter()
            report_at = hour + timedelta(hours=1)
            figures["aggregates"] = usage_report_postpaid_run(now=report_at)
            figures["sent"] = 0
            while sent := outbox_flush(limit=500):
                figures["sent"] += sent
            figures["report_s"] = time.perf_counter() - t
            figures["stripe_calls_metering"] = calls_after_metering - calls_before
            figures["stripe_calls_total"] = len(counter.calls) - calls_before
            raise Rollback
    except Rollback:
        pass
    return figures


def median_ms(run, times: int) -> float:
    samples = []
    for _ in range(times):
        t = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t) * 1000)
    return sorted(samples)[times // 2]


def measure_position(open_holds: int, now) -> dict:
    """The gate's read for one organisation with `open_holds` bookings ahead, in a rolled-back
    transaction."""
    figures: dict = {}
    try:
        with transaction.atomic():
            org = Organization.objects.create(name="Bench position", slug="bench-position")
            BillingAccount.objects.create(organization=org, currency="usd")
            LedgerEntry.objects.create(organization=org, kind=LedgerKind.CREDIT, currency="usd",
                                       amount_minor=10**9, idempotency_key="bench:position")  # fmt: skip
            site, model = site_and_model()
            running = 20
            reservations = Reservation.objects.bulk_create(
                Reservation(organization=org, gpu_model=model, site=site, gpu_count=1,
                            tier="on_demand", starts_at=now + timedelta(days=1 + i % 60),
                            ends_at=now + timedelta(days=1 + i % 60, hours=8), currency="usd",
                            price_per_gpu_hour=Decimal("2.0000"), total_amount=Decimal("16.00"),
                            status="active" if i < running else "pending")
                for i in range(open_holds + running)
            )  # fmt: skip
            Hold.objects.bulk_create(
                (Hold(organization=org, reservation=r, amount_minor=1600, currency="usd",
                      idempotency_key=f"bench:position:{r.pk}") for r in reservations),
                batch_size=5000,
            )  # fmt: skip
            UsageAccrual.objects.bulk_create(
                UsageAccrual(reservation=r, organization=org, currency="usd",
                             price_per_gpu_hour=r.price_per_gpu_hour, accrued_until=now,
                             booked_until=now, accrued_minor=400 * (i % 7))
                for i, r in enumerate(reservations[:running])
            )  # fmt: skip
            with connection.cursor() as cur:
                cur.execute("ANALYZE billing_hold, billing_openholdsdelta, billing_usageaccrual")

            def every_hold():
                with connection.cursor() as cur:
                    cur.execute(POSITION_FROM_EVERY_HOLD_SQL, {"org": org.pk})
                    return tuple(int(v) for v in cur.fetchone())

            def bare():
                with connection.cursor() as cur:
                    cur.execute(
                        "SELECT amount_minor FROM billing_balance WHERE organization_id = %s",
                        [org.pk],
                    )
                    return cur.fetchone()

            assert tuple(money_position(organization_id=org.pk)) == every_hold()
            figures["gate"] = median_ms(lambda: money_position(organization_id=org.pk), 200)
            figures["every_hold"] = median_ms(every_hold, 40)
            figures["bare"] = median_ms(bare, 200)
            raise Rollback
    except Rollback:
        pass
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000", help="reservations, comma-separated")
    parser.add_argument("--per-org", type=int, default=10)
    parser.add_argument("--position-holds", type=int, default=13000)
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    settings.STRIPE_SECRET_KEY = settings.STRIPE_SECRET_KEY or "sk_test_bench"
    settings.STRIPE_API_BASE = ""
    counter = CountingHTTPClient()
    set_gateway_override(StripeGateway(build_client(http_client=counter)))
    # 10 s past an hour: the first run sees 50 minutes of usage, the hourly run the next hour.
    now = timezone.now().replace(minute=0, second=10, microsecond=0)
    results = {}
    try:
        for total in [int(size) for size in args.sizes.split(",")]:
            results[total] = measure(total // args.per_org, args.per_org, counter, now)
        position = measure_position(args.position_holds, now)
    finally:
        set_gateway_override(None)

    interval = 60.0
    for total, f in results.items():
        orgs = total // args.per_org
        print(f"{total} reservations in {orgs} organisations "
              f"({orgs // 2} prepaid, {orgs - orgs // 2} postpaid); setup {f['setup_s']:.1f} s")  # fmt: skip
        for key, label in (("first", "first run (opens, books)"),
                           ("steady", "steady run (+1 min, accrue)"),
                           ("hourly", "run after the hour (books 1/spread)"),
                           ("bare", "bare UPDATE … FROM, same rows")):  # fmt: skip
            seconds, statements, _result = f[key]
            print(f"  {label:36} {seconds:7.2f} s  {statements:3d} SQL statements  "
                  f"{seconds / f['bare'][0]:5.1f} × bare  {seconds / interval:6.1%} of the 60 s interval")  # fmt: skip
        print(f"  usage lines written: {f['lines']} (the run after the hour: those of id % "
              f"{settings.BILLING_USAGE_BOOK_SPREAD_MINUTES} = 0)")  # fmt: skip
        print(f"  postpaid report + outbox send  {f['report_s']:7.2f} s, {f['aggregates']} hourly "
              f"aggregates, {f['sent']} sent; Stripe API calls: {f['stripe_calls_total']} "
              f"({f['stripe_calls_metering']} during metering) = "
              f"{f['stripe_calls_total'] / (orgs - orgs // 2):.2f} per postpaid organisation and hour")  # fmt: skip
    print(f"money position of one organisation with {args.position_holds} open holds ahead and "
          f"20 running reservations (median): the gate's read {position['gate']:.3f} ms; "
          f"summed from every hold {position['every_hold']:.2f} ms; bare balance row "
          f"{position['bare']:.3f} ms (gate {position['gate'] / position['bare']:.1f} × bare)")  # fmt: skip
    sizes = list(results)
    if len(sizes) > 1:
        print("SQL statements per run by size: " + ", ".join(
            f"{name} {'/'.join(str(results[t][name][1]) for t in sizes)}"
            for name in ("first", "steady", "hourly")
        ))  # fmt: skip


if __name__ == "__main__":
    main()
