"""The agent's heartbeat carries its GPUs' telemetry, and its loop runs queued burn-ins."""

import json
import os
import time

import pytest
import switchyard_agent
from switchyard_agent import Agent, AgentClient

from inventory.models import Gpu
from inventory.services import node_token_issue
from tests.agent.test_gpu_telemetry import fixture
from tests.provisioning_support import market_create


class RecordingClient:
    """Stands in for the API (the real endpoints are tested in tests/inventory)."""

    def __init__(self, answers: dict):
        self.answers, self.posts = answers, []

    def post(self, path: str, body: dict, *, request_id: str = ""):
        self.posts.append((path, body))
        return self.answers.get(path, (200, {}))


class NoContainers:
    def containers(self):
        return []

    def notices_apply(self, notices):
        pass


def test_the_heartbeat_carries_the_telemetry_report(monkeypatch):
    gpu_telemetry = switchyard_agent._gpu_telemetry
    report = gpu_telemetry.parse_nvidia_smi_xml(fixture("nvidia_h100_healthy.xml"))
    monkeypatch.setattr(gpu_telemetry, "telemetry_collect", lambda cursor: report)
    client = RecordingClient({})

    Agent(client=client, executor=NoContainers()).heartbeat()

    path, body = client.posts[0]
    assert path == "agent/heartbeat"
    assert body["telemetry"] is report
    assert [g["index"] for g in body["telemetry"]["gpus"]] == list(range(8))


def test_a_node_without_a_gpu_tool_sends_no_telemetry(monkeypatch):
    monkeypatch.setattr(switchyard_agent._gpu_telemetry.shutil, "which", lambda name: None)
    client = RecordingClient({})
    Agent(client=client, executor=NoContainers()).heartbeat()
    assert "telemetry" not in client.posts[0][1]


class Containers(NoContainers):
    def __init__(self, names: list[str]):
        self.names = names

    def containers(self):
        return [{"name": n, "reservation": n, "state": "running"} for n in self.names]


def test_an_idle_node_reports_its_empty_container_list_once(monkeypatch):
    monkeypatch.setattr(switchyard_agent._gpu_telemetry.shutil, "which", lambda name: None)
    client = RecordingClient({})
    agent = Agent(client=client, executor=NoContainers())

    for _ in range(3):
        agent.heartbeat()

    assert [path for path, _ in client.posts] == [
        "agent/heartbeat", "agent/workloads", "agent/heartbeat", "agent/heartbeat"
    ]  # fmt: skip


def test_a_refused_empty_report_is_sent_again_and_running_containers_every_time(monkeypatch):
    monkeypatch.setattr(switchyard_agent._gpu_telemetry.shutil, "which", lambda name: None)
    refused = RecordingClient({"agent/workloads": (503, None)})
    agent = Agent(client=refused, executor=NoContainers())
    agent.heartbeat()
    agent.heartbeat()
    assert [path for path, _ in refused.posts].count("agent/workloads") == 2

    client = RecordingClient({"agent/workloads": (200, {"notices": []})})
    executor = Containers(["sy-r1"])
    agent = Agent(client=client, executor=executor)
    agent.heartbeat()
    agent.heartbeat()  # running: a notice may come for it any time
    executor.names = []
    agent.heartbeat()  # it is gone: reported once more, then nothing
    agent.heartbeat()
    reports = [body["containers"] for path, body in client.posts if path == "agent/workloads"]
    assert [[c["name"] for c in r] for r in reports] == [["sy-r1"], ["sy-r1"], []]


def test_the_loop_runs_a_queued_burn_in_and_reports_it():
    job = {"id": 7, "command": "sh -c 'echo $CUDA_VISIBLE_DEVICES; exit 0'",
           "time_limit_seconds": 10, "gpu_indexes": [2, 5]}  # fmt: skip
    client = RecordingClient({"agent/burn-ins/lease": (200, job)})

    assert Agent(client=client, executor=NoContainers()).burn_in_one() is True

    path, body = client.posts[-1]
    assert path == "agent/burn-ins/7/result"
    assert body == {"exit_code": 0, "timed_out": False, "output": "2,5\n"}
    idle = RecordingClient({"agent/burn-ins/lease": (204, None)})
    assert Agent(client=idle, executor=NoContainers()).burn_in_one() is False


# --- the status file orchestrators probe (switchyard-agent --check) ------------------------


def test_an_accepted_heartbeat_is_recorded_in_the_status_file_and_a_refused_one_is_not(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(switchyard_agent._gpu_telemetry.shutil, "which", lambda name: None)
    status_file = tmp_path / "agent" / "status.json"

    refused = RecordingClient({"agent/heartbeat": (503, {"error": {}})})
    Agent(client=refused, executor=NoContainers(), status_file=status_file).heartbeat()
    assert not status_file.exists()

    Agent(client=RecordingClient({}), executor=NoContainers(), status_file=status_file).heartbeat()
    assert switchyard_agent.status_check(status_file, heartbeat_seconds=10) is None


def test_the_status_file_records_the_interval_the_api_set(tmp_path, monkeypatch):
    monkeypatch.setattr(switchyard_agent._gpu_telemetry.shutil, "which", lambda name: None)
    status_file = tmp_path / "status.json"
    client = RecordingClient({"agent/heartbeat": (200, {"heartbeat_seconds": 60})})

    Agent(client=client, executor=NoContainers(), status_file=status_file).heartbeat()

    assert json.loads(status_file.read_text())["heartbeat_seconds"] == 60.0
    # A probe configured for 10 s allows three of the agent's 60 s intervals.
    assert (
        switchyard_agent.status_check(status_file, heartbeat_seconds=10, now=time.time() + 170)
        is None
    )


def test_the_status_check_fails_when_the_last_heartbeat_is_stale_missing_or_unreadable(tmp_path):
    path = tmp_path / "status.json"
    assert "no heartbeat recorded yet" in switchyard_agent.status_check(path, heartbeat_seconds=10)

    switchyard_agent.status_write(path, now=1_000.0)
    assert switchyard_agent.status_check(path, heartbeat_seconds=10, now=1_030.0) is None
    assert switchyard_agent.status_check(path, heartbeat_seconds=10, now=1_031.0) == (
        "last accepted heartbeat 31 s ago (more than 30 s)"
    )

    path.write_text("{not json")
    assert "unreadable status file" in switchyard_agent.status_check(path, heartbeat_seconds=10)


def test_the_status_check_allows_three_of_the_intervals_the_agent_heartbeats_at(tmp_path):
    """The API may have set a longer interval than the config's: the file records it."""
    path = tmp_path / "status.json"
    switchyard_agent.status_write(path, heartbeat_seconds=60.0, now=1_000.0)

    assert switchyard_agent.status_check(path, heartbeat_seconds=10, now=1_180.0) is None
    assert switchyard_agent.status_check(path, heartbeat_seconds=10, now=1_181.0) == (
        "last accepted heartbeat 181 s ago (more than 180 s)"
    )
    switchyard_agent.status_write(path, heartbeat_seconds=5.0, now=1_000.0)  # 30 s at least
    assert switchyard_agent.status_check(path, heartbeat_seconds=60, now=1_031.0) == (
        "last accepted heartbeat 31 s ago (more than 30 s)"
    )
    path.write_text('{"last_heartbeat_at": 1000.0, "heartbeat_seconds": "often"}')
    assert "unreadable status file" in switchyard_agent.status_check(path, heartbeat_seconds=10)


def test_check_exits_0_on_a_fresh_heartbeat_and_1_otherwise_without_a_token(tmp_path, capsys):
    path = tmp_path / "status.json"
    argv = ["--check", "--api", "http://127.0.0.1:9", "--status-file", str(path),
            "--heartbeat-seconds", "10", "--token-file", str(tmp_path / "absent")]  # fmt: skip

    assert switchyard_agent.main(argv) == 1
    assert "no heartbeat recorded yet" in capsys.readouterr().err

    switchyard_agent.status_write(path)
    assert switchyard_agent.main(argv) == 0
    assert capsys.readouterr().out.strip() == "switchyard-agent: ok"


# --- readings Switchyard refuses never cost the node its heartbeat ---------------------------


def _nvidia_smi_on_path(tmp_path, monkeypatch, xml: str) -> None:
    """A stand-in nvidia-smi printing `xml` (this machine has no GPU), first on PATH."""
    (tmp_path / "nvidia-smi.xml").write_text(xml)
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\ncat {tmp_path / 'nvidia-smi.xml'}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}:{os.environ['PATH']}")


def _live_agent(live_server, node) -> Agent:
    _token, secret = node_token_issue(node=node, label="site agent")
    return Agent(client=AgentClient(api=live_server.url, token=secret), executor=NoContainers())


@pytest.mark.django_db(transaction=True)
def test_an_absurd_reading_is_sent_as_unknown_and_the_heartbeat_is_accepted(
    live_server, tmp_path, monkeypatch
):
    """A sensor reading 255 °C was a 400 for the whole heartbeat: the node went offline."""
    node = market_create(nodes=1, gpus=8).nodes[0]
    xml = fixture("nvidia_h100_healthy.xml").replace(
        "<gpu_temp>61 C</gpu_temp>", "<gpu_temp>255 C</gpu_temp>", 1
    )
    _nvidia_smi_on_path(tmp_path, monkeypatch, xml)
    agent = _live_agent(live_server, node)
    sent = []
    post = agent.client.post
    agent.client.post = lambda path, body, **kw: sent.append((path, body)) or post(path, body, **kw)

    assert agent.heartbeat() is True

    assert [path for path, _ in sent] == ["agent/heartbeat", "agent/workloads"]
    gpus = sent[0][1]["telemetry"]["gpus"]
    assert [g["temperature_c"] for g in gpus] == [None, *[61.0] * 3, *[34.0] * 4]
    assert gpus[0]["power_w"] == 612.87  # the GPU's other readings stay
    node.refresh_from_db()
    assert node.last_heartbeat_at is not None
    assert node.telemetry_error == ""
    assert list(Gpu.objects.filter(node=node).values_list("health", flat=True)) == ["ok"] * 8


@pytest.mark.django_db(transaction=True)
def test_telemetry_the_api_refuses_is_dropped_with_its_reason_and_the_node_stays_alive(
    live_server, tmp_path, monkeypatch
):
    """nvidia-smi lists 8 GPUs, the inventory has 4 (the others not for sale): the readings of
    GPU 4 are refused (400), so the heartbeat goes again without readings, saying why."""
    node = market_create(nodes=1, gpus=4).nodes[0]
    _nvidia_smi_on_path(tmp_path, monkeypatch, fixture("nvidia_h100_healthy.xml"))
    agent = _live_agent(live_server, node)

    assert agent.heartbeat() is True

    node.refresh_from_db()
    assert node.last_heartbeat_at is not None
    assert node.telemetry_error == (
        "telemetry refused by Switchyard: telemetry.gpus.4.index: GPU 4 does not exist on "
        "this node."
    )
    assert list(Gpu.objects.filter(node=node).values_list("health", flat=True)) == ["ok"] * 4


def test_a_heartbeat_refused_for_another_reason_than_its_telemetry_is_not_sent_again(
    monkeypatch,
):
    monkeypatch.setattr(switchyard_agent._gpu_telemetry.shutil, "which", lambda name: None)
    client = RecordingClient({"agent/heartbeat": (400, {"error": {"code": "parse_error"}})})

    assert Agent(client=client, executor=NoContainers()).heartbeat() is False

    assert [path for path, _ in client.posts] == ["agent/heartbeat"]
