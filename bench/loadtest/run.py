"""The load test (`make loadtest`; not part of `make test` or `make bench`).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_load REDIS_URL=redis://127.0.0.1:6379/7 \
        .venv/bin/python bench/loadtest/run.py     # --users 40 --duration 60 --max-requests 20000

1. A fresh database, <name>_loadtest (dropped and created), migrated and seeded with the
   demo inventory (6 sites, 416 GPUs), ORGS organisations each with an API key and a
   100,000.00 credit, and node tokens for AGENTS nodes.
2. gunicorn (WORKERS sync workers, DEBUG off) on loopback, a Celery worker with beat on a
   queue of its own (simulated driver), and locust, headless, for DURATION seconds or
   MAX_REQUESTS requests, whichever comes first: customers searching, quoting, reserving,
   listing, extending and cancelling (one in ten reservations starting now, so the worker
   provisions and releases while the load runs), and site agents heartbeating.
3. It prints throughput and p50/p95/p99 per operation with errors and refusals, lets the
   worker finish what is in flight (up to SETTLE seconds), then checks:
   - no GPU is booked twice (no two live allocations on one GPU overlap);
   - no reservation is stuck in a transient state (provisioning, releasing, or pending past
     its start), and every reservation holds live allocations exactly while it is live;
   - every organisation's ledger sums to the balance the API reports, and no reservation
     that never ran is charged.
Exit status 0 only when there were no errors and every check holds.
"""

import argparse
import csv
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent
TRANSIENT_GRACE_SECONDS = 30


def _fresh_database(url: str) -> str:
    import psycopg

    parsed = urlparse(url)
    name = parsed.path.lstrip("/") + "_loadtest"
    maintenance = urlunparse(parsed._replace(path="/postgres"))
    with psycopg.connect(maintenance, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunparse(parsed._replace(path=f"/{name}"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _seed(*, orgs: int, agents: int) -> dict:
    from django.contrib.auth import get_user_model
    from django.core.management import call_command

    from billing.services.accounts import billing_account_get_or_create
    from billing.services.credits import credit_issue
    from inventory.models import GpuModel, Node, NodeStatus
    from inventory.services import node_token_issue
    from marketplace.services.api_keys import api_key_create
    from marketplace.services.organizations import organization_create

    call_command("migrate", "--noinput", verbosity=0)
    call_command("seed_demo", verbosity=0)
    keys = []
    for number in range(orgs):
        owner = get_user_model().objects.create_user(f"load{number}", password=None)
        org = organization_create(name=f"Load {number}", owner=owner)
        billing_account_get_or_create(organization=org)
        credit_issue(organization=org, amount=Decimal("100000.00"), reason="load test",
                     created_by=None)  # fmt: skip
        _, secret = api_key_create(organization=org, name="load", scopes=["read", "write"],
                                   created_by=None)  # fmt: skip
        keys.append(secret)
    nodes = Node.objects.filter(status=NodeStatus.AVAILABLE).order_by("id")[:agents]
    tokens = [node_token_issue(node=node, label="load test")[1] for node in nodes]
    models = list(GpuModel.objects.order_by("slug").values_list("slug", flat=True))
    return {"api_keys": keys, "node_tokens": tokens, "gpu_models": models}


def _start(command: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def _wait_http(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"gunicorn did not start:\n{log.read_text()[-3000:]}")


def _wait_worker(log: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if " ready." in log.read_text():
            return
        if process.poll() is not None:
            break
        time.sleep(0.3)
    raise SystemExit(f"the Celery worker did not start:\n{log.read_text()[-3000:]}")


def _report(stats_csv: Path, refusals: dict) -> int:
    rows = list(csv.DictReader(stats_csv.open()))
    print(f"\n{'operation':<11}{'requests':>9}{'req/s':>8}{'p50 ms':>8}{'p95 ms':>8}"
          f"{'p99 ms':>8}{'errors':>8}{'refused':>9}")  # fmt: skip
    errors = 0
    for row in sorted(rows, key=lambda r: (r["Name"] == "Aggregated", r["Name"])):
        name = row["Name"]
        refused = sum(refusals.values()) if name == "Aggregated" else refusals.get(name, 0)
        print(f"{name:<11}{row['Request Count']:>9}{float(row['Requests/s']):>8.1f}"
              f"{row['50%']:>8}{row['95%']:>8}{row['99%']:>8}{row['Failure Count']:>8}"
              f"{refused:>9}")  # fmt: skip
        if name == "Aggregated":
            errors = int(row["Failure Count"])
    return errors


def _settle(seconds: int) -> int:
    from django.db import connection

    deadline = time.monotonic() + seconds
    while True:
        with connection.cursor() as cursor:
            cursor.execute(_TRANSIENT_SQL, [TRANSIENT_GRACE_SECONDS])
            in_flight = cursor.fetchone()[0]
        if in_flight == 0 or time.monotonic() > deadline:
            return in_flight
        time.sleep(1)


_TRANSIENT_SQL = """
SELECT count(*) FROM marketplace_reservation
WHERE status IN ('provisioning', 'releasing')
   OR (status = 'pending' AND starts_at < statement_timestamp() - make_interval(secs => %s))
"""
_DOUBLE_BOOKED_SQL = """
SELECT count(*) FROM marketplace_allocation a
JOIN marketplace_allocation b ON a.gpu_id = b.gpu_id AND a.id < b.id AND a.period && b.period
WHERE a.is_live AND b.is_live
"""
# Live reservations hold gpu_count live allocations; others hold none.
_ALLOCATIONS_MISMATCH_SQL = """
SELECT count(*) FROM marketplace_reservation r
LEFT JOIN LATERAL (SELECT count(*) AS n FROM marketplace_allocation a
                   WHERE a.reservation_id = r.id AND a.is_live) live ON true
WHERE CASE WHEN r.status IN ('pending', 'scheduled', 'provisioning', 'active')
           THEN live.n <> r.gpu_count ELSE live.n <> 0 END
"""
_CHARGED_NEVER_RAN_SQL = """
SELECT count(*) FROM billing_ledgerentry l JOIN marketplace_reservation r ON r.id = l.reservation_id
WHERE l.kind = 'usage' AND r.activated_at IS NULL
"""
_LEDGER_SQL = "SELECT organization_id, sum(amount_minor) FROM billing_ledgerentry GROUP BY 1"


def _checks() -> list[tuple[str, bool, str]]:
    from django.db import connection
    from django.db.models import Count
    from django.test import Client

    from marketplace.models import Organization, Reservation

    def count(sql: str, params=()) -> int:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchone()[0]

    with connection.cursor() as cursor:
        cursor.execute(_LEDGER_SQL)
        ledger = dict(cursor.fetchall())
    mismatched = []
    for org in Organization.objects.filter(slug__startswith="load-").prefetch_related(
        "memberships__user"
    ):
        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(org.memberships.all()[0].user)
        # Over HTTPS, as customers call it (with DEBUG off plain HTTP is redirected).
        answer = client.get(
            "/api/v1/billing/balance", HTTP_SY_ORGANIZATION=org.public_id, secure=True
        )
        balance_minor = int(Decimal(answer.json()["balance"]) * 100)
        if answer.status_code != 200 or balance_minor != ledger.get(org.id, 0):
            mismatched.append(org.slug)
    double = count(_DOUBLE_BOOKED_SQL)
    stuck = count(_TRANSIENT_SQL, [TRANSIENT_GRACE_SECONDS])
    allocations = count(_ALLOCATIONS_MISMATCH_SQL)
    never_ran = count(_CHARGED_NEVER_RAN_SQL)
    by_status = dict(Reservation.objects.values_list("status").annotate(n=Count("id")))
    return [
        ("reservations by status", True, json.dumps(by_status, sort_keys=True)),
        ("no GPU booked twice", double == 0, f"{double} overlapping live allocation pairs"),
        ("no reservation stuck in a transient state", stuck == 0, f"{stuck} stuck"),
        ("live allocations match every reservation's status", allocations == 0,
         f"{allocations} reservations disagree"),
        ("every organisation's ledger sums to its balance", not mismatched,
         f"{len(ledger)} ledgers, mismatched: {mismatched or 'none'}"),
        ("no reservation that never ran is charged", never_ran == 0, f"{never_ran} usage lines"),
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=40, help="concurrent locust users")
    parser.add_argument("--spawn-rate", type=float, default=10)
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--orgs", type=int, default=36, help="organisations (one key each)")
    parser.add_argument("--agents", type=int, default=24, help="nodes with a heartbeating agent")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument("--settle", type=int, default=60, help="seconds for in-flight work")
    args = parser.parse_args()

    database_url = _fresh_database(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/switchyard")
    )
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
    queue = f"loadtest-{os.getpid()}"
    os.environ.update({"DATABASE_URL": database_url, "REDIS_URL": redis_url, "DEBUG": "1",
                       "DJANGO_SETTINGS_MODULE": "config.settings"})  # fmt: skip
    import django

    django.setup()
    work = Path(tempfile.mkdtemp(prefix="sy-loadtest-"))
    started = time.monotonic()
    data = _seed(orgs=args.orgs, agents=args.agents)
    (work / "data.json").write_text(json.dumps(data))
    print(f"seeded {database_url.rsplit('/', 1)[1]}: {args.orgs} organisations, "
          f"{len(data['node_tokens'])} agents ({time.monotonic() - started:.0f} s); logs in {work}")  # fmt: skip

    port = _free_port()
    server_env = {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "0",
        "LOG_LEVEL": "WARNING",
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "SIMULATED_DRIVER_LATENCY_SECONDS": "0.2",
        "PROVISIONING_DISPATCH_INTERVAL_SECONDS": "2",
    }
    worker = _start([str(BIN / "celery"), "-A", "config", "worker", "-B", "-c", "2", "-Q", queue,
                     "-s", str(work / "beat-schedule"), "--without-gossip", "--without-mingle"],
                    {**server_env, "LOG_LEVEL": "INFO"}, work / "worker.log")  # fmt: skip
    web = _start([sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py",
                  "config.wsgi:application", "-b", f"127.0.0.1:{port}", "-w", str(args.workers)],
                 server_env, work / "gunicorn.log")  # fmt: skip
    try:
        _wait_worker(work / "worker.log", worker)
        _wait_http(f"http://127.0.0.1:{port}/readyz", web, work / "gunicorn.log")
        print(f"load: {args.users} users for {args.duration} s or {args.max_requests} requests "
              f"against gunicorn -w {args.workers} on 127.0.0.1:{port}", flush=True)  # fmt: skip
        load_started = time.monotonic()
        subprocess.run(
            [str(BIN / "locust"), "-f", str(ROOT / "bench/loadtest/locustfile.py"), "--headless",
             "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s",
             "--host", f"http://127.0.0.1:{port}", "--csv", str(work / "locust"),
             "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING"],
            cwd=ROOT, check=False, stdout=(work / "locust.log").open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "LOADTEST_DATA": str(work / "data.json"),
                 "LOADTEST_MAX_REQUESTS": str(args.max_requests),
                 "LOADTEST_REFUSALS": str(work / "refusals.json")},
        )  # fmt: skip
        print(f"load ran {time.monotonic() - load_started:.0f} s")
        refusals_path = work / "refusals.json"
        refusals = json.loads(refusals_path.read_text()) if refusals_path.exists() else {}
        errors = _report(work / "locust_stats.csv", refusals)
        in_flight = _settle(args.settle)
        print(f"\nsettled: {in_flight} reservations still in flight after up to {args.settle} s")
        results = _checks()
    finally:
        _stop(web)
        _stop(worker)
        import redis

        redis.Redis.from_url(redis_url).delete(queue)
    print()
    for name, ok, detail in results:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    failed = [name for name, ok, _ in results if not ok]
    if errors:
        print(f"FAIL {errors} requests answered with an error (see {work / 'locust_failures.csv'})")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
