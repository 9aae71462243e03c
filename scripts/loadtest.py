"""`make loadtest`: bench/loadtest/run.py against real PostgreSQL and Redis, chosen as for
`make test` (see devservices.py); without DATABASE_URL / REDIS_URL it works in the database
switchyard_loadtest (dropped and created anew) and Redis db 13. Arguments go through:
`make loadtest LOADTEST_ARGS="--users 80 --duration 120"`."""

from __future__ import annotations

import os
import subprocess
import sys

from devservices import ROOT, ServiceError, Supervisor, ensure_postgres, ensure_redis


def main() -> int:
    supervisor = Supervisor()
    try:
        postgres = ensure_postgres(supervisor, database="switchyard")
        redis = ensure_redis(supervisor, db=13, persistent=False)
        env = {**os.environ, "DATABASE_URL": postgres.url, "REDIS_URL": redis.url}
        command = [sys.executable, str(ROOT / "bench" / "loadtest" / "run.py"), *sys.argv[1:]]
        return subprocess.run(command, cwd=ROOT, env=env).returncode
    except ServiceError as exc:
        print(f"make loadtest: {exc}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop_all()


if __name__ == "__main__":
    sys.exit(main())
