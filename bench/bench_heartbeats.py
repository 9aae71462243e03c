"""Heartbeat benchmark (not a test): can the API take a fleet of 12,500 nodes (100,000 GPUs)
heartbeating every 30 s with per-GPU telemetry (417 heartbeats/s) on this machine?

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_hb_bench REDIS_URL=redis://127.0.0.1:6379/5 \
        .venv/bin/python bench/bench_heartbeats.py   # --nodes 12500 --clients 16 --workers 4

Builds a fleet of `--nodes` 8-GPU nodes, each with its own node token, all heard a moment ago
(a fleet in steady state), and an organisation with an API key. Starts gunicorn (`--workers`
sync workers, DEBUG off) and a flusher process doing what beat does every 5 s
(heartbeats_flush and telemetry_flush). Then, with `--clients` keep-alive http.client
connections in threads, in one run:
1. heartbeats: POST /api/v1/agent/heartbeat for every node once (node token, the H100
   telemetry report the agent's parser makes from the recorded nvidia-smi output, full
   validation), as fast as the server answers: sustained heartbeats/s and p50/p99; meanwhile
   no node's time in the database is older than 30 s, as the fleet's previous round would
   leave it (see _flusher);
2. the floor: as many requests to the cheapest authenticated endpoint (GET
   /api/v1/gpu-models with an API key) with the same server and clients;
3. the locked path, the way every heartbeat was handled before the buffer: as many
   heartbeats from nodes whose last heartbeat in the database is an hour old, so each one is
   written at once in its own transaction under the node's lock;
4. the same heartbeats paced at the fleet's rate (12,500 / 30 s), and whether they kept up;
(`--requests N` sends N heartbeats a pass, spread over the fleet, instead of one per node)
then the flusher's time per run, a last flush, a check that every node's last heartbeat is
in the database and that every sample reached the table, the offline sweep over the fleet
(nothing to mark, and its time), and the CPU one heartbeat and one floor request cost in
this process (Django's test client): a ratio the machine's load moves far less than rates.
Each pass also prints the CPU gunicorn's processes spent per request (from /proc). The fleet and all it wrote are deleted at the end.
"""

import argparse
import hashlib
import http.client
import json
import multiprocessing
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
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
from django.db import connection, connections  # noqa: E402
from django.utils import timezone  # noqa: E402

from agent.gpu_telemetry import parse_nvidia_smi_xml  # noqa: E402
from inventory import heartbeats, telemetry  # noqa: E402
from inventory.models import (  # noqa: E402
    Gpu,
    GpuModel,
    GpuSample,
    HealthRules,
    Node,
    NodeToken,
    Site,
)
from inventory.services import nodes_mark_silent_offline  # noqa: E402
from marketplace.models import Organization  # noqa: E402
from marketplace.services.api_keys import api_key_create  # noqa: E402

PREFIX = "hb-bench-"
FIXTURE = ROOT / "tests/agent/fixtures/telemetry/nvidia_h100_healthy.xml"
AGENT_VERSION = "2.0"
INTERVAL = 30.0  # seconds between a node's heartbeats


def say(msg: str) -> None:
    print(msg, flush=True)


# --- the fleet -----------------------------------------------------------------------------


def fleet_create(count: int) -> list[tuple[int, str]]:
    """`count` 8-GPU nodes heard just now, each with a token; (node id, secret) per node."""
    site = Site.objects.create(
        slug=f"{PREFIX}site", name="Heartbeat bench", region="us-central", country="US",
        grid_operator="ERCOT", power_capacity_kw=50000, pue="1.20", cooling="hydro",
        energy_price_per_mwh="40", renewable_share="0.5", uplink_gbps=400, status="active",
    )  # fmt: skip
    model = GpuModel.objects.create(
        slug=f"{PREFIX}h100", name="H100 bench", vendor="nvidia", memory_gb=80, tdp_watts=700
    )
    now = timezone.now()
    nodes = Node.objects.bulk_create(
        (Node(site=site, gpu_model=model, hostname=f"{PREFIX}{i:06d}", cpu_cores=96,
              ram_gb=1024, disk_gb=15360, nic_gbps=400, last_heartbeat_at=now,
              agent_version=AGENT_VERSION)
         for i in range(count)),
        batch_size=5_000,
    )  # fmt: skip
    Gpu.objects.bulk_create(
        (Gpu(node=n, index=i, serial=f"{n.hostname}-{i}") for n in nodes for i in range(8)),
        batch_size=20_000,
    )
    secrets_by_node, tokens = [], []
    for node in nodes:
        prefix = "nt_" + secrets.token_hex(4)
        secret = f"{prefix}_{secrets.token_urlsafe(32)}"
        # Used a moment ago, as a running fleet's tokens are (the first use is written at once).
        tokens.append(NodeToken(node=node, prefix=prefix, label=PREFIX, last_used_at=now,
                                secret_hash=hashlib.sha256(secret.encode()).hexdigest()))  # fmt: skip
        secrets_by_node.append((node.pk, secret))
    NodeToken.objects.bulk_create(tokens, batch_size=5_000)
    return secrets_by_node


def fleet_delete() -> None:
    """Raw deletes: the ORM's cascade would collect 100,000 GPUs into one IN list."""
    like = [PREFIX + "%"]
    nodes = "SELECT id FROM inventory_node WHERE hostname LIKE %s"
    gpus = f"SELECT id FROM inventory_gpu WHERE node_id IN ({nodes})"
    with connection.cursor() as cur:
        cur.execute(f"DELETE FROM inventory_gpusample WHERE gpu_id IN ({gpus})", like)
        cur.execute(f"DELETE FROM inventory_gpuhealthchange WHERE gpu_id IN ({gpus})", like)
        cur.execute(f"DELETE FROM inventory_outage WHERE node_id IN ({nodes})", like)
        cur.execute(f"DELETE FROM inventory_statuschange WHERE node_id IN ({nodes})", like)
        cur.execute(f"DELETE FROM inventory_nodetoken WHERE node_id IN ({nodes})", like)
        cur.execute(f"DELETE FROM inventory_gpu WHERE node_id IN ({nodes})", like)
        cur.execute(f"DELETE FROM inventory_node WHERE id IN ({nodes})", like)
        cur.execute("DELETE FROM inventory_site WHERE slug LIKE %s", like)
        cur.execute("DELETE FROM inventory_gpumodel WHERE slug LIKE %s", like)
        orgs = "SELECT id FROM marketplace_organization WHERE slug LIKE %s"
        cur.execute(f"DELETE FROM marketplace_event WHERE organization_id IN ({orgs})", like)
        cur.execute(f"DELETE FROM marketplace_apikey WHERE organization_id IN ({orgs})", like)
        cur.execute("DELETE FROM marketplace_organization WHERE slug LIKE %s", like)


# --- server, flusher, clients --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, workers: int) -> subprocess.Popen:
    env = {**os.environ, "DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(64),
           "ALLOWED_HOSTS": "127.0.0.1", "SECURE_SSL_REDIRECT": "0",
           "API_THROTTLE_RATE": "1000000/min"}  # fmt: skip
    proc = subprocess.Popen(
        [str(ROOT / ".venv/bin/gunicorn"), "config.wsgi", "-b", f"127.0.0.1:{port}",
         "-w", str(workers), "-k", "sync", "--log-level", "warning"],
        cwd=ROOT, env=env, start_new_session=True,
    )  # fmt: skip
    for _ in range(150):
        if proc.poll() is not None:
            break
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    sys.exit("gunicorn did not start")


_STEADY = f"""
UPDATE {Node._meta.db_table} SET last_heartbeat_at = now() - interval '{INTERVAL:.0f} s'
 WHERE hostname LIKE %s AND last_heartbeat_at < now() - interval '{INTERVAL:.0f} s'
"""


def _flusher(stop, steady, times) -> None:
    """What beat does every 5 s: the heartbeat and telemetry flushes; records each run's time.
    While `steady` is set, also what the fleet's previous round of heartbeats would have left
    in the database: no node last heard more than INTERVAL ago. Without it, a pass longer
    than the write-through bound (60 s) would send every node it reaches after that down the
    locked path, which a fleet heartbeating every 30 s never takes."""
    connections.close_all()
    telemetry._redis = None
    while not stop.wait(5.0):
        started = time.perf_counter()
        nodes = heartbeats.heartbeats_flush()
        samples = telemetry.telemetry_flush()
        times.append((time.perf_counter() - started, nodes, samples))
        if steady.is_set():
            with connection.cursor() as cursor:
                cursor.execute(_STEADY, [PREFIX + "%"])


class Client:
    """One keep-alive HTTP/1.1 connection (http.client costs the server's cores far less CPU
    than requests would)."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def send(self, method: str, path: str, body: bytes | None, headers: dict) -> float:
        started = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers)
        response = self.conn.getresponse()
        content = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {content[:300]!r}")
        return time.perf_counter() - started


def run(port: int, requests: list[tuple], clients: int, pace: float | None = None):
    """Send `requests` (method, path, body, headers) over `clients` connections, each taking
    every clients-th one; at most `pace` per second overall if given. (seconds, latencies)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    started = time.perf_counter()

    def client(c: int) -> None:
        session = Client(port)
        try:
            for i in range(c, len(requests), clients):
                if pace:  # open loop: request i is due at i / pace
                    delay = started + i / pace - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                latencies[c].append(session.send(*requests[i]))
        except Exception as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started, [x for per in latencies for x in per]


def server_cpu(server: subprocess.Popen) -> float:
    """CPU seconds gunicorn's master and workers have used so far (Linux /proc)."""
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    total = 0
    for pid in [server.pid, *children]:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def cpu_per_request(beat: tuple, floor: tuple, n: int = 300) -> tuple[float, float]:
    """This process's CPU per request (ms) through Django's test client, no HTTP and no other
    process in the measure: a figure the machine's load moves far less than a rate."""
    from django.test import Client

    client = Client(HTTP_HOST="127.0.0.1")
    Node.objects.filter(hostname__startswith=PREFIX).update(last_heartbeat_at=timezone.now())
    result = []
    for _method, path, body, headers in (beat, floor):
        extra = {"HTTP_AUTHORIZATION": headers["Authorization"]}

        def call(path=path, body=body, extra=extra):
            if body is None:
                return client.get(path, **extra)
            return client.post(path, body, content_type="application/json", **extra)

        for _ in range(20):
            assert call().status_code == 200
        started = time.process_time()
        for _ in range(n):
            call()
        result.append((time.process_time() - started) / n * 1000)
    return result[0], result[1]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def line(what: str, seconds: float, latencies: list[float], cpu: float | None = None) -> float:
    """Print a pass's rate and latencies (and the server's CPU per request, if measured)."""
    rate = len(latencies) / seconds
    per = f", server CPU {cpu * 1000 / len(latencies):5.2f} ms a request" if cpu else ""
    say(f"  {what:<42} {len(latencies):>6,} in {seconds:6.1f} s = {rate:5.0f}/s, "
        f"p50 {pct(latencies, 50):6.1f} ms, p99 {pct(latencies, 99):6.1f} ms{per}")  # fmt: skip
    return rate


def measured(server: subprocess.Popen, *args, **kwargs) -> tuple[float, list[float], float]:
    """run(*args), with the CPU seconds gunicorn's processes spent meanwhile."""
    before = server_cpu(server)
    seconds, latencies = run(*args, **kwargs)
    return seconds, latencies, server_cpu(server) - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=12_500)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4, help="gunicorn sync workers")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per pass (default: one per node)"
    )
    args = parser.parse_args()
    call_command("migrate", verbosity=0)
    fleet_delete()
    HealthRules.current()
    need = args.nodes / INTERVAL

    t0 = time.perf_counter()
    fleet = fleet_create(args.nodes)
    org = Organization.objects.create(slug=f"{PREFIX}org", name="Heartbeat bench")
    _, key = api_key_create(organization=org, name="bench", scopes=["read"], created_by=None)
    say(f"fleet: {args.nodes:,} nodes, {8 * args.nodes:,} GPUs, a token each "
        f"({time.perf_counter() - t0:.1f} s to create); it needs {need:,.0f} heartbeats/s")  # fmt: skip

    report = parse_nvidia_smi_xml(FIXTURE.read_text())
    body = json.dumps({"agent_version": AGENT_VERSION, "telemetry": report}).encode()
    if args.requests:  # a share of the fleet, spread over it
        fleet = fleet[:: max(1, len(fleet) // args.requests)][: args.requests]
    beats = [("POST", "/api/v1/agent/heartbeat", body,
              {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
             for _, secret in fleet]  # fmt: skip
    floor = [("GET", "/api/v1/gpu-models", None, {"Authorization": f"Bearer {key}"})] * len(beats)
    say(f"each heartbeat: {len(body):,} bytes of JSON, 8 GPUs' readings")

    client = telemetry.buffer_client()
    client.delete(heartbeats.LAST_SEEN_KEY, heartbeats.TOKEN_USED_KEY, telemetry.BUFFER_KEY)
    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    stop, steady, flush_times = ctx.Event(), ctx.Event(), ctx.Manager().list()
    flusher = ctx.Process(target=_flusher, args=(stop, steady, flush_times))
    paced_from = timezone.now()
    port = free_port()
    server = start_server(port, args.workers)
    steady.set()
    flusher.start()
    try:
        run(port, beats[: args.clients * 4], args.clients)  # warm every worker
        run(port, floor[: args.clients * 4], args.clients)
        say(
            f"{args.workers} gunicorn workers, {args.clients} clients, {len(beats):,} requests a pass:"
        )
        rate = line(
            "heartbeats with telemetry (buffered)", *measured(server, port, beats, args.clients)
        )
        floor_rate = line(
            "floor: GET /api/v1/gpu-models (API key)", *measured(server, port, floor, args.clients)
        )

        steady.clear()
        time.sleep(6)  # the flusher's running round ends
        Node.objects.filter(hostname__startswith=PREFIX).update(
            last_heartbeat_at=timezone.now() - timedelta(hours=1)
        )
        connections.close_all()
        locked_rate = line(
            "heartbeats on the locked path (as before)",
            *measured(server, port, beats, args.clients),
        )

        Node.objects.filter(hostname__startswith=PREFIX).update(last_heartbeat_at=timezone.now())
        connections.close_all()  # the fleet in steady state again
        paced_from = timezone.now()
        cycle_s, cycle, cycle_cpu = measured(server, port, beats, args.clients, pace=need)
        line(f"paced at the fleet's {need:,.0f}/s", cycle_s, cycle, cycle_cpu)
        due = len(beats) / need
        say(f"  {len(beats):,} heartbeats due over {due:.1f} s took {cycle_s:.1f} s "
            f"({'kept up' if cycle_s <= due * 1.02 else 'fell behind'})")  # fmt: skip
    finally:
        stop.set()
        flusher.join(timeout=60)
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    try:
        runs = [t for t in flush_times if t[1] or t[2]]
        if runs:
            worst = max(runs)
            mean = sum(t[0] for t in runs) / len(runs)
            say(f"flusher: {len(runs)} runs with work, mean {mean * 1000:.0f} ms, worst "
                f"{worst[0] * 1000:.0f} ms ({worst[1]:,} nodes, {worst[2]:,} samples) of its 5 s")  # fmt: skip
        connections.close_all()
        heartbeats.heartbeats_flush()
        telemetry.telemetry_flush()
        behind = Node.objects.filter(
            pk__in=[node_id for node_id, _ in fleet], last_heartbeat_at__lt=paced_from
        ).count()
        samples = GpuSample.objects.filter(gpu__node__hostname__startswith=PREFIX).count()
        sent = 8 * (3 * len(beats) + 4 * args.clients)
        say(f"after a last flush: {behind} nodes without their paced heartbeat in the database; "
            f"{samples:,} samples in the table of {sent:,} sent")  # fmt: skip
        started = time.perf_counter()
        marked = nodes_mark_silent_offline()
        say(f"offline sweep over the fleet: {len(marked)} marked, "
            f"{(time.perf_counter() - started) * 1000:.1f} ms")  # fmt: skip
        cpu_beat, cpu_floor = cpu_per_request(beats[0], floor[0])
        say(f"CPU per request in one process (Django's test client, 300 each): heartbeat "
            f"{cpu_beat:.2f} ms, floor {cpu_floor:.2f} ms, ratio {cpu_floor / cpu_beat:.2f}")  # fmt: skip
        say(f"heartbeats/s ÷ floor: {rate / floor_rate:.2f}; buffered ÷ locked path: "
            f"{rate / locked_rate:.2f}; buffered ÷ need: {rate / need:.2f}")  # fmt: skip
    finally:
        connections.close_all()
        fleet_delete()


if __name__ == "__main__":
    main()
