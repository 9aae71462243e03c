"""The agent's id: made once in its state directory (a restart keeps it) and sent with every
request, so Switchyard refuses a second agent using the node's token (a copied token, a cloned
node) instead of letting its empty report restart the node's workloads and its leases run
them elsewhere (the API's side: tests/marketplace/test_agent_one_per_token.py). Run with real
agents against the API on a live server."""

import logging
import stat

import pytest
from switchyard_agent import Agent, AgentClient, DryRunExecutor, agent_instance_id

from inventory.auth import AGENT_INSTANCE_KEY
from inventory.services import node_token_issue
from inventory.telemetry import buffer_client
from marketplace.models import AgentJob, AgentJobStatus, Allocation, Reservation
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import reservation_provision_step
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create


def test_the_id_is_made_once_and_kept(tmp_path):
    made = agent_instance_id(str(tmp_path))

    path = tmp_path / "agent-id"
    assert len(made) == 32 and int(made, 16) >= 0
    assert path.read_text() == made + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert agent_instance_id(str(tmp_path)) == made  # a restart keeps it
    path.write_text("not an id\n")
    replaced = agent_instance_id(str(tmp_path))
    assert replaced != made and path.read_text() == replaced + "\n"


class _Runs(DryRunExecutor):
    """Runs nothing, and reports the containers it was asked to start as running."""

    def __init__(self):
        super().__init__(host="gpu.site.example")
        self.started: list[dict] = []

    def run(self, kind, payload, progress):
        if kind == "start":
            self.started.append(
                {
                    "name": payload["container_name"],
                    "reservation": payload["reservation"],
                    "state": "running",
                }
            )
        return super().run(kind, payload, progress)

    def containers(self):
        return list(self.started)


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("allow_all_funding")
def test_a_second_agent_with_the_token_is_refused_and_the_workload_runs_on(
    live_server, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="switchyard.agent")
    market = market_create(nodes=1, gpus=2)
    r = market.book(gpu_count=1)
    driver = SiteAgentDriver()
    assert reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0).outcome
    node = Allocation.objects.filter(reservation=r).first().node
    _token, secret = node_token_issue(node=node, label="site agent")
    # Node ids repeat across sessions (a fresh test database): no id is held from before.
    buffer_client().delete(AGENT_INSTANCE_KEY.format(node_id=node.pk))

    def agent(name: str, executor) -> Agent:
        (tmp_path / name).mkdir()
        instance = agent_instance_id(str(tmp_path / name))
        client = AgentClient(api=live_server.url, token=secret, instance=instance)
        return Agent(client=client, executor=executor, lease_seconds=30)

    first = agent("first", _Runs())
    first.loop(poll_seconds=0.1, heartbeat_seconds=60, once=True)
    reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0)
    assert Reservation.objects.get(pk=r.pk).status == "active"
    first.heartbeat()  # reports its container running
    other = market.book(gpu_count=1)
    reservation_provision_step(reservation_id=other.pk, driver=driver, check_window=0)

    # The same token on another machine, which runs none of the node's containers.
    caplog.clear()
    second = agent("second", DryRunExecutor(host="clone.site.example"))
    second.loop(poll_seconds=0.1, heartbeat_seconds=60, once=True)

    # It says why once, and leases nothing (no job, no burn-in) while refused.
    said = [r.getMessage() for r in caplog.records if r.name == "switchyard.agent"]
    assert len(said) == 1
    assert said[0].startswith(
        f"refused, so no job runs here: Another site agent (id {first.client.instance[:8]}…) "
        f"is using node {node.hostname}'s token"
    )
    assert second.lease() is None and second.conflict is not None
    r = Reservation.objects.get(pk=r.pk)
    assert (r.status, r.placement_generation) == ("active", 0)
    assert set(AgentJob.objects.filter(reservation=other).values_list("status", flat=True)) == {
        AgentJobStatus.QUEUED
    }
    # The node's own agent goes on: it runs the next booking's jobs.
    first.loop(poll_seconds=0.1, heartbeat_seconds=60, once=True)
    assert set(AgentJob.objects.filter(reservation=other).values_list("status", flat=True)) == {
        AgentJobStatus.DONE
    }


def test_the_agents_own_files_are_not_taken_for_notice_folders(executor_factory, caplog):
    # Each heartbeat with containers applies the notices: it logged "no notice folder for
    # agent.lock: Not a directory" (and status.json's) every time.
    executor = executor_factory()
    executor.state_dir.mkdir(parents=True)
    agent_instance_id(str(executor.state_dir))
    for name in ("agent.lock", "status.json"):
        (executor.state_dir / name).write_text("{}\n")
    (executor.state_dir / "sy-rsv_gone").mkdir()
    (executor.state_dir / "sy-rsv_gone" / "preemption").write_text("{}\n")
    caplog.set_level(logging.INFO, logger="switchyard.agent")

    executor.notices_apply([])

    assert caplog.messages == []
    assert not (executor.state_dir / "sy-rsv_gone" / "preemption").exists()  # withdrawn
