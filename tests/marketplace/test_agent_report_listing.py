"""Switchyard ends a reservation whose container is missing from its node's workload report,
so the agent sends a report only when it is complete: a container its runtime failed to
inspect, but still lists, makes no report at all (not one without it). The runtime's CLI is
played by stubs here: the listing's failure modes cannot be produced on demand with a real
one."""

import json
import subprocess

import pytest
import switchyard_agent
from switchyard_agent import ContainerExecutor, ExecutorError


class _Runtime:
    """`ps` lists `listed` (then `listed_after`), `inspect` knows only `inspectable`."""

    def __init__(self, *, listed, inspectable, listed_after=None):
        self.listings = [listed, listed if listed_after is None else listed_after]
        self.inspectable = inspectable

    def run(self, args, **kwargs) -> str:
        assert args[0] == "ps"
        names = self.listings.pop(0) if len(self.listings) > 1 else self.listings[0]
        return "\n".join(names)

    def cli(self, args, **kwargs) -> subprocess.CompletedProcess:
        assert args[:2] == ["container", "inspect"]
        found = [
            {
                "Name": f"/{n}",
                "Config": {"Labels": {switchyard_agent.LABEL_RESERVATION: n[3:]}, "Env": []},
                "State": {"Status": "running", "Running": True},
            }
            for n in args[2:]
            if n in self.inspectable
        ]
        missing = [n for n in args[2:] if n not in self.inspectable]
        stderr = "".join(f"Error: no such container {n}\n" for n in missing)
        return subprocess.CompletedProcess(args, 125 if missing else 0, _json(found), stderr)


def _json(items) -> str:
    return json.dumps(items) if items else ""  # a runtime that found nothing prints nothing


def _executor(monkeypatch, tmp_path, runtime: _Runtime) -> ContainerExecutor:
    executor = ContainerExecutor(host="127.0.0.1", runtime="true", state_dir=str(tmp_path))
    monkeypatch.setattr(executor, "_run", runtime.run)
    monkeypatch.setattr(executor, "_cli", runtime.cli)
    return executor


def test_a_container_the_runtime_lists_but_fails_to_inspect_makes_no_report(monkeypatch, tmp_path):
    runtime = _Runtime(listed=["sy-r_a", "sy-r_b"], inspectable=set())
    executor = _executor(monkeypatch, tmp_path, runtime)
    with pytest.raises(ExecutorError, match="inspect failed for sy-r_a, sy-r_b"):
        executor.containers()


def test_a_container_removed_between_listing_and_inspecting_is_left_out(monkeypatch, tmp_path):
    runtime = _Runtime(listed=["sy-r_a", "sy-r_b"], inspectable={"sy-r_a"}, listed_after=["sy-r_a"])
    executor = _executor(monkeypatch, tmp_path, runtime)
    assert [c["name"] for c in executor.containers()] == ["sy-r_a"]


def test_every_container_inspected_is_reported(monkeypatch, tmp_path):
    runtime = _Runtime(listed=["sy-r_a", "sy-r_b"], inspectable={"sy-r_a", "sy-r_b"})
    executor = _executor(monkeypatch, tmp_path, runtime)
    report = executor.containers()
    assert [(c["name"], c["reservation"], c["state"]) for c in report] == [
        ("sy-r_a", "r_a", "running"),
        ("sy-r_b", "r_b", "running"),
    ]
