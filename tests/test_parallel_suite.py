"""`make test` runs the suite in two xdist workers (scripts/test.py), each with its own test
database and Redis database (tests/parallel.py), so that one worker's Celery worker, FLUSHDB
or heartbeat buffers never reach the other's."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from tests.parallel import worker_redis_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))  # its imports
# scripts/test.py, by its path (`import test` would be the standard library's package).
_spec = importlib.util.spec_from_file_location(
    "scripts_test", Path(__file__).resolve().parent.parent / "scripts" / "test.py"
)
_scripts_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_scripts_test)
PARALLEL_ARGS, pytest_command = _scripts_test.PARALLEL_ARGS, _scripts_test.pytest_command


@pytest.mark.parametrize(
    ("worker", "expected"),
    [("gw0", 15), ("gw1", 14), ("gw2", 12), ("gw3", 11)],  # 13 is the make run smoke test's
)
def test_each_worker_gets_its_own_redis_database(worker, expected):
    url = worker_redis_url("redis://:pw@10.0.0.5:6380/15", worker)

    assert url == f"redis://:pw@10.0.0.5:6380/{expected}"


def test_a_worker_past_database_zero_is_refused():
    assert worker_redis_url("redis://127.0.0.1:6379/1", "gw1") == "redis://127.0.0.1:6379/0"
    with pytest.raises(RuntimeError, match="no Redis database left for xdist worker gw2"):
        worker_redis_url("redis://127.0.0.1:6379/1", "gw2")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], PARALLEL_ARGS),
        (["tests/billing", "-x"], [*PARALLEL_ARGS, "tests/billing", "-x"]),
        (["-n", "0", "tests/billing"], ["-n", "0", "tests/billing"]),
        (["-n4"], ["-n4"]),
        (["--numprocesses=auto"], ["--numprocesses=auto"]),
        (["-p", "no:xdist"], ["-p", "no:xdist"]),
        (["tests/billing", "--pdb"], ["tests/billing", "--pdb"]),  # a debugger: one process
        (["-s", "tests/billing"], ["-s", "tests/billing"]),
    ],
)
def test_the_suite_runs_in_two_workers_unless_the_arguments_choose(given, expected):
    assert pytest_command(given) == expected


@pytest.mark.django_db
def test_this_worker_has_its_own_database_and_redis():
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        pytest.skip("run in one process (-n 0): nothing is shared")
    assert connection.settings_dict["NAME"].endswith(f"_{worker}")
    assert settings.REDIS_URL == os.environ["REDIS_URL"]
    assert settings.REDIS_URL == worker_redis_url(os.environ["SUITE_REDIS_URL"], worker)
