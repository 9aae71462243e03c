"""Loaded first by `make test` (`-p tests.parallel`), before Django reads its settings.

The suite runs in two pytest-xdist workers (scripts/test.py). pytest-django gives each worker
its own test database (test_<name>_gw0, _gw1); this gives each its own Redis database too,
so that one worker's Celery worker, heartbeat buffers and FLUSHDB never meet the other's.
Worker gwN uses REDIS_URL's database minus N, passing over the databases other tests claim
(tests/test_make_run.py's smoke run). Without xdist it changes nothing.
"""

import os
from urllib.parse import urlparse, urlunparse

CLAIMED_REDIS_DBS = {13}  # tests/test_make_run.py: SMOKE_REDIS_DB


def worker_redis_url(redis_url: str, worker: str) -> str:
    """REDIS_URL for xdist worker `worker` ("gw0", "gw1", …)."""
    url = urlparse(redis_url)
    db = int(url.path.lstrip("/") or 0)
    free = [n for n in range(db, -1, -1) if n not in CLAIMED_REDIS_DBS or n == db]
    index = int(worker.removeprefix("gw"))
    if index >= len(free):
        raise RuntimeError(f"no Redis database left for xdist worker {worker} below db {db}")
    return urlunparse(url._replace(path=f"/{free[index]}"))


_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker and os.environ.get("REDIS_URL"):
    os.environ["SUITE_REDIS_URL"] = os.environ["REDIS_URL"]  # the one make test chose
    os.environ["REDIS_URL"] = worker_redis_url(os.environ["REDIS_URL"], _worker)
