"""Marketplace benchmark (not a test): availability search and reservation throughput at scale.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_bench REDIS_URL=redis://127.0.0.1:6379/3 \
        .venv/bin/python bench/bench_marketplace.py   # or: make bench

It works in its own database, <name>_marketplace (here sy_bench_marketplace), created when
missing; the first run generates the data (1 to 4 minutes here), later runs reuse it.

Generates (once; later runs reuse it) 100,000 GPUs on 12,500 nodes at 12 sites and 1,000,000
allocations: per node ten whole-node bookings of 1-7 days, one per 8-day slot, each node's
slots at its own random offset, starting 56 days ago - so about two thirds are history and a
third (~350,000) live, booked up to ~24 days ahead at about half the capacity. (The first
generator started every node's bookings on the same day and kept half of them live: every
window a day after a slot start was full fleet-wide, which no real fleet looks like. Data
from it is dropped and generated again.) Then, in one run:
- availability search latency p50/p99 through the HTTP API (gunicorn, API-key auth) and the
  same searches as raw SQL (the selector's own query text, prepared, straight through psycopg);
- reservation-create throughput through the API with --clients concurrent clients naming the
  site (as an integrator does after a search), then --global-reservations more without a
  site (the service searches every site for the cheapest), beside a raw-SQL reservation
  transaction (one reservation row plus its allocations, nodes locked in id order, through
  the same triggers) with as many clients;
- the floor: the cheapest authenticated endpoint (GET /api/v1/gpu-models) with the same
  server and clients, what the stack costs before any marketplace work;
- the placement read every create naming its site makes (one site's nodes of one model,
  their free GPUs for the window summed and the best-fit nodes chosen) as raw SQL with as
  many clients;
- the ceiling those three leave: a create through the API does at least a floor request, a
  placement read and a reservation transaction on the same cores, so a create path on this
  stack and machine can hardly beat 1 / (1/floor + 1/read + 1/transaction) (an estimate:
  the raw transaction books 8 GPUs, the API's creates 3.2 on average);
- a check that no two live allocations overlap.
Everything the run creates is removed at the end, so the generated data stays as it was.
It refuses to run against a database that holds anything but its own generated data.

The latest figures, the machine they were measured on, and why 300 reservations/s through
the API is out of reach on two cores are in docs/benchmarks.md.
"""

import argparse
import http.client
import json
import os
import random
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlencode, urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("DEBUG", "1")


def _own_database() -> None:
    """Work in a sibling database "<name>_marketplace" (created when missing).

    `make bench` gives every script the same database; 1M generated allocations must not land
    in the others' way, and keeping them in their own database lets later runs reuse them.
    """
    from urllib.parse import urlparse, urlunparse

    import psycopg

    url = os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/switchyard_bench")
    parsed = urlparse(url)
    name = parsed.path.lstrip("/")
    if not name.endswith("_marketplace"):
        name += "_marketplace"
    admin_url = urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if exists and _generated_by_older_version(urlunparse(parsed._replace(path=f"/{name}"))):
            print(f"{name} holds data from an older generator; generating it again.", flush=True)
            conn.execute(f'DROP DATABASE "{name}"')
            exists = None
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    os.environ["DATABASE_URL"] = urlunparse(parsed._replace(path=f"/{name}"))


def _generated_by_older_version(url: str) -> bool:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        try:
            row = conn.execute(
                "SELECT name FROM marketplace_organization WHERE slug = 'bench-history'"
            ).fetchone()
        except psycopg.errors.UndefinedTable:
            return False
    return row is not None and row[0] != "Bench history v3"  # BENCH_ORG_NAME, defined below


_own_database()

import django  # noqa: E402

django.setup()

import psycopg  # noqa: E402
import requests  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from inventory.models import Gpu, GpuModel, Node, Site, SiteStatus  # noqa: E402
from marketplace.models import (  # noqa: E402
    Organization,
    PricingPolicy,
    RateCard,
    Reservation,
)
from marketplace.selectors import availability  # noqa: E402
from marketplace.services.api_keys import api_key_create  # noqa: E402
from marketplace.services.pricing import DEFAULT_POLICY  # noqa: E402

SITES, NODES, GPUS_PER_NODE, SLOTS_PER_NODE = 12, 12_500, 8, 10  # 10 × 8 × 12,500 = 1M
MODELS = [
    ("h100-sxm-80gb", "NVIDIA H100 SXM 80GB", "NVIDIA", 80, "2.2000"),
    ("h200-sxm-141gb", "NVIDIA H200 SXM 141GB", "NVIDIA", 141, "3.1000"),
    ("a100-sxm-80gb", "NVIDIA A100 SXM 80GB", "NVIDIA", 80, "1.4000"),
    ("l40s-48gb", "NVIDIA L40S 48GB", "NVIDIA", 48, "0.8500"),
    ("rtx-4090-24gb", "NVIDIA GeForce RTX 4090 24GB", "NVIDIA", 24, "0.3500"),
    ("mi300x-192gb", "AMD Instinct MI300X 192GB", "AMD", 192, "2.4000"),
]
REGIONS = ["us-central", "us-west", "ca-east", "eu-north"]
BENCH_ORG, API_ORG, RAW_ORG = "bench-history", "bench-api", "bench-raw"
# The generator's version is the history organisation's name: data from an older generator
# is dropped and generated again (v1 booked all nodes in step with half the allocations live;
# v2 left the GPU rows scattered by the busy backfill).
BENCH_ORG_NAME = "Bench history v3"
HISTORY_DAYS = 56

OVERLAP_SQL = """
SELECT count(*) FROM marketplace_allocation a
WHERE a.is_live AND EXISTS (
    SELECT 1 FROM marketplace_allocation b
    WHERE b.is_live AND b.gpu_id = a.gpu_id AND b.id <> a.id AND b.period && a.period)
"""


def say(msg: str) -> None:
    print(msg, flush=True)


# --- data ----------------------------------------------------------------------------------


def ensure_data() -> None:
    if Node.objects.filter(hostname__startswith="bench-").count() == NODES:
        say("Reusing the generated inventory.")
        return
    if Node.objects.exists() or Reservation.objects.exists():
        sys.exit("This database holds other data; give the benchmark an empty database.")
    started = time.monotonic()
    models = []
    for slug, name, vendor, memory, price in MODELS:
        model, _ = GpuModel.objects.get_or_create(
            slug=slug,
            defaults={"name": name, "vendor": vendor, "memory_gb": memory, "tdp_watts": 700},
        )
        RateCard.objects.get_or_create(
            gpu_model=model, site=None, defaults={"price_per_gpu_hour": Decimal(price)}
        )
        models.append(model)
    if not PricingPolicy.objects.exists():
        PricingPolicy.objects.create(**DEFAULT_POLICY, note="bench")
    sites = [
        Site.objects.create(
            slug=f"bench-{i:02d}",
            name=f"Bench site {i}",
            region=REGIONS[i % len(REGIONS)],
            country="US",
            grid_operator="ERCOT",
            power_capacity_kw=Decimal("60000"),
            pue=Decimal("1.10"),
            cooling="immersion",
            energy_price_per_mwh=Decimal("35"),
            renewable_share=Decimal("0.5"),
            uplink_gbps=400,
            status=SiteStatus.ACTIVE,
        )
        for i in range(SITES)
    ]
    Node.objects.bulk_create(
        (
            Node(
                site=sites[i % SITES],
                gpu_model=models[(i // SITES) % len(models)],
                hostname=f"bench-{i:05d}",
                cpu_cores=96,
                ram_gb=1024,
                disk_gb=15360,
                nic_gbps=400,
            )
            for i in range(NODES)
        ),
        batch_size=2000,
    )
    node_ids = list(
        Node.objects.filter(hostname__startswith="bench-")
        .order_by("id")
        .values_list("id", flat=True)
    )
    Gpu.objects.bulk_create(
        (
            Gpu(node_id=n, index=i, serial=f"bench-{n}-{i}")
            for n in node_ids
            for i in range(GPUS_PER_NODE)
        ),
        batch_size=5000,
    )
    say(
        f"  inventory: {NODES} nodes, {NODES * GPUS_PER_NODE} GPUs ({time.monotonic() - started:.0f} s)"
    )

    # History and bookings: per node, SLOTS_PER_NODE whole-node reservations, one per 8-day
    # slot, each 1 to 7 days long (so they never overlap on a GPU). Each node's slots start at
    # its own random offset (the fleet does not book in step), and the slots begin
    # HISTORY_DAYS ago, so most of the allocations are history and about a third are live,
    # booked up to ~24 days ahead at about half the capacity.
    org = Organization.objects.create(name=BENCH_ORG_NAME, slug=BENCH_ORG)
    now = timezone.now()
    base = (now - timedelta(days=HISTORY_DAYS)).replace(minute=0, second=0, microsecond=0)
    nodes = list(
        Node.objects.filter(hostname__startswith="bench-").values("id", "site_id", "gpu_model_id")
    )
    rng = random.Random(42)
    batch = []
    for node in nodes:
        phase = timedelta(hours=rng.randrange(8 * 24))
        for k in range(SLOTS_PER_NODE):
            start = base + phase + timedelta(days=8 * k)
            end = start + timedelta(days=rng.randint(1, 7))
            status = "completed" if end <= now else ("active" if start <= now else "pending")
            batch.append(
                Reservation(
                    public_id=f"res_b{node['id']}_{k}",
                    organization=org,
                    gpu_model_id=node["gpu_model_id"],
                    site_id=node["site_id"],
                    gpu_count=GPUS_PER_NODE,
                    tier="on_demand",
                    starts_at=start,
                    ends_at=end,
                    currency="usd",
                    price_per_gpu_hour=Decimal("2.2000"),
                    total_amount=Decimal("0.00"),
                    status=status,
                )
            )
        if len(batch) >= 10_000:
            Reservation.objects.bulk_create(batch)
            batch = []
    Reservation.objects.bulk_create(batch)
    say(f"  reservations: {len(nodes) * SLOTS_PER_NODE} ({time.monotonic() - started:.0f} s)")
    with transaction.atomic(), connection.cursor() as cur:
        # The triggers would refresh each GPU's busy multirange a million times; it is set
        # once below instead (setup only: the measured inserts go through the triggers).
        cur.execute("ALTER TABLE marketplace_allocation DISABLE TRIGGER USER")
        cur.execute(
            """
            INSERT INTO marketplace_allocation (reservation_id, gpu_id, node_id,
                                                period, is_live, created_at)
            SELECT r.id, g.id, g.node_id, tstzrange(r.starts_at, r.ends_at, '[)'),
                   r.status <> 'completed', now()
            FROM marketplace_reservation r
            JOIN inventory_gpu g
              ON g.node_id = split_part(substr(r.public_id, 6), '_', 1)::bigint
            WHERE r.organization_id = %s
            """,
            [org.pk],
        )
        say(f"  allocations: {cur.rowcount} ({time.monotonic() - started:.0f} s)")
        cur.execute("SET CONSTRAINTS ALL IMMEDIATE")  # no pending events across the ALTER
        cur.execute("ALTER TABLE marketplace_allocation ENABLE TRIGGER USER")
        # What the triggers would have kept: each GPU's busy multirange (migration 0009).
        cur.execute(
            """
            UPDATE inventory_gpu g SET busy = live.busy
            FROM (SELECT gpu_id, range_agg(period) AS busy
                  FROM marketplace_allocation WHERE is_live GROUP BY gpu_id) live
            WHERE g.id = live.gpu_id
            """
        )
        # That one statement rewrote every GPU row, and rows that found no room on their page
        # (no dead version can be pruned inside the statement) moved anywhere: a node's GPUs
        # ended up on 8 pages instead of one, and every read of them cost up to 8 times the
        # pages. A live fleet's GPUs stay where the import wrote them, node by node: each
        # booking rewrites a few rows, which stay on their page (fillfactor 70, HOT updates).
        # Put them back in that order (docs/operations.md, "Database upkeep").
        cur.execute("CLUSTER inventory_gpu USING gpu_unique_index_per_node")
    with connection.cursor() as cur:
        for table in (
            "marketplace_allocation",
            "marketplace_reservation",
            "inventory_gpu",
            "inventory_node",
        ):
            cur.execute(f"ANALYZE {table}")
    say(f"Generated in {time.monotonic() - started:.0f} s.")


# --- helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_clients(client, clients: int) -> float:
    """Run client(0) … client(clients - 1) in threads at once; the seconds until all are done."""
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def random_create(rng: random.Random, *, with_site: bool = True) -> dict:
    """A reservation body: 1-8 GPUs of a random model for 1-12 hours within 120 days."""
    start = timezone.now() + timedelta(days=rng.randint(1, 120), hours=rng.randint(0, 23))
    body = {
        "gpu_model": rng.choice(MODELS)[0],
        "gpu_count": rng.choice([1, 1, 2, 4, 8]),
        "starts_at": start.replace(microsecond=0).isoformat(),
        "ends_at": (start + timedelta(hours=rng.randint(1, 12))).replace(microsecond=0).isoformat(),
        "tier": "on_demand",
    }
    if with_site:
        body["site"] = f"bench-{rng.randrange(SITES):02d}"  # every site has every model
    return body


def random_search(rng: random.Random) -> dict:
    start = timezone.now() + timedelta(hours=rng.randint(1, 24 * 60))
    return {
        "gpu_model": rng.choice(MODELS)[0],
        "gpu_count": rng.choice([1, 2, 4, 8, 16, 32]),
        "start": start.replace(microsecond=0),
        "end": (start + timedelta(hours=rng.randint(1, 24 * 14))).replace(microsecond=0),
    }


def start_server(port: int, workers: int, threads: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "0",
        "API_THROTTLE_RATE": "1000000/min",
    }
    proc = subprocess.Popen(
        [
            str(ROOT / ".venv/bin/gunicorn"),
            "config.wsgi",
            "-b",
            f"127.0.0.1:{port}",
            "-w",
            str(workers),
            "-k",
            "gthread" if threads > 1 else "sync",
            "--threads",
            str(threads),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    for _ in range(150):
        if proc.poll() is not None:
            break
        try:
            requests.get(f"http://127.0.0.1:{port}/api/v1/gpu-models", timeout=5)
            return proc
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.2)
    proc.terminate()
    sys.exit("gunicorn did not start")


def api_org_and_key() -> tuple[Organization, str]:
    org, _ = Organization.objects.get_or_create(slug=API_ORG, defaults={"name": "Bench API"})
    try:  # reservations need a funding decision; the bench organisation is postpaid
        from billing.models import BillingAccount, BillingMode

        BillingAccount.objects.update_or_create(
            organization=org, defaults={"mode": BillingMode.POSTPAID}
        )
    except ImportError:
        pass
    _, secret = api_key_create(
        organization=org,
        name=f"bench {uuid.uuid4().hex[:6]}",
        scopes=["read", "write"],
        created_by=None,
    )
    return org, secret


class _Response:
    def __init__(self, status: int, body: bytes):
        self.status_code, self.content = status, body

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise RuntimeError(f"HTTP {self.status_code}: {self.text[:200]}")


class ApiClient:
    """One keep-alive HTTP/1.1 connection with the API key set: a client as lean as wrk's.

    requests costs about a millisecond of CPU per call, taken from the same two cores the
    server runs on; http.client costs a fraction of that, so the figures measure the server.
    """

    def __init__(self, base_url: str, secret: str | None):
        parsed = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        self.headers = {"Authorization": f"Bearer {secret}"} if secret else {}

    def _request(self, method: str, path: str, body: bytes | None, headers: dict) -> _Response:
        self.conn.request(method, path, body=body, headers={**self.headers, **headers})
        response = self.conn.getresponse()
        return _Response(response.status, response.read())

    def get(self, path: str, params: dict | None = None) -> _Response:
        return self._request("GET", path + (f"?{urlencode(params)}" if params else ""), None, {})

    def post(self, path: str, payload: dict, headers: dict | None = None) -> _Response:
        return self._request(
            "POST",
            path,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )


# --- the measurements ----------------------------------------------------------------------


def bench_search(base_url: str, secret: str, n: int) -> float:
    rng = random.Random(7)
    cases = [random_search(rng) for _ in range(n)]
    session = ApiClient(base_url, secret)
    api_ms, offers = [], []
    for case in cases[:10]:  # warm up
        session.get("/api/v1/availability", params=_params(case))
    for case in cases:
        t = time.perf_counter()
        r = session.get("/api/v1/availability", params=_params(case))
        api_ms.append((time.perf_counter() - t) * 1000)
        r.raise_for_status()
        body = r.json()
        offers.append(
            len(body.get("data", body.get("results", body if isinstance(body, list) else [])))
        )

    dsn = _dsn()
    raw_ms = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The query the API runs for these searches (one model, every site).
        sql_text = availability._sql(
            availability._SEARCH_TAIL,
            filters=" AND m.slug = %(gpu_model)s",
        )
        for case in cases:
            params = {
                "gpu_model": case["gpu_model"],
                "gpu_count": case["gpu_count"],
                "curtail_gpus": case["gpu_count"],
                "starts_at": case["start"],
                "ends_at": case["end"],
                "node_limit": 10,
            }
            t = time.perf_counter()
            conn.execute(sql_text, params, prepare=True).fetchall()  # as the API's connection
            raw_ms.append((time.perf_counter() - t) * 1000)
    api_p99, raw_p99 = percentile(api_ms, 99), percentile(raw_ms, 99)
    say(
        f"availability search, {n} searches (random model, 1-32 GPUs, windows up to 60 days ahead):\n"
        f"  through the API : p50 {percentile(api_ms, 50):6.1f} ms   p99 {percentile(api_ms, 99):6.1f} ms"
        f"   (mean offers {statistics.mean(offers):.1f})\n"
        f"  raw SQL         : p50 {percentile(raw_ms, 50):6.1f} ms   p99 {percentile(raw_ms, 99):6.1f} ms\n"
        f"  p99 through the API / raw SQL: {api_p99 / raw_p99:.2f}"
    )
    return api_p99 / raw_p99


def _params(case: dict) -> dict:
    return {
        "gpu_model": case["gpu_model"],
        "gpu_count": case["gpu_count"],
        "start": case["start"].isoformat(),
        "end": case["end"].isoformat(),
    }


def _dsn() -> str:
    db = settings.DATABASES["default"]
    return (
        f"host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432} dbname={db['NAME']} "
        f"user={db['USER']}" + (f" password={db['PASSWORD']}" if db.get("PASSWORD") else "")
    )


def bench_reserve_api(
    base_url: str, secret: str, clients: int, total: int, *, with_site: bool
) -> float:
    """Direct reservations; with_site: naming the site, as an integrator does after a search."""
    counts = {"created": 0, "not_available": 0, "other": 0}
    lock = threading.Lock()
    per_client = total // clients
    others: list[str] = []

    def client(seed: int) -> None:
        rng = random.Random(seed)
        session = ApiClient(base_url, secret)
        for _ in range(per_client):
            body = random_create(rng, with_site=with_site)
            r = session.post(
                "/api/v1/reservations", body, headers={"Idempotency-Key": uuid.uuid4().hex}
            )
            key = (
                "created"
                if r.status_code == 201
                else "not_available"
                if r.status_code == 409
                else "other"
            )
            with lock:
                counts[key] += 1
                if key != "created" and len(others) < 5:
                    others.append(f"{r.status_code} {r.text[:200]}")

    elapsed = run_clients(client, clients)
    how = "naming the site" if with_site else "cheapest site (searches every site)"
    say(
        f"reservation create through the API, {how}, {clients} clients: "
        f"{counts['created']} created, "
        f"{counts['not_available']} not available, {counts['other']} other, in {elapsed:.1f} s "
        f"= {counts['created'] / elapsed:.0f} reservations/s"
    )
    for line in others:
        say(f"  other: {line}")
    return counts["created"] / elapsed


def bench_bare(base_url: str, clients: int, total: int) -> float:
    """The same server and clients on the bare health endpoint (GET /healthz: no
    authentication, no database, no Redis): what a request costs through gunicorn and
    Django's handler alone, the line every other figure is read against."""
    per_client = total // clients
    done = [0] * clients

    def client(c: int) -> None:
        session = ApiClient(base_url, None)
        for _ in range(per_client):
            session.get("/healthz").raise_for_status()
            done[c] += 1

    elapsed = run_clients(client, clients)
    say(
        f"bare: GET /healthz, {clients} clients: "
        f"{sum(done)} in {elapsed:.1f} s = {sum(done) / elapsed:.0f} requests/s"
    )
    return sum(done) / elapsed


def bench_floor(base_url: str, secret: str, clients: int, total: int) -> float:
    """The same server and clients on the cheapest authenticated endpoint (GPU models).

    What the stack costs before any marketplace work: routing, API-key authentication (one
    query), the rate limit (one Redis call), serialising six rows. No create can beat it.
    """
    per_client = total // clients
    done = [0] * clients

    def client(c: int) -> None:
        session = ApiClient(base_url, secret)
        for _ in range(per_client):
            session.get("/api/v1/gpu-models").raise_for_status()
            done[c] += 1

    elapsed = run_clients(client, clients)
    say(
        f"floor: authenticated GET /api/v1/gpu-models, {clients} clients: "
        f"{sum(done)} in {elapsed:.1f} s = {sum(done) / elapsed:.0f} requests/s"
    )
    return sum(done) / elapsed


def warm_up(base_url: str, secret: str, clients: int) -> None:
    """Requests of each kind in every gunicorn worker before anything is timed: a worker's
    first requests open its database and Redis connections and fill its key and reference
    caches, which a timed line of a second or two would otherwise count."""
    per_client = 60
    rng = random.Random(7)

    def client(c: int) -> None:
        session = ApiClient(base_url, secret)
        for _ in range(per_client):
            session.get("/healthz").raise_for_status()
            session.get("/api/v1/gpu-models").raise_for_status()
        for _ in range(2):
            session.post("/api/v1/reservations", random_create(rng))

    elapsed = run_clients(client, clients)
    say(f"warm-up: {clients * per_client} bare, floor and {clients * 2} creates in {elapsed:.1f} s")


def lines_measure(base_url: str, secret: str, args, bares: list, floors: list) -> None:
    """Two pairs of the bare and floor lines, one after the other."""
    for _ in range(2):
        bares.append(bench_bare(base_url, args.clients, args.reservations * 3))
        floors.append(bench_floor(base_url, secret, args.clients, args.reservations * 2))


def bench_placement_read_raw(clients: int, total: int) -> float:
    """The exact read every create naming its site makes (one site's nodes of one model, their
    free GPUs for the window summed and the best-fit nodes chosen: site_model_offer's query
    text, prepared), straight through psycopg."""
    pairs = list(Node.objects.values_list("site_id", "gpu_model_id").distinct())
    filters, _ = availability._filters(site_id=0, gpu_model_id=0)
    sql_text = availability._sql(availability._SEARCH_TAIL, filters=filters)
    per_client = total // clients
    dsn = _dsn()

    def client(c: int) -> None:
        rng = random.Random(1000 + c)
        with psycopg.connect(dsn, autocommit=True) as conn:
            for _ in range(per_client):
                site_id, model_id = rng.choice(pairs)
                start = timezone.now() + timedelta(
                    days=rng.randint(1, 120), hours=rng.randint(0, 23)
                )
                gpu_count = rng.choice([1, 1, 2, 4, 8])  # as random_create asks
                params = {
                    "site_id": site_id,
                    "gpu_model_id": model_id,
                    "starts_at": start,
                    "ends_at": start + timedelta(hours=rng.randint(1, 12)),
                    "gpu_count": gpu_count,
                    "curtail_gpus": gpu_count,
                    "node_limit": availability._OFFER_NODE_LIMIT,
                }
                conn.execute(sql_text, params, prepare=True).fetchall()

    elapsed = run_clients(client, clients)
    rate = per_client * clients / elapsed
    say(
        f"raw-SQL placement read (one site's nodes of one model, free GPUs, best fit), "
        f"{clients} clients: "
        f"{per_client * clients} in {elapsed:.1f} s = {rate:.0f} reads/s"
    )
    return rate


def bench_reserve_raw(clients: int, total: int) -> float:
    """One reservation row plus its 8 allocations per transaction, nodes locked first."""
    org, _ = Organization.objects.get_or_create(slug=RAW_ORG, defaults={"name": "Bench raw"})
    nodes = list(
        Node.objects.filter(hostname__startswith="bench-")
        .order_by("id")
        .values_list("id", "site_id", "gpu_model_id")
    )
    far = timezone.now() + timedelta(days=300)
    per_client = total // clients
    dsn = _dsn()
    errors: list[str] = []

    def client(c: int) -> None:
        with psycopg.connect(dsn) as conn:
            for j in range(per_client):
                node_id, site_id, model_id = nodes[(c + j * clients) % len(nodes)]
                start = far + timedelta(hours=(c + j * clients) // len(nodes) * 2)
                end = start + timedelta(hours=1)
                try:
                    with conn.transaction():
                        rid = conn.execute(
                            """INSERT INTO marketplace_reservation
                               (public_id, organization_id, gpu_model_id, site_id, gpu_count, tier,
                                term, starts_at, ends_at, currency, price_per_gpu_hour,
                                total_amount, breakdown, status, status_reason, workload,
                                connection, cancellation, preempt_reason, created_at,
                                updated_at)
                               VALUES (%s, %s, %s, %s, 8, 'on_demand', 'none', %s, %s, 'usd',
                                       2.2, 17.6, '{}', 'pending', '', '{}', '{}', '{}', '',
                                       now(), now())
                               RETURNING id""",
                            [
                                f"res_raw_{uuid.uuid4().hex[:20]}",
                                org.pk,
                                model_id,
                                site_id,
                                start,
                                end,
                            ],
                        ).fetchone()[0]
                        conn.execute(
                            "SELECT id FROM inventory_node WHERE id = %s FOR UPDATE", [node_id]
                        )
                        conn.execute(
                            """INSERT INTO marketplace_allocation
                               (reservation_id, gpu_id, node_id, period, is_live, created_at)
                               SELECT %s, g.id, g.node_id, tstzrange(%s, %s, '[)'), true, now()
                               FROM inventory_gpu g WHERE g.node_id = %s""",
                            [rid, start, end, node_id],
                        )
                except psycopg.Error as exc:
                    errors.append(repr(exc)[:200])

    elapsed = run_clients(client, clients)
    done = per_client * clients - len(errors)
    say(
        f"raw-SQL reservation transaction (1 row + 8 allocations), {clients} clients: "
        f"{done} in {elapsed:.1f} s = {done / elapsed:.0f} reservations/s"
        + (f", {len(errors)} errors (first: {errors[0]})" if errors else "")
    )
    return done / elapsed


def _load(when: str) -> str:
    one, five, _ = os.getloadavg()
    return f"load average at the {when}: {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} cores"


def cleanup() -> None:
    with connection.cursor() as cur:
        for slug in (API_ORG, RAW_ORG):
            # Billing's holds on the run's reservations protect the reservation rows.
            cur.execute(
                """DELETE FROM billing_hold WHERE organization_id IN (
                       SELECT id FROM marketplace_organization WHERE slug = %s)""",
                [slug],
            )
            cur.execute(
                """DELETE FROM marketplace_allocation WHERE reservation_id IN (
                       SELECT r.id FROM marketplace_reservation r
                       JOIN marketplace_organization o ON o.id = r.organization_id
                       WHERE o.slug = %s)""",
                [slug],
            )
    for slug in (API_ORG, RAW_ORG):
        Reservation.objects.filter(organization__slug=slug).delete()
    # The deleted rows leave dead entries in the GiST indexes on the hottest nodes (best fit
    # packs the lowest ids first); vacuum so that the next run starts from the same state.
    with connection.cursor() as cur:
        cur.execute("VACUUM (ANALYZE) marketplace_allocation")
        cur.execute("VACUUM (ANALYZE) marketplace_reservation")
        cur.execute("VACUUM (ANALYZE) inventory_gpu")  # the busy updates of the run
        # The open holds' deltas the gate folded (a machine with autovacuum on does this
        # within a minute; this one may have it off).
        cur.execute("VACUUM (ANALYZE) billing_openholdsdelta, billing_hold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--searches", type=int, default=300)
    parser.add_argument("--reservations", type=int, default=1600)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--global-reservations",
        type=int,
        default=320,
        help="also this many reservations without a site (the service searches every site)",
    )
    parser.add_argument("--workers", type=int, default=4, help="gunicorn worker processes")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads per gunicorn worker (1: sync workers)"
    )
    parser.add_argument("--generate-only", action="store_true")
    args = parser.parse_args()

    call_command("migrate", verbosity=0)
    ensure_data()
    if args.generate_only:
        return
    with connection.cursor() as cur:
        cur.execute("SELECT count(*), count(*) FILTER (WHERE is_live) FROM marketplace_allocation")
        total, live = cur.fetchone()
    say(
        f"Inventory: {Gpu.objects.count()} GPUs on {Node.objects.count()} nodes; "
        f"{total} allocations ({live} live)."
    )
    cleanup()
    say(_load("start"))
    _, secret = api_org_and_key()
    port = free_port()
    server = start_server(port, args.workers, args.threads)
    try:
        base_url = f"http://127.0.0.1:{port}"
        warm_up(base_url, secret, args.clients)
        # The two lines everything is read against, measured in pairs before and after the
        # marketplace's own figures (the machine's speed drifts); their medians are used.
        bares, floors = [], []
        lines_measure(base_url, secret, args, bares, floors)
        search_ratio = bench_search(base_url, secret, args.searches)
        creates = bench_reserve_api(
            base_url, secret, args.clients, args.reservations, with_site=True
        )
        if args.global_reservations:
            bench_reserve_api(
                base_url, secret, args.clients, args.global_reservations, with_site=False
            )
        lines_measure(base_url, secret, args, bares, floors)
        bare, floor = statistics.median(bares), statistics.median(floors)
        pairs = ", ".join(f"{f / b:.2f}" for b, f in zip(bares, floors, strict=True))
        say(
            f"same run: floor / bare {floor / bare:.2f} (each pair: {pairs}); creates naming "
            f"the site / bare {creates / bare:.3f}, / floor {creates / floor:.2f}; search p99 "
            f"API / raw SQL {search_ratio:.2f} (bare {bare:.0f}/s, floor {floor:.0f}/s, "
            f"medians of {len(bares)})"
        )
        read = bench_placement_read_raw(args.clients, args.reservations)
        raw = bench_reserve_raw(args.clients, args.reservations)
        # A create through the API does at least what each of these does, on the same cores:
        # their costs add up, so their rates combine harmonically.
        say(
            "ceiling estimate for a create through this stack here (floor + placement read + "
            f"raw transaction, one after the other): {1 / (1 / floor + 1 / read + 1 / raw):.0f} /s"
        )
        with connection.cursor() as cur:
            cur.execute(OVERLAP_SQL)
            overlapping = cur.fetchone()[0]
        say(f"double bookings (live allocations overlapping on a GPU): {overlapping}")
        say(_load("end"))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        cleanup()


if __name__ == "__main__":
    main()
