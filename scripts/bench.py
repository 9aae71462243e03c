"""`make bench`: run every bench/*.py script, in name order, against real services.

Each benchmark is a plain script that prints its own figures; it gets DEBUG=1 and the
DATABASE_URL / REDIS_URL chosen as for `make test` (see devservices.py). Benchmark authors add
files to bench/; nothing here needs to change.
"""

from __future__ import annotations

import os
import subprocess
import sys

from devservices import ROOT, ServiceError, Supervisor, ensure_postgres, ensure_redis


def main() -> int:
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py") if not p.name.startswith("_"))
    if not scripts:
        print("No benchmarks yet: add scripts to bench/ (each bench/*.py is run by make bench).")
        return 0
    supervisor = Supervisor()
    try:
        postgres = ensure_postgres(supervisor, database="switchyard_bench")
        redis = ensure_redis(supervisor, db=14, persistent=False)
        env = {**os.environ, "DEBUG": "1", "DATABASE_URL": postgres.url, "REDIS_URL": redis.url,
               "PYTHONPATH": str(ROOT)}  # fmt: skip
        failed = []
        for script in scripts:
            print(f"\n=== {script.relative_to(ROOT)} ===", flush=True)
            if subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env).returncode:
                failed.append(script.name)
        if failed:
            print(f"\nFailed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    except ServiceError as exc:
        print(f"make bench: {exc}", file=sys.stderr)
        return 1
    finally:
        supervisor.stop_all()


if __name__ == "__main__":
    sys.exit(main())
