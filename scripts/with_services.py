"""Run one command with DATABASE_URL and REDIS_URL pointing at a reachable PostgreSQL and Redis.

    python scripts/with_services.py [--stripe] -- COMMAND ...

Services are chosen as for `make run` (configured, else system, else embedded; see
devservices.py). Embedded ones started here stop when the command ends. With --stripe and no
STRIPE_SECRET_KEY, a localstripe is started too. Used by make migrate, seed, worker, beat.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from devservices import (
    ROOT,
    RUN_DIR,
    ServiceError,
    Supervisor,
    ensure_postgres,
    ensure_redis,
    ensure_stripe,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stripe", action="store_true", help="also provide Stripe settings")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")

    RUN_DIR.mkdir(parents=True, exist_ok=True)
    supervisor = Supervisor()
    try:
        postgres = ensure_postgres(supervisor)
        redis = ensure_redis(supervisor)
        env = {**os.environ, "DEBUG": os.environ.get("DEBUG", "1"),
               "DATABASE_URL": postgres.url, "REDIS_URL": redis.url}  # fmt: skip
        descriptions = [postgres.description, redis.description]
        if args.stripe:
            stripe_env, stripe_description = ensure_stripe(supervisor)
            env.update(stripe_env)
            descriptions.append(stripe_description)
        print("Using " + "; ".join(descriptions), file=sys.stderr, flush=True)
        child = subprocess.Popen(command, cwd=ROOT, env=env)
        # Ctrl-C reaches the command directly (same process group); SIGTERM is passed on.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda signum, _frame: child.send_signal(signum))
        return child.wait()
    except ServiceError as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop_all()


if __name__ == "__main__":
    sys.exit(main())
