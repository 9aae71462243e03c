"""Provisioning drivers: how a reservation's workload is started and stopped on its nodes.

The interface is four calls, all idempotent (a task may call them again after a crash):

- prepare(target): get the nodes ready (pull the image, reserve the GPUs);
- start_workload(target): start the customer's container;
- check(target) -> Check: pending, ready (with connection details) or failed;
- stop(target) -> Check: pending until the workload is gone, then ready.

They raise DriverError for what may succeed on retry, NodeFailure when a node itself is bad
(the caller marks it and moves the reservation), WorkloadFailure when retrying cannot help.
"""

import json
import os
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from django.conf import settings
from django.utils import timezone

from config.dates import iso_utc
from inventory.models import Gpu, Node, NodeStatus
from marketplace.models import AgentJob, AgentJobStatus
from marketplace.models.provisioning import AGENT_JOB_FINAL
from marketplace.provisioning.agent_jobs import agent_job_enqueue

__all__ = [
    "NodeTarget",
    "Target",
    "Check",
    "DriverError",
    "NodeFailure",
    "WorkloadFailure",
    "Driver",
    "SimulatedDriver",
    "SiteAgentDriver",
    "driver_get",
]


@dataclass(frozen=True)
class NodeTarget:
    node_id: int
    hostname: str
    gpu_indexes: tuple[int, ...]


@dataclass(frozen=True)
class Target:
    """What a driver needs to know about a reservation: its workload and where it runs."""

    reservation_id: int
    public_id: str
    workload: dict
    nodes: tuple[NodeTarget, ...]
    tier: str = ""
    # The reservation's placement generation: raised by each move to other GPUs.
    generation: int = 0


@dataclass(frozen=True)
class Check:
    state: Literal["pending", "ready", "failed"]
    connection: dict = field(default_factory=dict)
    detail: str = ""
    # Pending because this node's agent has not picked up its job for too long.
    stalled_node_id: int | None = None


class DriverError(Exception):
    """A failure that may go away on retry (network, a busy site, a lost lease)."""


class NodeFailure(Exception):
    """The node itself failed: it should stop being sold, and the reservation moved."""

    def __init__(self, node_id: int, reason: str):
        super().__init__(reason)
        self.node_id = node_id
        self.reason = reason


class WorkloadFailure(Exception):
    """The workload cannot run (e.g. the image does not exist); retrying will not help."""


class Driver:
    name = "base"

    def prepare(self, target: Target) -> None:
        raise NotImplementedError

    def start_workload(self, target: Target) -> None:
        raise NotImplementedError

    def check(self, target: Target) -> Check:
        raise NotImplementedError

    def stop(self, target: Target) -> Check:
        raise NotImplementedError


def _connection(target: Target, *, host_for) -> dict:
    """Connection details in one shape for every driver: the first node is the entry point.
    Without SSH keys nothing listens on 22, so there is no SSH port to show."""
    ports = target.workload.get("ports", [])
    ssh_port = 22 if target.workload.get("ssh_public_keys") else None
    nodes = [
        {
            "host": host_for(n),
            "ssh_port": ssh_port,
            "ports": {str(p): p for p in ports},
            "gpu_indexes": list(n.gpu_indexes),
        }
        for n in target.nodes
    ]
    first = nodes[0]
    return {"host": first["host"], "ssh_port": ssh_port, "ports": first["ports"], "nodes": nodes}


def _redact(text: str, workload: dict) -> str:
    """The workload's environment values out of a text that may quote its log."""
    for value in sorted(workload.get("env", {}).values(), key=len, reverse=True):
        if len(value) >= 6:
            text = text.replace(value, "[redacted]")
    return text


class SimulatedDriver(Driver):
    """Plays a site on this machine: each call takes `latency` seconds and fails at `failure_rate`.

    `fail_hostnames` makes prepare report those nodes as failed (for tests and demos); `log_path`
    appends one JSON line per call, so tests can count calls made in a worker process.
    """

    name = "simulated"

    def __init__(
        self,
        *,
        latency: float = 0.0,
        failure_rate: float = 0.0,
        fail_hostnames: frozenset[str] = frozenset(),
        log_path: str = "",
        rng: random.Random | None = None,
    ):
        self.latency = latency
        self.failure_rate = failure_rate
        self.fail_hostnames = fail_hostnames
        self.log_path = log_path
        self.rng = rng or random.Random()

    def _call(self, op: str, target: Target) -> None:
        if self.log_path:
            line = json.dumps(
                {
                    "op": op,
                    "reservation": target.public_id,
                    "pid": os.getpid(),
                    "at": iso_utc(datetime.now(UTC)),
                }
            )
            # One short O_APPEND write per line: lines from several processes do not interleave.
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, (line + "\n").encode())
            finally:
                os.close(fd)
        if self.latency:
            time.sleep(self.latency)

    def prepare(self, target: Target) -> None:
        self._call("prepare", target)
        for node in target.nodes:
            if node.hostname in self.fail_hostnames:
                raise NodeFailure(node.node_id, f"Node {node.hostname} failed to prepare.")
        if self.failure_rate and self.rng.random() < self.failure_rate:
            raise DriverError("Simulated transient failure while preparing.")

    def start_workload(self, target: Target) -> None:
        self._call("start", target)

    def check(self, target: Target) -> Check:
        connection = _connection(target, host_for=lambda n: f"{n.hostname}.sim.switchyard.test")
        # Nothing runs: the portal and the API say so next to these made-up addresses.
        connection["simulated"] = True
        return Check("ready", connection=connection)

    def stop(self, target: Target) -> Check:
        self._call("stop", target)
        return Check("ready")


class SiteAgentDriver(Driver):
    """Turns each step into AgentJobs that the node's site agent leases over the API.

    prepare and start_workload only queue jobs (a start job is handed out after its prepare
    job is done); check reads the jobs' state; stop queues stop jobs and cancels what was not
    yet handed out. Jobs belong to the target's generation: after a move, prepare first takes
    down what earlier generations started (a stop job on each node that ran one, which the new
    start job on that node waits for), so a node that already ran the workload restarts it
    on its new GPUs instead of reading the old start as done.
    """

    name = "site_agent"

    def _enqueue(self, target: Target, kind: str) -> None:
        # A job whose container the site stopped from outside (an operator, a reboot) is
        # queued again: this call is the provisioning step's retry of it (check, below).
        AgentJob.objects.filter(
            reservation_id=target.reservation_id,
            node_id__in=[n.node_id for n in target.nodes],
            kind=kind,
            generation=target.generation,
            status=AgentJobStatus.FAILED,
            result__has_key="stopped_by",
        ).exclude(result__node_failure=True).update(
            status=AgentJobStatus.QUEUED, lease_owner="", lease_expires_at=None, progress={},
            result={}, error="", finished_at=None,
            # Queued anew: an agent that does not lease it is silent from now (_stalled).
            created_at=timezone.now(), updated_at=timezone.now(),
        )  # fmt: skip
        for node in target.nodes:
            agent_job_enqueue(
                reservation_id=target.reservation_id,
                node_id=node.node_id,
                kind=kind,
                generation=target.generation,
                payload=_agent_payload(target, node, kind, generation=target.generation),
            )

    def _supersede(self, target: Target) -> None:
        """Earlier generations' work: what no agent took yet is cancelled, and each node where
        one of their start jobs may have run a container gets a stop job for it."""
        earlier = AgentJob.objects.filter(
            reservation_id=target.reservation_id, generation__lt=target.generation
        )
        earlier.filter(kind__in=["prepare", "start"], status=AgentJobStatus.QUEUED).update(
            status=AgentJobStatus.CANCELLED
        )
        latest: dict[int, AgentJob] = {}
        for job in (
            earlier.filter(kind="start")
            .exclude(status=AgentJobStatus.CANCELLED)
            .order_by("node_id", "-generation")
        ):
            latest.setdefault(job.node_id, job)
        for job in latest.values():
            node = NodeTarget(job.node_id, "", tuple(job.payload.get("gpu_indexes", [])))
            agent_job_enqueue(
                reservation_id=target.reservation_id,
                node_id=job.node_id,
                kind="stop",
                generation=job.generation,
                payload=_agent_payload(target, node, "stop", generation=job.generation),
            )

    def prepare(self, target: Target) -> None:
        self._supersede(target)
        self._enqueue(target, "prepare")

    def start_workload(self, target: Target) -> None:
        self._enqueue(target, "start")

    def check(self, target: Target) -> Check:
        node_ids = [n.node_id for n in target.nodes]
        jobs = list(
            AgentJob.objects.filter(
                reservation_id=target.reservation_id,
                node_id__in=node_ids,
                kind__in=["prepare", "start"],
                generation=target.generation,
            )
        )
        for job in jobs:
            if job.status == AgentJobStatus.FAILED:
                if job.result.get("node_failure"):
                    raise NodeFailure(
                        job.node_id, job.error or "The site agent reported a node failure."
                    )
                if job.result.get("stopped_by"):
                    # The site stopped its container while it started (an operator's stop, a
                    # reboot): not the workload's failure. Retried with backoff, where
                    # start_workload queues the job again.
                    raise DriverError(
                        _redact(job.error, target.workload)
                        or f"The site stopped the workload while it started on node {job.node_id}."
                    )
                # The agent redacts the log lines it quotes; so do we, should it be an old one.
                raise WorkloadFailure(
                    _redact(job.error, target.workload)
                    or f"The site agent could not {job.kind} the workload."
                )
        started = {
            j.node_id: j for j in jobs if j.kind == "start" and j.status == AgentJobStatus.DONE
        }
        if len(started) < len(node_ids):
            stalled = _stalled(jobs)
            return Check(
                "pending",
                detail=f"{len(started)} of {len(node_ids)} nodes started",
                stalled_node_id=stalled.node_id if stalled else None,
            )
        hosts = {n.node_id: started[n.node_id].result for n in target.nodes}
        connection = _connection(
            target, host_for=lambda n: hosts[n.node_id].get("host", n.hostname)
        )
        for entry, node in zip(connection["nodes"], target.nodes, strict=True):
            reported = hosts[node.node_id]
            # No SSH port when the workload has no SSH keys (nothing is published for it).
            entry["ssh_port"] = int(reported["ssh_port"]) if reported.get("ssh_port") else None
            entry["ports"] = {str(k): int(v) for k, v in reported.get("ports", {}).items()}
        first = connection["nodes"][0]
        connection.update(ssh_port=first["ssh_port"], ports=first["ports"])
        return Check("ready", connection=connection)

    def stop(self, target: Target) -> Check:
        # What an agent has not picked up yet need not run at all.
        AgentJob.objects.filter(
            reservation_id=target.reservation_id,
            kind__in=["prepare", "start"],
            status=AgentJobStatus.QUEUED,
        ).update(status=AgentJobStatus.CANCELLED)
        # A container an earlier generation left on a node it has since moved off, too.
        self._supersede(target)
        self._enqueue(target, "stop")
        stops = AgentJob.objects.filter(reservation_id=target.reservation_id, kind="stop")
        offline = set(
            Node.objects.filter(
                pk__in={j.node_id for j in stops},
                status__in=[NodeStatus.OFFLINE, NodeStatus.RETIRED],
            ).values_list("pk", flat=True)
        )
        # A node that is offline cannot stop anything now; its agent runs the queued stop job
        # when it comes back, and the GPUs are not sold before the node is back in service.
        waiting = [j for j in stops if j.status not in AGENT_JOB_FINAL and j.node_id not in offline]
        # An agent that has not even leased its stop job for that long, or let its lease on it
        # run out that long ago, is gone or hung: the release completes (billing stops), and
        # the stop runs when the agent comes back (an expired lease is handed out again).
        stalled = {j.node_id for j in waiting if _stalled([j])}
        waiting = [j for j in waiting if j.node_id not in stalled]
        if waiting:
            return Check("pending", detail=f"waiting for {len(waiting)} stop job(s)")
        if stalled:
            return Check(
                "ready", detail=f"stop not confirmed by the agents of nodes {sorted(stalled)}"
            )
        return Check("ready")


def _stalled(jobs: list[AgentJob]) -> AgentJob | None:
    """The first job its agent has let lie for AGENT_JOB_STALL: still queued (never leased)
    that long after it was queued, or a stop whose lease ran out that long ago and that no
    agent took again (its agent hung mid-stop; a release need not wait for it)."""
    cutoff = timezone.now() - settings.AGENT_JOB_STALL
    for job in jobs:
        if job.status == AgentJobStatus.QUEUED and job.created_at < cutoff:
            return job
        if (
            job.kind == "stop"
            and job.status == AgentJobStatus.LEASED
            and job.lease_expires_at < cutoff
        ):
            return job
    return None


def _agent_payload(target: Target, node: NodeTarget, kind: str, *, generation: int) -> dict:
    payload = {
        "reservation": target.public_id,
        "generation": generation,
        "gpu_indexes": list(node.gpu_indexes),
        "container_name": f"sy-{target.public_id}",
    }
    if kind in ("prepare", "start"):
        payload["image"] = target.workload.get("image") or settings.PROVISIONING_DEFAULT_IMAGE
    if kind == "start":
        payload["env"] = dict(target.workload.get("env", {}))
        payload["ssh_public_keys"] = list(target.workload.get("ssh_public_keys", []))
        payload["ports"] = list(target.workload.get("ports", []))
        payload["readiness_timeout_seconds"] = settings.PROVISIONING_READINESS_TIMEOUT_SECONDS
        # The agent sizes the container's CPU and memory by the reservation's share of them.
        payload["node_gpu_count"] = Gpu.objects.filter(node_id=node.node_id).count()
    if kind == "stop":
        grace = settings.PROVISIONING_STOP_GRACE_SECONDS
        payload["grace_seconds"] = grace.get(target.tier, max(grace.values()))
    return payload


def driver_get(name: str | None = None) -> Driver:
    """The driver named in settings (PROVISIONING_DRIVER), configured from settings."""
    name = name or settings.PROVISIONING_DRIVER
    if name == "simulated":
        return SimulatedDriver(
            latency=settings.SIMULATED_DRIVER_LATENCY_SECONDS,
            failure_rate=settings.SIMULATED_DRIVER_FAILURE_RATE,
            log_path=settings.SIMULATED_DRIVER_LOG,
        )
    if name == "site_agent":
        return SiteAgentDriver()
    raise ValueError(f"Unknown provisioning driver {name!r}")
