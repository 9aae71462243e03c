"""Python instructions per request, counted by valgrind's callgrind (not run by `make bench`:
it takes minutes under valgrind).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_bench REDIS_URL=redis://127.0.0.1:6379/3 \
        .venv/bin/python bench/_instructions.py          # --kind create --count 50

Kinds: `create` (a reservation naming its site), `floor` (GET /api/v1/gpu-models with the
key) and `bare` (GET /healthz), the marketplace benchmark's three lines (bench_marketplace.py).
Uses that benchmark's generated data (<name>_marketplace; run bench/bench_marketplace.py once
first). Runs this script twice under `valgrind --tool=callgrind`: both start Django and make
warm-up requests of the kind, one then makes --count more through the API in process
(Django's test client: the whole middleware and DRF stack, an API key, DEBUG off), and prints
the difference of the two instruction counts divided by --count. Only this process is
counted: PostgreSQL's and Redis's work is not. Unlike a wall-clock rate, the count hardly
moves with the machine's load. The test client's own work is in every kind alike.
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = {"create": 10, "floor": 200, "bare": 200}


def _child(kind: str, count: int) -> None:
    os.environ.update(
        DEBUG="0",
        SECRET_KEY="instructions-" + "x" * 50,
        ALLOWED_HOSTS="testserver",
        SECURE_SSL_REDIRECT="0",
        API_THROTTLE_RATE="1000000/min",
    )
    sys.path.insert(0, str(ROOT / "bench"))
    import random

    import bench_marketplace as bench  # sets Django up on the generated database
    from django.test import Client

    _, secret = bench.api_org_and_key()
    client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    if kind != "create":
        path = "/healthz" if kind == "bare" else "/api/v1/gpu-models"
        for _ in range(WARM_UP[kind] + count):
            assert client.get(path).status_code == 200
        return
    rng = random.Random(11)
    created = 0
    try:
        for _ in range(WARM_UP[kind] + count):
            body = bench.random_create(rng)
            response = client.post("/api/v1/reservations", body, content_type="application/json")
            created += response.status_code == 201
    finally:
        bench.cleanup()
    print(f"created {created}", file=sys.stderr)


def _instructions(kind: str, count: int) -> int:
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, __file__, "--kind", kind, "--child", str(count)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        sys.exit(f"no instruction count in valgrind's output:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=sorted(WARM_UP), default="create")
    parser.add_argument("--count", type=int, default=None, help="50 creates, else 1,000")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.kind, args.child)
        return
    count = args.count or (50 if args.kind == "create" else 1000)
    base = _instructions(args.kind, 0)
    full = _instructions(args.kind, count)
    each = (full - base) / count
    print(
        f"Python instructions per {args.kind} request through the API (callgrind, {count} "
        f"after {WARM_UP[args.kind]} to warm up): {each / 1e3:,.0f} k "
        f"(start-up and warm-up: {base / 1e6:,.0f} M)"
    )


if __name__ == "__main__":
    main()
