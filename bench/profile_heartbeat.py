"""Where a heartbeat's CPU goes (not a test): the agent's heartbeat and the cheapest
authenticated request through the WSGI handler in this process, as gunicorn calls it (DEBUG
off, every middleware), no HTTP and no other process in the measure.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_hb REDIS_URL=redis://127.0.0.1:6379/5 \
        .venv/bin/python bench/profile_heartbeat.py   # --requests 2000 --profile 30

Prints the CPU (time.process_time) per request of: a routine heartbeat with the H100 report
(buffered), the floor (GET /api/v1/gpu-models with an API key), an unrouted path (the
middleware stack and a 404, its log line off), /healthz; then the heartbeat under cProfile
(timed by process_time: CPU, not waits), its top functions by own and by cumulative time. Its nodes and what they wrote are deleted at the end.
"""

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import secrets
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.update(DEBUG="0", ALLOWED_HOSTS="127.0.0.1", SECURE_SSL_REDIRECT="0",
                  API_THROTTLE_RATE="1000000/min")  # fmt: skip
os.environ.setdefault("SECRET_KEY", secrets.token_urlsafe(64))

import django  # noqa: E402

django.setup()

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.db import connection  # noqa: E402

import bench.bench_heartbeats as hb  # noqa: E402
from agent.gpu_telemetry import parse_nvidia_smi_xml  # noqa: E402
from inventory import heartbeats, telemetry  # noqa: E402
from inventory.models import HealthRules  # noqa: E402
from marketplace.models import Organization  # noqa: E402
from marketplace.services.api_keys import api_key_create  # noqa: E402

hb.PREFIX = "hb-prof-"


def environ(method: str, path: str, body: bytes | None, authorization: str) -> dict:
    body = body or b""
    return {
        "REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "SCRIPT_NAME": "",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "127.0.0.1", "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False,
        "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json",
        "HTTP_AUTHORIZATION": authorization,
    }  # fmt: skip


def caller(app, method, path, body, authorization, expect):
    def call():
        status = []
        chunks = app(environ(method, path, body, authorization), lambda s, h: status.append(s))
        b"".join(chunks)
        getattr(chunks, "close", lambda: None)()
        if not status[0].startswith(expect):
            raise RuntimeError(f"{method} {path}: {status[0]}")

    return call


def flush() -> None:
    """What beat does every 5 s, so nodes' times in the database stay fresh and a routine
    heartbeat stays buffered (outside the measure)."""
    heartbeats.heartbeats_flush()
    telemetry.telemetry_flush()


def cpu_ms(call, n: int, profiler: cProfile.Profile | None = None) -> float:
    """CPU per call (ms) over n calls, flushing every 200 outside the measure."""
    spent = 0.0
    for start in range(0, n, 200):
        flush()
        started = time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(min(200, n - start)):
            call()
        if profiler:
            profiler.disable()
        spent += time.process_time() - started
    return spent / n * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--profile", type=int, default=30, help="functions to list")
    args = parser.parse_args()
    hb.fleet_delete()
    HealthRules.current()
    fleet = hb.fleet_create(200)
    org = Organization.objects.create(slug=f"{hb.PREFIX}org", name="Heartbeat profile")
    _, key = api_key_create(organization=org, name="prof", scopes=["read"], created_by=None)
    report = parse_nvidia_smi_xml(hb.FIXTURE.read_text())
    body = json.dumps({"agent_version": hb.AGENT_VERSION, "telemetry": report}).encode()
    app = get_wsgi_application()
    beats = [caller(app, "POST", "/api/v1/agent/heartbeat", body, f"Bearer {secret}", "200")
             for _, secret in fleet]  # fmt: skip
    turn = iter(range(10**9))

    def beat():
        beats[next(turn) % len(beats)]()

    calls = {
        "heartbeat (buffered, 8 GPUs' telemetry)": beat,
        "floor: GET /api/v1/gpu-models": caller(
            app, "GET", "/api/v1/gpu-models", None, f"Bearer {key}", "200"
        ),
        "unrouted path (middleware, a 404)": caller(app, "GET", "/no-such-path", None, "", "404"),
        "/healthz": caller(app, "GET", "/healthz", None, "", "200"),
    }
    logging.getLogger("django.request").setLevel(logging.ERROR)  # not a log line per 404
    try:
        for call in calls.values():
            for _ in range(50):
                call()
        for what, call in calls.items():
            print(f"{what:<45} {cpu_ms(call, args.requests):6.3f} ms CPU a request", flush=True)
        profiler = cProfile.Profile(time.process_time)  # CPU, not the waits on sockets
        cpu_ms(beat, args.requests, profiler)
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.profile)
            print(out.getvalue())
    finally:
        telemetry.buffer_client().delete(
            heartbeats.LAST_SEEN_KEY, heartbeats.TOKEN_USED_KEY, telemetry.BUFFER_KEY
        )
        connection.close()
        hb.fleet_delete()


if __name__ == "__main__":
    main()
