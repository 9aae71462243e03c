"""Python instructions per reservation create, counted by valgrind's callgrind (not run by
`make bench`: it takes minutes under valgrind).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/sy_bench REDIS_URL=redis://127.0.0.1:6379/3 \
        .venv/bin/python bench/_create_instructions.py          # --creates 50

Uses the marketplace benchmark's generated data (<name>_marketplace; run
bench/bench_marketplace.py once first). Runs this script twice under
`valgrind --tool=callgrind`: both start Django and make 10 creates to warm up, one then makes
--creates more through the API in process (Django's test client: the whole middleware and
DRF stack, an API key, a site named, DEBUG off), and prints the difference of the two
instruction counts divided by --creates. Only this process is counted: PostgreSQL's and
Redis's work is not. Unlike a wall-clock rate, the count hardly moves with the machine's load.
"""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARM_UP = 10


def _child(creates: int) -> None:
    os.environ.update(
        DEBUG="0",
        SECRET_KEY="instructions-" + "x" * 50,
        ALLOWED_HOSTS="testserver",
        SECURE_SSL_REDIRECT="0",
        API_THROTTLE_RATE="1000000/min",
    )
    sys.path.insert(0, str(ROOT / "bench"))
    import random
    from datetime import timedelta

    import bench_marketplace as bench  # sets Django up on the generated database
    from django.test import Client
    from django.utils import timezone

    _, secret = bench.api_org_and_key()
    client = Client(HTTP_AUTHORIZATION=f"Bearer {secret}")
    rng = random.Random(11)
    created = 0
    try:
        for _ in range(WARM_UP + creates):
            start = timezone.now() + timedelta(days=rng.randint(1, 120), hours=rng.randint(0, 23))
            body = {
                "gpu_model": rng.choice(bench.MODELS)[0],
                "gpu_count": rng.choice([1, 1, 2, 4, 8]),
                "starts_at": start.replace(microsecond=0).isoformat(),
                "ends_at": (start + timedelta(hours=rng.randint(1, 12)))
                .replace(microsecond=0)
                .isoformat(),
                "tier": "on_demand",
                "site": f"bench-{rng.randrange(bench.SITES):02d}",
            }
            response = client.post("/api/v1/reservations", body, content_type="application/json")
            created += response.status_code == 201
    finally:
        bench.cleanup()
    print(f"created {created}", file=sys.stderr)


def _instructions(creates: int) -> int:
    result = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, __file__, "--child", str(creates)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        sys.exit(f"no instruction count in valgrind's output:\n{result.stderr[-2000:]}")
    return int(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--creates", type=int, default=50)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        _child(args.child)
        return
    base = _instructions(0)
    full = _instructions(args.creates)
    per_create = (full - base) / args.creates
    print(
        f"Python instructions per create through the API (callgrind, {args.creates} creates "
        f"after {WARM_UP} to warm up): {per_create / 1e6:.1f} M "
        f"(start-up and warm-up: {base / 1e6:.0f} M)"
    )


if __name__ == "__main__":
    main()
