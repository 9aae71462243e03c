"""`make run`: the whole of Switchyard on one machine for a local demo.

Finds or starts PostgreSQL, Redis and a Stripe stand-in (see devservices.py), migrates,
seeds the demo inventory and accounts, then runs the web server, a Celery worker and Celery
beat until Ctrl-C (SIGINT) or SIGTERM, which stops everything this script started.
Data persists in the database (and, for the embedded PostgreSQL, under .run/pg).

Workloads run in real containers wherever podman works here (RUN_AGENTS=0: simulated, nothing
runs): the worker uses the site-agent driver, and one site agent per demo site (`manage.py
site_agent --site`, a thread per node) runs them with podman, from a locally built image.
Containers keep running when make run stops, as at a real site; the agents adopt them on the
next run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from devservices import (
    LOG_DIR,
    ROOT,
    RUN_DIR,
    ServiceError,
    Supervisor,
    ensure_postgres,
    ensure_redis,
    ensure_stripe,
    rel,
    tcp_port_open,
    wait_until,
)
from podman_image import RUNTIME_ENV, ImageError, workload_image_build

HOST = "127.0.0.1"
# billing.urls: where Stripe (here localstripe) delivers webhooks.
STRIPE_WEBHOOK_PATH = "/api/v1/webhooks/stripe"
DEMO_LOGINS = [
    ("staff (admin)", "admin", "switchyard-admin"),
    ("customer (owner of Demo AI Lab)", "demo", "switchyard-demo"),
]
# Created by seed_demo with DEBUG on (marketplace/management/commands/seed_demo.py).
DEMO_API_KEY = "sy_live_demolab1_LocalDemoKeyForDemoAiLabNotForProduction"


class Shutdown(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_shutdown(signum, _frame):
    # Ignore further signals while we stop the children (a second Ctrl-C must not leave
    # half of them running).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    raise Shutdown(signum)


def manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, check=True)


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - our own URL
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def register_localstripe_webhook(stripe_env: dict[str, str], base: str) -> bool:
    """localstripe keeps webhook endpoints in memory only, so each start registers ours."""
    data = urllib.parse.urlencode(
        {"url": base + STRIPE_WEBHOOK_PATH, "secret": stripe_env["STRIPE_WEBHOOK_SECRET"]}
    ).encode()
    url = f"{stripe_env['STRIPE_API_BASE']}/_config/webhooks/switchyard-demo"
    try:
        with urllib.request.urlopen(url, data=data, timeout=5) as response:  # noqa: S310
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def provisioning_plan() -> tuple[dict[str, str], str]:
    """The environment for the chosen provisioning, and a line saying which it is: real
    containers with podman wherever podman works here (RUN_AGENTS=0: simulated anyway)."""
    asked = os.environ.get("RUN_AGENTS", "")
    if asked == "0":
        return {}, "simulated: no workload runs (RUN_AGENTS=0; unset, podman runs them)"
    try:
        image = workload_image_build()
    except ImageError as exc:
        if asked == "1":
            return {}, f"simulated: RUN_AGENTS=1 asked for real containers, but {exc}"
        return {}, f"simulated: no workload runs, as {exc}"
    # The image is local (localhost/…), and the agents below pull from private registries.
    plan = {
        "PROVISIONING_DRIVER": "site_agent",
        "PROVISIONING_DEFAULT_IMAGE": image,
        "WORKLOAD_PRIVATE_REGISTRIES": "1",
    }
    return {**plan, **RUNTIME_ENV}, f"site agents, real containers with podman ({image})"


def demo_sites(env: dict[str, str]) -> list[str]:
    """The slugs of the sites with a node in service (the agents' --site)."""
    code = (
        "from inventory.models import Node; print(*sorted(set(Node.objects.filter("
        "status__in=['available', 'draining']).values_list('site__slug', flat=True))))"
    )
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-v", "0", "-c", code],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return done.stdout.split()


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_shutdown)
    port = int(os.environ.get("RUN_PORT", "8000"))
    base = f"http://{HOST}:{port}"
    supervisor = Supervisor()
    try:
        if tcp_port_open(HOST, port):
            raise ServiceError(
                f"{HOST}:{port} is already in use (another `make run`?). Stop it, or choose "
                f"another port with RUN_PORT=8001 make run."
            )
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        print("Switchyard: finding or starting services…", flush=True)
        postgres = ensure_postgres(supervisor)
        redis = ensure_redis(supervisor, db=0)
        stripe_env, stripe_description = ensure_stripe(supervisor)

        env = {
            **os.environ,
            # A local demo: the development server serves static files only with DEBUG on, and
            # DEBUG off would redirect to HTTPS. Production runs gunicorn (docs/operations.md).
            "DEBUG": "1",
            "DATABASE_URL": postgres.url,
            "REDIS_URL": redis.url,
            "SITE_URL": os.environ.get("SITE_URL", base),
            "PYTHONUNBUFFERED": "1",
            # A local demo: webhook endpoints may be http://127.0.0.1:… receivers.
            "WEBHOOK_ALLOW_INSECURE": os.environ.get("WEBHOOK_ALLOW_INSECURE", "1"),
            **stripe_env,
        }
        provisioning_env, provisioning = provisioning_plan()
        env.update(provisioning_env)
        print(f"Provisioning: {provisioning}", flush=True)
        print("Migrating and seeding the demo data…", flush=True)
        manage(env, "migrate", "--noinput")
        manage(env, "seed_demo")
        # A prepaid balance for the demo organisation, so it can reserve at once (billing
        # refuses reservations a balance cannot cover). The key makes it a one-off credit.
        manage(
            env, "billing_credit", "demo-ai-lab", "500.00", "demo credit", "--key", "demo-credit"
        )

        bin_dir = os.path.dirname(sys.executable)
        celery = os.path.join(bin_dir, "celery")
        # The development server gives each client connection a thread of its own, and each
        # site agent keeps one open: with connections kept for the next request, every agent
        # held a database connection (near PostgreSQL's 100 with the demo's nodes).
        web = supervisor.start(
            "web",
            [sys.executable, "manage.py", "runserver", f"{HOST}:{port}"],
            env={**env, "DATABASE_CONN_MAX_AGE": "0"},
        )
        # Warnings and errors only: at "info", beat's due tasks every few seconds and the
        # workers' lines for each pushed the banner below out of sight at once. Celery's -l
        # is overridden by the settings' LOGGING (config/celery.py), so LOG_LEVEL too, unless
        # the developer set one.
        quiet = {**env, "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING")}
        supervisor.start(
            "worker",
            [celery, "-A", "config", "worker", "-l", "warning",
             "-Q", "provisioning,billing,telemetry,default"],
            env=quiet,
        )  # fmt: skip
        # Webhook sending waits on customers' servers: its own queue and worker (threads: it
        # waits on the network), so a slow endpoint never holds up provisioning or billing.
        supervisor.start(
            "webhooks",
            [celery, "-A", "config", "worker", "-l", "warning", "-Q", "webhooks",
             "-P", "threads", "-c", "8", "-n", "webhooks@%h"],
            env=quiet,
        )  # fmt: skip
        supervisor.start(
            "beat",
            [celery, "-A", "config", "beat", "-l", "warning",
             "-s", str(RUN_DIR / "celerybeat-schedule"), "--pidfile="],
            env=quiet,
        )  # fmt: skip
        wait_until(
            lambda: http_status(f"{base}/admin/login/") == 200,
            timeout=180,  # first start on a busy 2-core machine can take a while
            process=web,
            what="the web server",
        )
        if stripe_env and register_localstripe_webhook(stripe_env, base):
            stripe_description += f"; webhooks go to {base}{STRIPE_WEBHOOK_PATH}"
        if provisioning_env:
            sites = demo_sites(env)
            for slug in sites:
                supervisor.start(
                    f"agent-{slug}",
                    [sys.executable, "manage.py", "site_agent", "--site", slug,
                     "--api", base, "--executor", "container", "--runtime", "podman",
                     "--host", HOST, "--state-dir", str(RUN_DIR / "agents"),
                     "--allow-private-registries", "--poll-seconds", "3"],
                    env=env,
                )  # fmt: skip
            provisioning += f"; one agent per demo site ({len(sites)})"
        _print_banner(
            base, postgres.description, redis.description, stripe_description, provisioning
        )

        while True:
            gone = supervisor.exited()
            if gone:
                names = ", ".join(f"{c.name} (exit {c.process.returncode})" for c in gone)
                print(f"\n{names} stopped unexpectedly; stopping the rest.", flush=True)
                return 1
            time.sleep(0.5)
    except Shutdown as stop:
        print(f"\n{stop.args[0]} received: stopping web, worker, beat and services…", flush=True)
        return 0
    except ServiceError as exc:
        print(f"\nmake run: {exc}", file=sys.stderr, flush=True)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"\nmake run: {' '.join(map(str, exc.cmd[1:]))} failed (exit {exc.returncode})",
              file=sys.stderr, flush=True)  # fmt: skip
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        supervisor.stop_all()
        print("Stopped.", flush=True)


def _print_banner(base: str, postgres: str, redis: str, stripe: str, provisioning: str) -> None:
    lines = [
        "",
        "=" * 72,
        "Switchyard is running (Ctrl-C stops everything started here)",
        "",
        f"  Portal           {base}/        (customers: sign up, or the demo login below)",
        "                   (no mail server here: e-mail, the sign-up link included, is printed",
        "                   in this terminal by the worker)",
        f"  Admin            {base}/admin/  (staff)",
        f"  API docs         {base}/api/docs/   (Swagger UI)",
        f"  API reference    {base}/api/redoc/  (Redoc)",
        f"  OpenAPI schema   {base}/api/schema/",
        f"  API base         {base}/api/v1/     (endpoints: see the API docs)",
    ]
    lines += ["", "  Demo logins (username / password):"]
    lines += [f"    {who:<34} {user} / {password}" for who, user, password in DEMO_LOGINS]
    # seed_demo creates this key because make run always sets DEBUG=1.
    lines += [
        "",
        "  Demo API key (Demo AI Lab, read and write), for the API docs' Authorize button:",
        f"    {DEMO_API_KEY}",
        f"    curl -H 'Authorization: Bearer {DEMO_API_KEY}' {base}/api/v1/sites",
    ]
    lines += [
        "",
        "  Services:",
        f"    PostgreSQL  {postgres}",
        f"    Redis       {redis}",
        f"    Stripe      {stripe}",
        f"  Provisioning    {provisioning}",
        f"  Processes: web (Django runserver), Celery worker, webhooks worker, Celery beat; logs of services in "
        f"{rel(LOG_DIR)}/",
        "=" * 72,
        "",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
