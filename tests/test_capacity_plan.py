"""scripts/capacity_plan.py turns a fleet's rates and the measured per-core limits into
machines per tier (docs/scaling.md)."""

import math
import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "capacity_plan.py"
TIERS = [
    "web (gunicorn)",
    "PostgreSQL primary",
    "PostgreSQL replicas",
    "Redis",
    "Celery provisioning",
    "Celery billing",
    "Celery telemetry",
    "Celery webhooks",
]


def _limits() -> dict[str, float]:
    return runpy.run_path(str(SCRIPT))["LIMITS"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, check=False
    )


def _plan(*args: str) -> dict[str, tuple[float, int]]:
    result = _run(*args)
    assert result.returncode == 0, result.stderr
    plan = {}
    for tier in TIERS:
        line = next(line for line in result.stdout.splitlines() if line.startswith(tier))
        numbers = re.findall(r"[\d,]+\.?\d*", line[len(tier) :])
        load, cores, machines = numbers[0], numbers[1], numbers[2]
        plan[tier] = (float(cores), int(machines))  # "1*": one instance, larger machine
        assert float(load.replace(",", "")) > 0
    return plan


def test_a_million_gpus_fleet_gets_machines_for_every_tier():
    result = _run()

    assert result.returncode == 0, result.stderr
    assert "1,000,000 GPUs on 125,000 nodes" in result.stdout
    # 125,000 nodes every 30 s, 8 GPUs' samples each.
    assert "4,167 heartbeats/s" in result.stdout
    assert "33,333 telemetry samples/s" in result.stdout
    plan = _plan()
    assert all(machines >= 1 for _, machines in plan.values())


def test_a_primary_that_outgrows_the_machine_is_not_spread_over_several():
    result = _run("--cores-per-machine", "8")

    line = next(
        line for line in result.stdout.splitlines() if line.startswith("PostgreSQL primary")
    )
    assert " 1* " in line
    # Planned at 50 %: the primary's cores doubled, rounded up, on one machine.
    cores = float(re.findall(r"[\d,]+\.?\d*", line[len("PostgreSQL primary") :])[1])
    assert cores > 4  # more than an 8-core machine takes at 50 %
    assert f"one machine of {math.ceil(cores * 2)}+ cores, or split" in line


def test_machines_follow_the_fleet_and_the_measured_limits():
    small, large = _plan("--gpus", "100000"), _plan("--gpus", "1000000")
    # Ten times the fleet: ten times the web's cores (as printed, to a tenth).
    assert abs(large["web (gunicorn)"][0] - 10 * small["web (gunicorn)"][0]) <= 0.5
    # Twice the web's per-core rates: half the web cores.
    doubled = [
        f"--{name.replace('_', '-')}={2 * value}"
        for name, value in _limits().items()
        if name.startswith("web_")
    ]
    faster = _plan(*doubled)
    assert abs(faster["web (gunicorn)"][0] - large["web (gunicorn)"][0] / 2) <= 0.1
    # Bigger machines: fewer of them.
    assert _plan("--cores-per-machine", "64")["web (gunicorn)"][1] < large["web (gunicorn)"][1]


def test_bad_input_is_refused_with_a_message():
    for args, message in [
        (["--gpus", "0"], "--gpus must be positive"),
        (["--utilisation", "1.5"], "--utilisation must be in (0, 1]"),
        (["--web-reads-per-core", "-1"], "--web-reads-per-core must be positive"),
    ]:
        result = _run(*args)
        assert result.returncode == 2
        assert message in result.stderr
