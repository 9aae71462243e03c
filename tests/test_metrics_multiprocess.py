"""Under gunicorn with several workers, one scrape of /metrics reports every worker's requests."""

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from django.conf import settings
from prometheus_client.mmap_dict import MmapedDict

from tests.provisioning_support import database_url

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "m" * 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, **headers) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture
def gunicorn(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left by an earlier run")
    port = _free_port()
    env = {
        **os.environ,
        "DEBUG": "0",
        "SECRET_KEY": "s" * 20 + "Q7v!x9#Lm2@pR5$tW8^zB4&nC6*dF1(hJ3)" + "k" * 10,
        "ALLOWED_HOSTS": "127.0.0.1",
        "DATABASE_URL": database_url(settings.DATABASES["default"]),
        "METRICS_TOKEN": TOKEN,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "config/gunicorn.py", "config.wsgi:application",
         "--bind", f"127.0.0.1:{port}", "--workers", "3"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if _get(f"{base}/healthz")[0] == 200:
                break
        except OSError:
            time.sleep(0.2)
    else:
        process.kill()
        raise RuntimeError(process.stderr.read().decode()[-3000:])
    yield base, metrics_dir
    process.terminate()
    process.wait(timeout=20)


def _through_tls_proxy(url: str) -> int:
    # As the TLS proxy forwards it; /metrics is scraped directly, over plain HTTP.
    return _get(url, **{"X-Forwarded-Proto": "https"})[0]


def _served_per_worker(metrics_dir: Path) -> list[float]:
    """The 401 responses each worker counted in its own file."""
    served = []
    for path in metrics_dir.glob("counter_*.db"):
        if path.stat().st_size < 8:
            continue  # a worker creating its file this moment (not yet sized): it served none
        values = MmapedDict.read_all_values_from_file(str(path))
        served.append(
            sum(
                value for key, value, *_ in values if "status_view_method" in key and '"401"' in key
            )
        )
    return served


def test_one_scrape_sums_the_requests_every_worker_served(gunicorn):
    base, metrics_dir = gunicorn
    # Ten at a time: each sync worker serves one request at once, so the workers share them.
    # /healthz answered as soon as one worker was up; on a slow host the others may still be
    # loading Django, so batches go on until at least two workers have served some.
    sent = 0
    deadline = time.monotonic() + 60
    with ThreadPoolExecutor(10) as pool:
        while True:
            codes = list(pool.map(lambda _: _through_tls_proxy(f"{base}/api/v1/sites"), range(30)))
            assert codes == [401] * 30
            sent += 30
            served = _served_per_worker(metrics_dir)
            if len([n for n in served if n]) >= 2 or time.monotonic() > deadline:
                break

    scrapes = [_get(f"{base}/metrics", Authorization=f"Bearer {TOKEN}") for _ in range(6)]

    assert not (metrics_dir / "counter_999999.db").exists()  # emptied when gunicorn started
    served = _served_per_worker(metrics_dir)
    assert sum(served) == sent
    assert len([n for n in served if n]) >= 2, served
    pattern = re.compile(
        r'^django_http_responses_total_by_status_view_method_total\{[^}]*status="401"[^}]*\} (\S+)$',
        re.M,
    )
    for status, text in scrapes:
        assert status == 200
        assert sum(float(v) for v in pattern.findall(text)) == sent
    assert _get(f"{base}/metrics")[0] == 403  # no token, not an allowed address
