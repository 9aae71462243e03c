"""The agent's heartbeat carries its GPUs' telemetry, and its loop runs queued burn-ins."""

import switchyard_agent
from switchyard_agent import Agent

from tests.agent.test_gpu_telemetry import fixture


class RecordingClient:
    """Stands in for the API (the real endpoints are tested in tests/inventory)."""

    def __init__(self, answers: dict):
        self.answers, self.posts = answers, []

    def post(self, path: str, body: dict):
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
