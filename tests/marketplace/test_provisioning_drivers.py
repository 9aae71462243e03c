"""The drivers on their own: the simulated site and the site-agent job queue."""

import json
import random
import time
from dataclasses import replace

import pytest
from django.utils import timezone

from inventory.models import NodeStatus
from marketplace.models import AgentJob, AgentJobStatus
from marketplace.provisioning.agent_jobs import agent_job_lease
from marketplace.provisioning.drivers import (
    DriverError,
    NodeFailure,
    NodeTarget,
    SimulatedDriver,
    SiteAgentDriver,
    Target,
    WorkloadFailure,
    driver_get,
)
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create

TARGET = Target(
    reservation_id=1,
    public_id="res_test",
    workload={"ports": [8888]},
    nodes=(NodeTarget(7, "gpu-a", (0, 1)), NodeTarget(8, "gpu-b", (0,))),
)


def test_the_simulated_driver_takes_its_latency_on_each_call():
    driver = SimulatedDriver(latency=0.2)
    began = time.monotonic()
    driver.prepare(TARGET)
    driver.start_workload(TARGET)
    assert 0.4 <= time.monotonic() - began < 1.0


def test_the_simulated_driver_fails_at_its_failure_rate():
    driver = SimulatedDriver(failure_rate=0.3, rng=random.Random(7))
    failures = 0
    for _ in range(1000):
        try:
            driver.prepare(TARGET)
        except DriverError:
            failures += 1
    assert 250 <= failures <= 350
    with pytest.raises(DriverError):
        SimulatedDriver(failure_rate=1).prepare(TARGET)


def test_the_simulated_driver_reports_the_failed_node():
    with pytest.raises(NodeFailure) as failure:
        SimulatedDriver(fail_hostnames=frozenset({"gpu-b"})).prepare(TARGET)
    assert failure.value.node_id == 8


def test_the_simulated_driver_gives_connection_details_for_every_node():
    check = SimulatedDriver().check(TARGET)
    assert check.state == "ready"
    assert check.connection["host"] == "gpu-a.sim.switchyard.test"
    assert check.connection["ports"] == {"8888": 8888}
    assert [n["gpu_indexes"] for n in check.connection["nodes"]] == [[0, 1], [0]]


def test_the_simulated_driver_logs_each_call(tmp_path):
    log = tmp_path / "calls.log"
    driver = SimulatedDriver(log_path=str(log))
    driver.prepare(TARGET)
    driver.stop(TARGET)
    assert [json.loads(x)["op"] for x in log.read_text().splitlines()] == ["prepare", "stop"]


def test_the_driver_comes_from_settings(settings):
    settings.SIMULATED_DRIVER_LATENCY_SECONDS = 0.5
    settings.SIMULATED_DRIVER_FAILURE_RATE = 0.1
    driver = driver_get()
    assert isinstance(driver, SimulatedDriver)
    assert (driver.latency, driver.failure_rate) == (0.5, 0.1)
    settings.PROVISIONING_DRIVER = "site_agent"
    assert isinstance(driver_get(), SiteAgentDriver)


@pytest.fixture
def agent_target(db, allow_all_funding):  # noqa: F811
    market = market_create(nodes=1, gpus=4)
    r = market.book(gpu_count=2, workload={"image": "ubuntu:24.04", "env": {"K": "v"}})
    node = market.nodes[0]
    return (
        r,
        node,
        Target(r.pk, r.public_id, r.workload, (NodeTarget(node.pk, node.hostname, (0, 1)),)),
    )


def test_the_site_agent_driver_queues_each_job_once(agent_target):
    r, node, target = agent_target
    driver = SiteAgentDriver()
    for _ in range(2):
        driver.prepare(target)
        driver.start_workload(target)

    jobs = AgentJob.objects.filter(reservation=r).order_by("id")
    assert list(jobs.values_list("kind", "node_id", "status")) == [
        ("prepare", node.pk, "queued"),
        ("start", node.pk, "queued"),
    ]
    assert jobs[1].payload["env"] == {"K": "v"}
    assert jobs[1].payload["gpu_indexes"] == [0, 1]
    assert driver.check(target).state == "pending"


def test_the_site_agent_driver_is_ready_when_every_start_job_is_done(agent_target):
    r, _node, target = agent_target
    driver = SiteAgentDriver()
    driver.prepare(target)
    driver.start_workload(target)
    AgentJob.objects.filter(reservation=r).update(
        status=AgentJobStatus.DONE, result={"host": "10.0.0.5", "ssh_port": 2222, "ports": {}}
    )
    check = driver.check(target)
    assert check.state == "ready"
    assert (check.connection["host"], check.connection["ssh_port"]) == ("10.0.0.5", 2222)


def test_the_site_agent_driver_turns_failed_jobs_into_the_right_error(agent_target):
    r, node, target = agent_target
    driver = SiteAgentDriver()
    driver.prepare(target)
    job = AgentJob.objects.get(reservation=r, kind="prepare")
    job.status, job.error, job.result = AgentJobStatus.FAILED, "no such image", {}
    job.save()
    with pytest.raises(WorkloadFailure, match="no such image"):
        driver.check(target)
    job.result = {"node_failure": True}
    job.save()
    with pytest.raises(NodeFailure) as failure:
        driver.check(target)
    assert failure.value.node_id == node.pk


def test_a_start_the_site_stopped_is_a_driver_error_and_starting_again_queues_it_again(
    agent_target,
):
    r, node, target = agent_target
    driver = SiteAgentDriver()
    driver.prepare(target)
    driver.start_workload(target)
    AgentJob.objects.filter(reservation=r, kind="prepare").update(status=AgentJobStatus.DONE)
    start = AgentJob.objects.get(reservation=r, kind="start")
    start.status, start.error = AgentJobStatus.FAILED, "stopped from outside; K=v"
    start.result, start.lease_owner = {"node_failure": False, "stopped_by": "reboot"}, "l1"
    start.save()

    with pytest.raises(DriverError, match="stopped from outside"):
        driver.check(target)
    driver.prepare(target)  # the retry: prepare is done, it stays so
    driver.start_workload(target)

    start.refresh_from_db()
    assert (start.status, start.result, start.error, start.lease_owner) == (
        AgentJobStatus.QUEUED, {}, "", ""
    )  # fmt: skip
    assert AgentJob.objects.get(reservation=r, kind="prepare").status == AgentJobStatus.DONE
    assert driver.check(target).state == "pending"
    # The node said it failed too: the node's failure wins, and it is not queued again.
    start.status, start.result = AgentJobStatus.FAILED, {"node_failure": True, "stopped_by": "x"}
    start.save()
    driver.start_workload(target)
    with pytest.raises(NodeFailure) as failure:
        driver.check(target)
    assert failure.value.node_id == node.pk


def test_stopping_cancels_unstarted_jobs_and_waits_for_the_stop_job(agent_target):
    r, node, target = agent_target
    driver = SiteAgentDriver()
    driver.prepare(target)

    assert driver.stop(target).state == "pending"
    assert AgentJob.objects.get(reservation=r, kind="prepare").status == AgentJobStatus.CANCELLED
    AgentJob.objects.filter(reservation=r, kind="stop").update(status=AgentJobStatus.DONE)
    assert driver.stop(target).state == "ready"


def test_stopping_on_an_offline_node_does_not_wait_for_its_agent(agent_target):
    r, node, target = agent_target
    type(node).objects.filter(pk=node.pk).update(status=NodeStatus.OFFLINE)
    assert SiteAgentDriver().stop(target).state == "ready"
    # The stop stays queued for when the agent comes back.
    assert AgentJob.objects.get(reservation=r, kind="stop").status == AgentJobStatus.QUEUED


def _lease_kinds(node) -> list[tuple[str, int]]:
    """Lease (and complete) the node's jobs in the order the agent gets them."""
    got = []
    while (job := agent_job_lease(node=node)) is not None:
        got.append((job.kind, job.generation))
        AgentJob.objects.filter(pk=job.pk).update(
            status=AgentJobStatus.DONE, result={"host": "10.0.0.5", "ssh_port": 2200 + len(got)}
        )
    return got


def test_a_new_generation_on_the_same_node_stops_the_old_container_before_starting(
    agent_target,
):
    r, node, target = agent_target
    driver = SiteAgentDriver()
    driver.prepare(target)
    driver.start_workload(target)
    assert _lease_kinds(node) == [("prepare", 0), ("start", 0)]
    assert driver.check(target).state == "ready"

    # Moved: GPU 0 failed, GPU 2 on the same node instead.
    moved = replace(target, generation=1, nodes=(NodeTarget(node.pk, node.hostname, (1, 2)),))
    driver.prepare(moved)
    driver.start_workload(moved)

    # The old generation's finished start is not read as this one's.
    assert driver.check(moved).state == "pending"
    stop = AgentJob.objects.get(reservation=r, kind="stop")
    assert (stop.generation, stop.payload["gpu_indexes"]) == (0, [0, 1])
    start = AgentJob.objects.get(reservation=r, kind="start", generation=1)
    assert (start.payload["generation"], start.payload["gpu_indexes"]) == (1, [1, 2])
    # The new start is handed out only once the old container's stop is done.
    AgentJob.objects.filter(reservation=r, kind="prepare", generation=1).update(
        status=AgentJobStatus.DONE
    )
    leased = agent_job_lease(node=node)
    assert (leased.kind, leased.generation) == ("stop", 0)
    assert agent_job_lease(node=node) is None  # the start waits while the stop is leased
    AgentJob.objects.filter(pk=leased.pk).update(status=AgentJobStatus.DONE)
    assert _lease_kinds(node) == [("start", 1)]
    check = driver.check(moved)
    assert (check.state, check.connection["ssh_port"]) == ("ready", 2201)
    assert check.connection["nodes"][0]["gpu_indexes"] == [1, 2]
    # Preparing again (a retried step) queues nothing more.
    driver.prepare(moved)
    assert AgentJob.objects.filter(reservation=r).count() == 5


def test_a_node_the_reservation_moved_off_gets_a_stop_and_release_waits_for_it(
    db,
    allow_all_funding,  # noqa: F811
):
    market = market_create(nodes=2, gpus=2)
    r = market.book(gpu_count=2)
    first, second = market.nodes
    driver = SiteAgentDriver()
    old = Target(r.pk, r.public_id, r.workload, (NodeTarget(first.pk, first.hostname, (0, 1)),))
    driver.prepare(old)
    driver.start_workload(old)
    assert _lease_kinds(first) == [("prepare", 0), ("start", 0)]

    new = Target(
        r.pk, r.public_id, r.workload, (NodeTarget(second.pk, second.hostname, (0, 1)),),
        generation=1,
    )  # fmt: skip
    assert driver.stop(new).state == "pending"
    stops = AgentJob.objects.filter(reservation=r, kind="stop").order_by("node_id")
    assert list(stops.values_list("node_id", "generation")) == [(first.pk, 0), (second.pk, 1)]
    AgentJob.objects.filter(reservation=r, kind="stop", node=second).update(
        status=AgentJobStatus.DONE
    )
    assert driver.stop(new).state == "pending"  # the container left on the first node
    AgentJob.objects.filter(reservation=r, kind="stop", node=first).update(
        status=AgentJobStatus.DONE
    )
    assert driver.stop(new).state == "ready"


def _done(job) -> None:
    AgentJob.objects.filter(pk=job.pk).update(status=AgentJobStatus.DONE)


@pytest.mark.parametrize("buyer_gpus", [(0,), (2, 3)], ids=["shared-gpu", "other-gpus"])
def test_another_reservations_start_waits_for_the_stop_of_a_container_on_its_gpus(
    db,
    allow_all_funding,  # noqa: F811
    buyer_gpus,
):
    # Resale: the seller's running term loses GPU 0 to a buyer. The seller restarts on GPU 1
    # (a new generation); the buyer starts on what it bought. The seller's old container holds
    # GPUs 0 and 1 until its stop job is done.
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    seller_r, buyer_r = market.book(gpu_count=1), market.book(gpu_count=1)
    driver = SiteAgentDriver()
    seller = Target(
        seller_r.pk, seller_r.public_id, seller_r.workload, (NodeTarget(node.pk, "", (0, 1)),)
    )
    driver.prepare(seller)
    driver.start_workload(seller)
    assert _lease_kinds(node) == [("prepare", 0), ("start", 0)]

    restarted = replace(seller, generation=1, nodes=(NodeTarget(node.pk, "", (1,)),))
    buyer = Target(
        buyer_r.pk, buyer_r.public_id, buyer_r.workload, (NodeTarget(node.pk, "", buyer_gpus),)
    )
    driver.prepare(restarted)
    driver.start_workload(restarted)
    driver.prepare(buyer)
    driver.start_workload(buyer)

    stop = agent_job_lease(node=node)
    assert (stop.reservation_id, stop.kind, stop.payload["gpu_indexes"]) == (
        seller_r.pk,
        "stop",
        [0, 1],
    )
    # Both prepares are handed out while the old container is being stopped.
    for _ in range(2):
        job = agent_job_lease(node=node)
        assert job.kind == "prepare"
        _done(job)
    if buyer_gpus == (2, 3):
        # GPUs nobody else holds: the buyer starts at once, the seller's restart waits.
        job = agent_job_lease(node=node)
        assert (job.reservation_id, job.kind) == (buyer_r.pk, "start")
        assert agent_job_lease(node=node) is None
        _done(stop)
        assert _lease_kinds(node) == [("start", 1)]
        return
    # GPU 0 is still the old container's: neither start is handed out while its stop runs,
    assert agent_job_lease(node=node) is None
    # nor when its lease expired: the stop is handed out again, never the start.
    AgentJob.objects.filter(pk=stop.pk).update(lease_expires_at=timezone.now())
    again = agent_job_lease(node=node)
    assert again.pk == stop.pk
    assert agent_job_lease(node=node) is None
    _done(stop)
    assert [
        (j.reservation_id, j.kind)
        for j in AgentJob.objects.filter(pk__in=_leased_ids(node)).order_by("id")
    ] == [(seller_r.pk, "start"), (buyer_r.pk, "start")]

    # The window ends: the buyer stops, the seller restarts on GPUs 0 and 1 again. The
    # seller's start waits for the buyer's stop (a stop never waits for a start).
    driver.stop(buyer)
    back = replace(seller, generation=2)
    driver.prepare(back)
    driver.start_workload(back)
    leased = []
    while (job := agent_job_lease(node=node)) is not None:
        leased.append((job.reservation_id, job.kind, job.generation))
        if job.kind != "stop":
            _done(job)
    # Both stops (the seller's generation 1, the buyer's) and the prepare; no start yet.
    assert sorted(leased) == sorted(
        [(seller_r.pk, "stop", 1), (seller_r.pk, "prepare", 2), (buyer_r.pk, "stop", 0)]
    )
    own_stop = AgentJob.objects.get(reservation=seller_r, kind="stop", generation=1)
    _done(own_stop)
    assert agent_job_lease(node=node) is None  # still the buyer's container on GPU 0
    # A stop that fails does not hold the GPU's next start forever.
    AgentJob.objects.filter(reservation=buyer_r, kind="stop").update(status=AgentJobStatus.FAILED)
    assert _lease_kinds(node) == [("start", 2)]


def _leased_ids(node) -> list[int]:
    """Lease and complete the node's jobs; their ids in the order handed out."""
    ids = []
    while (job := agent_job_lease(node=node)) is not None:
        ids.append(job.pk)
        _done(job)
    return ids
