"""Burn-in before sale: through the node's agent (its API and the stdlib runner, with real
commands), nothing sold until it passes, the output kept for staff."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agent.burn_in import burn_in_run
from config.errors import Conflict, InvalidTransition, NotAvailable, ValidationFailed
from inventory.burn_in import burn_in_report, burn_in_request, burn_ins_expire
from inventory.models import BurnIn, Gpu, GpuHealth, Node, NodeStatus, Outage
from inventory.services import node_token_issue, status_change
from inventory.telemetry import gpu_health_apply, gpu_return_to_service
from tests.factories import NodeFactory
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]


@pytest.fixture
def market():
    market = market_create(nodes=1, gpus=4)
    market.site.burn_in_command = "sh -c 'echo dcgm diag: all tests passed'"
    market.site.burn_in_time_limit_seconds = 20
    market.site.save()
    return market


@pytest.fixture
def node(market):
    return market.nodes[0]


@pytest.fixture
def agent(node, api_client):
    _, secret = node_token_issue(node=node, label="agent")
    api_client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return api_client


def fail(gpu):
    gpu_health_apply(
        gpu=gpu, health=GpuHealth.FAILED, reason="Xid 79", actor_label="t", now=timezone.now()
    )


def run_through_agent(agent) -> dict:
    """What the agent's loop does: lease, run for real, report."""
    leased = agent.post("/api/v1/agent/burn-ins/lease")
    assert leased.status_code == 200, leased.content
    job = leased.json()
    result = burn_in_run(job)
    reply = agent.post(
        f"/api/v1/agent/burn-ins/{job['id']}/result",
        {k: result[k] for k in ("exit_code", "timed_out", "output")},
        format="json",
    )
    assert reply.status_code == 200, reply.content
    return {**job, **reply.json()}


def test_a_failed_gpu_is_sold_again_only_after_its_burn_in_passes(market, node, agent):
    gpu = node.gpus.get(index=2)
    fail(gpu)
    burn_in = burn_in_request(node=node, gpus=[gpu], reason="GPU reseated", requested_by="ops")
    with pytest.raises(NotAvailable):
        market.book(gpu_count=4)  # queued: still not sold
    assert Gpu.objects.get(pk=gpu.pk).health_reason == f"burn-in #{burn_in.pk} queued: GPU reseated"

    done = run_through_agent(agent)

    assert (done["id"], done["gpu_indexes"], done["status"]) == (burn_in.pk, [2], "passed")
    burn_in.refresh_from_db()
    assert (burn_in.exit_code, burn_in.output) == (0, "dcgm diag: all tests passed\n")
    gpu.refresh_from_db()
    assert gpu.health == GpuHealth.OK
    assert Outage.objects.get(gpu=gpu).ended_at is not None
    assert gpu.health_changes.first().reason.startswith(f"burn-in #{burn_in.pk} passed")
    assert market.book(gpu_count=4).gpu_count == 4
    assert agent.post("/api/v1/agent/burn-ins/lease").status_code == 204


def test_a_failing_burn_in_keeps_the_gpu_out_with_its_output(market, node, agent):
    market.site.burn_in_command = "sh -c 'echo \"GPU 2: memory test FAILED at 0x3f\"; exit 3'"
    market.site.save()
    gpu = node.gpus.get(index=2)
    fail(gpu)
    burn_in_request(node=node, gpus=[gpu], reason="after RMA", requested_by="ops")

    done = run_through_agent(agent)

    assert done["status"] == "failed"
    burn_in = BurnIn.objects.get(pk=done["id"])
    assert (burn_in.exit_code, burn_in.timed_out) == (3, False)
    assert burn_in.output == "GPU 2: memory test FAILED at 0x3f\n"
    gpu.refresh_from_db()
    assert (gpu.health, gpu.health_reason) == (
        GpuHealth.FAILED,
        f"burn-in #{burn_in.pk} failed (exit 3); see its output",
    )
    with pytest.raises(NotAvailable):
        market.book(gpu_count=4)


def test_a_burn_in_past_its_time_limit_is_killed_and_fails(market, node, agent):
    market.site.burn_in_command = "sh -c 'echo started; sleep 30'"
    market.site.burn_in_time_limit_seconds = 1
    market.site.save()
    gpu = node.gpus.get(index=0)
    fail(gpu)
    burn_in_request(node=node, gpus=[gpu], reason="test", requested_by="ops")

    done = run_through_agent(agent)

    burn_in = BurnIn.objects.get(pk=done["id"])
    assert (burn_in.status, burn_in.timed_out, burn_in.exit_code) == ("failed", True, None)
    assert burn_in.output == "started\n"
    assert Gpu.objects.get(pk=gpu.pk).health_reason.endswith("failed (timed out); see its output")


def test_a_node_back_from_maintenance_returns_when_its_burn_in_passes(market, node, agent):
    with pytest.raises(InvalidTransition):
        burn_in_request(node=node, reason="new install", requested_by="ops")
    status_change(
        action="set_maintenance", node=node, actor=None, actor_label="ops", reason="PSU swap"
    )
    burn_in_request(node=node, reason="PSU swapped", requested_by="ops")

    done = run_through_agent(agent)

    node.refresh_from_db()
    assert (done["gpu_indexes"], node.status) == ([], NodeStatus.AVAILABLE)
    change = node.status_changes.first()
    assert change.actor_label == "system: burn-in"
    assert change.reason == f"burn-in #{done['id']} passed ({market.site.burn_in_command})"


def test_requests_are_checked(market, node):
    gpu = node.gpus.get(index=1)
    with pytest.raises(InvalidTransition):
        burn_in_request(node=node, gpus=[gpu], reason="x", requested_by="ops")  # ok GPU, in sale
    fail(gpu)
    with pytest.raises(ValidationFailed):
        burn_in_request(node=node, gpus=[gpu], reason=" ", requested_by="ops")
    burn_in_request(node=node, gpus=[gpu], reason="x", requested_by="ops")
    with pytest.raises(Conflict):
        burn_in_request(node=node, gpus=[gpu], reason="again", requested_by="ops")
    other = NodeFactory(gpus=1)
    other_gpu = other.gpus.get()
    fail(other_gpu)
    with pytest.raises(ValidationFailed) as no_command:
        burn_in_request(node=other, gpus=[other_gpu], reason="x", requested_by="ops")
    assert no_command.value.code == "no_burn_in_command"


def test_only_the_nodes_own_agent_reports_and_only_once(market, node, agent, api_client):
    gpu = node.gpus.get(index=1)
    fail(gpu)
    burn_in = burn_in_request(node=node, gpus=[gpu], reason="x", requested_by="ops")
    stranger = NodeFactory(gpus=1)
    with pytest.raises(Exception) as not_theirs:
        burn_in_report(
            node=stranger, burn_in_id=burn_in.pk, exit_code=0, timed_out=False, output=""
        )
    assert type(not_theirs.value).__name__ == "NotFound"
    with pytest.raises(Conflict):  # not leased yet
        burn_in_report(node=node, burn_in_id=burn_in.pk, exit_code=0, timed_out=False, output="")
    run_through_agent(agent)
    late = agent.post(
        f"/api/v1/agent/burn-ins/{burn_in.pk}/result", {"exit_code": 1}, format="json"
    )
    assert late.status_code == 409
    assert BurnIn.objects.get(pk=burn_in.pk).status == "passed"


def test_a_bad_result_is_a_400_and_changes_nothing(market, node, agent):
    gpu = node.gpus.get(index=1)
    fail(gpu)
    burn_in_request(node=node, gpus=[gpu], reason="x", requested_by="ops")
    job = agent.post("/api/v1/agent/burn-ins/lease").json()
    bad = agent.post(
        f"/api/v1/agent/burn-ins/{job['id']}/result", {"exit_code": "zero"}, format="json"
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["field"] == "exit_code"
    assert BurnIn.objects.get(pk=job["id"]).status == "running"


def test_a_burn_in_whose_agent_went_quiet_fails(market, node, agent):
    gpu = node.gpus.get(index=1)
    fail(gpu)
    burn_in_request(node=node, gpus=[gpu], reason="x", requested_by="ops")
    job = agent.post("/api/v1/agent/burn-ins/lease").json()
    assert burn_ins_expire(now=timezone.now() + timedelta(seconds=20 + 299)) == 0
    assert burn_ins_expire(now=timezone.now() + timedelta(seconds=20 + 301)) == 1
    burn_in = BurnIn.objects.get(pk=job["id"])
    assert (burn_in.status, burn_in.timed_out) == ("failed", True)
    assert Gpu.objects.get(pk=gpu.pk).health == GpuHealth.FAILED


def test_a_node_returned_to_service_while_its_burn_in_waited_does_not_run_it(market, node, agent):
    """Staff may return a node without burn-in; the queued burn-in must not then stress GPUs
    that are in sale (possibly under a customer's workload)."""
    status_change(
        action="set_maintenance", node=node, actor=None, actor_label="ops", reason="PSU swap"
    )
    burn_in = burn_in_request(node=node, reason="PSU swapped", requested_by="ops")
    status_change(
        action="return_to_service", node=node, actor=None, actor_label="ops", reason="urgent"
    )

    assert agent.post("/api/v1/agent/burn-ins/lease").status_code == 204

    burn_in.refresh_from_db()
    assert (burn_in.status, burn_in.started_at) == ("cancelled", None)
    assert (
        burn_in.output
        == "Cancelled before it ran: the node is available, no longer in maintenance."
    )
    assert Node.objects.get(pk=node.pk).status == NodeStatus.AVAILABLE


def test_a_gpu_burn_in_runs_only_on_the_gpus_still_failed(market, node, agent):
    first, second = node.gpus.get(index=1), node.gpus.get(index=2)
    fail(first)
    fail(second)
    burn_in = burn_in_request(node=node, gpus=[first, second], reason="x", requested_by="ops")
    gpu_return_to_service(gpu=second, actor=None, actor_label="ops", reason="reseated")

    done = run_through_agent(agent)

    assert (done["id"], done["gpu_indexes"], done["status"]) == (burn_in.pk, [1], "passed")
    assert BurnIn.objects.get(pk=burn_in.pk).gpu_indexes == [1]
    assert Gpu.objects.get(pk=first.pk).health == GpuHealth.OK


def test_a_gpu_burn_in_whose_gpus_all_returned_is_cancelled(market, node, agent):
    gpu = node.gpus.get(index=3)
    fail(gpu)
    burn_in = burn_in_request(node=node, gpus=[gpu], reason="x", requested_by="ops")
    gpu_return_to_service(gpu=gpu, actor=None, actor_label="ops", reason="false alarm")

    assert agent.post("/api/v1/agent/burn-ins/lease").status_code == 204

    burn_in.refresh_from_db()
    assert burn_in.status == "cancelled"
    assert burn_in.output == "Cancelled before it ran: its GPUs were returned to service."


def lease_and_report_later(agent):
    """The agent leases and starts a run; the returned function reports it (passed)."""
    leased = agent.post("/api/v1/agent/burn-ins/lease")
    assert leased.status_code == 200, leased.content
    job = leased.json()

    def report(exit_code=0):
        reply = agent.post(
            f"/api/v1/agent/burn-ins/{job['id']}/result",
            {"exit_code": exit_code, "timed_out": False, "output": "done\n"},
            format="json",
        )
        assert reply.status_code == 200, reply.content
        return reply.json()

    return report


def run_started_then_gpu_fails_again(node, gpu, agent):
    """A burn-in of the failed GPU starts; meanwhile staff return the GPU and it fails again
    (Xid 48). Returns the run's late report."""
    burn_in_request(node=node, gpus=[gpu], reason="reseated", requested_by="ops")
    report = lease_and_report_later(agent)
    gpu = gpu_return_to_service(gpu=gpu, actor=None, actor_label="ops", reason="urgent order")
    gpu_health_apply(
        gpu=gpu, health=GpuHealth.FAILED, reason="Xid 48", actor_label="t", now=timezone.now()
    )
    return report


def test_a_pass_does_not_return_a_gpu_that_failed_again_while_it_ran(market, node, agent):
    """Staff returned the GPU during the run and it failed again: the late pass tested the old
    failure, not the new one, so the GPU stays out with the new failure's reason."""
    gpu = node.gpus.get(index=2)
    fail(gpu)
    report = run_started_then_gpu_fails_again(node, gpu, agent)

    assert report()["status"] == "passed"

    gpu.refresh_from_db()
    assert (gpu.health, gpu.health_reason) == (GpuHealth.FAILED, "Xid 48")
    with pytest.raises(NotAvailable):
        market.book(gpu_count=4)


def test_a_failed_run_keeps_a_later_failures_own_reason(market, node, agent):
    gpu = node.gpus.get(index=1)
    fail(gpu)
    report = run_started_then_gpu_fails_again(node, gpu, agent)

    assert report(exit_code=3)["status"] == "failed"

    assert Gpu.objects.get(pk=gpu.pk).health_reason == "Xid 48"


def test_a_pass_does_not_return_a_node_put_back_in_maintenance_while_it_ran(market, node, agent):
    """Staff returned the node during the run, then put it in maintenance again (a new fault):
    the late pass must not return it to sale."""
    status_change(
        action="set_maintenance", node=node, actor=None, actor_label="ops", reason="PSU swap"
    )
    burn_in_request(node=node, reason="PSU swapped", requested_by="ops")
    report = lease_and_report_later(agent)
    status_change(
        action="return_to_service", node=node, actor=None, actor_label="ops", reason="urgent"
    )
    status_change(
        action="set_maintenance", node=node, actor=None, actor_label="ops", reason="fan fault"
    )

    assert report()["status"] == "passed"

    node.refresh_from_db()
    assert node.status == NodeStatus.MAINTENANCE
    assert node.status_changes.first().reason == "fan fault"
