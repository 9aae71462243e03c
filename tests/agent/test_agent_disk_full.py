"""A full disk on the node is the site's fault: the agent reports it as a node failure (the
node leaves sale, the reservation moves), never as the customer's image failing.

The runtime is played by a script (a full disk cannot be had on demand on a shared machine):
it answers each verb as podman or docker do, with the errors the FAKE_* variables give.
The disk's free space is stood in for through `disk_space`, for the same reason.
"""

import errno
import json
import os

import pytest
import switchyard_agent
from switchyard_agent import Agent, AgentClient, ContainerExecutor, ExecutorError

from inventory.burn_in import burn_in_request
from inventory.models import BurnIn, NodeStatus
from inventory.services import node_token_issue
from marketplace.models import AgentJob, AgentJobStatus, Allocation, ReservationStatus
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import reservation_provision_step
from tests.agent.conftest import no_progress
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import broker_fixture, market_create  # noqa: F401 (fixture)

GIB = 1 << 30
IMAGE = "ghcr.io/acme/train:1.0"
FULL = (120 << 20, 200 * GIB)  # 120 MiB free of 200 GiB
ROOMY = (80 * GIB, 200 * GIB)

RUNTIME = """#!/bin/sh
echo "$*" >> "$FAKE_LOG"
case "$1" in
info) printf '%s\\n' "$FAKE_INFO"; exit 0 ;;
image) exit 1 ;;
pull) [ -z "$FAKE_PULL_ERROR" ] && exit 0; printf '%s\\n' "$FAKE_PULL_ERROR" >&2; exit 125 ;;
container) echo "Error: no such container $3" >&2; exit 125 ;;
network) exit 0 ;;
run) [ -z "$FAKE_RUN_ERROR" ] && exit 0; printf '%s\\n' "$FAKE_RUN_ERROR" >&2; exit 125 ;;
esac
echo "unexpected: $*" >&2
exit 2
"""
PODMAN_INFO = {"store": {"graphRoot": "/srv/containers/storage", "imageCopyTmpDir": "/var/tmp"}}
DOCKER_INFO = {"DockerRootDir": "/srv/docker"}
PODMAN_PULL_FULL = (
    "Trying to pull ghcr.io/acme/train:1.0...\nGetting image source signatures\n"
    'Error: writing blob: storing blob to file "/var/tmp/container_images_storage1/1": '
    "write /var/tmp/container_images_storage1/1: no space left on device"
)
# Measured on podman 4 with its storage on a full tmpfs.
PODMAN_RUN_FULL = (
    "Error: creating container storage: write "
    "/srv/containers/storage/overlay-layers/.tmp-layers.json402909915: no space left on device"
)
DOCKER_PULL_FULL = (
    "failed to register layer: Error processing tar file(exit status 1): write "
    "/usr/lib/x86_64-linux-gnu/libcudnn.so.9: no space left on device"
)


def _executor(tmp_path, *, flavour="podman", info=None, **errors) -> ContainerExecutor:
    """An executor on the scripted runtime; errors: pull_error, run_error (the runtime's
    stderr for that verb)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    runtime = bin_dir / flavour
    runtime.write_text(RUNTIME)
    runtime.chmod(0o755)
    info = info if info is not None else (DOCKER_INFO if flavour == "docker" else PODMAN_INFO)
    env = {"FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_INFO": json.dumps(info)}
    env.update({f"FAKE_{name.upper()}": text for name, text in errors.items()})
    return ContainerExecutor(
        host="127.0.0.1",
        runtime=str(runtime),
        state_dir=str(tmp_path / "state"),
        allow_private_registries=True,
        runtime_env=env,
    )


def _disks(monkeypatch, free: dict[str, tuple[int, int]]) -> None:
    monkeypatch.setattr(switchyard_agent, "disk_space", lambda path: free.get(str(path)))


def _calls(tmp_path) -> list[str]:
    return [line.split()[0] for line in (tmp_path / "calls.log").read_text().splitlines()]


def _payload(**workload) -> dict:
    return {
        "reservation": "rsv_disk",
        "container_name": "sy-rsv_disk",
        "gpu_indexes": [0],
        "node_gpu_count": 2,
        "image": IMAGE,
        "env": {},
        "ssh_public_keys": [],
        "ports": [],
        **workload,
    }


def test_a_pull_that_fills_the_disk_is_a_node_failure_naming_the_disk(tmp_path, monkeypatch):
    executor = _executor(tmp_path, pull_error=PODMAN_PULL_FULL)
    _disks(monkeypatch, {"/srv/containers/storage": ROOMY, "/var/tmp": FULL})

    with pytest.raises(ExecutorError) as failed:
        executor.run("prepare", _payload(), no_progress)

    assert failed.value.node_failure is True
    assert str(failed.value) == (
        "The node's disk is full (/var/tmp: 120.0 MiB free of 200.0 GiB): the image "
        f"{IMAGE} could not be pulled: {PODMAN_PULL_FULL.splitlines()[-1]}"
    )


def test_dockers_pull_on_a_full_disk_is_judged_on_its_root_not_on_the_path_in_the_layer(
    tmp_path, monkeypatch
):
    """docker names the file inside the image's layer; the disk is the one docker stores on."""
    executor = _executor(tmp_path, flavour="docker", pull_error=DOCKER_PULL_FULL)
    _disks(monkeypatch, {"/srv/docker": FULL, "/usr/lib/x86_64-linux-gnu": ROOMY})

    with pytest.raises(ExecutorError) as failed:
        executor.run("prepare", _payload(), no_progress)

    assert failed.value.node_failure is True
    assert str(failed.value).startswith(
        "The node's disk is full (/srv/docker: 120.0 MiB free of 200.0 GiB): the image "
    )


def test_creating_the_container_on_a_full_disk_is_a_node_failure(tmp_path, monkeypatch):
    executor = _executor(tmp_path, run_error=PODMAN_RUN_FULL)
    _disks(monkeypatch, {"/srv/containers/storage": FULL, "/var/tmp": FULL})

    with pytest.raises(ExecutorError) as failed:
        executor.run("start", _payload(), no_progress)

    assert failed.value.node_failure is True
    assert str(failed.value) == (
        "The node's disk is full (/srv/containers/storage: 120.0 MiB free of 200.0 GiB): "
        f"podman run failed: {PODMAN_RUN_FULL}"
    )


def test_a_quota_on_the_runtimes_storage_used_up_is_a_full_disk(tmp_path, monkeypatch):
    """EDQUOT: an XFS project quota on the storage folder reads as that folder's disk."""
    quota = (
        'Error: writing blob: adding layer with blob "sha256:4f4f": processing tar file'
        "(write /usr/lib/libcudnn.so.9: disk quota exceeded): exit status 1"
    )
    executor = _executor(tmp_path, pull_error=quota)
    _disks(monkeypatch, {"/srv/containers/storage": FULL, "/var/tmp": ROOMY})

    with pytest.raises(ExecutorError) as failed:
        executor.run("prepare", _payload(), no_progress)

    assert failed.value.node_failure is True
    assert str(failed.value).startswith(
        "The node's disk is full (/srv/containers/storage: 120.0 MiB free of 200.0 GiB): "
    )


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_the_agents_own_write_on_a_full_disk_is_a_node_failure_naming_its_free_space(
    tmp_path, monkeypatch, code
):
    executor = _executor(tmp_path)
    _disks(monkeypatch, {str(tmp_path / "state"): FULL})

    def disk_full(path, text, *, mode):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(switchyard_agent, "_write_atomic", disk_full)

    with pytest.raises(ExecutorError) as failed:
        executor.run("start", _payload(), no_progress)

    assert failed.value.node_failure is True
    assert str(failed.value) == (
        f"The node's disk is full ({tmp_path / 'state'}: 120.0 MiB free of 200.0 GiB): "
        f"cannot write {tmp_path / 'state' / 'sy-rsv_disk'}: {os.strerror(code)}"
    )
    assert "run" not in _calls(tmp_path)  # nothing started


@pytest.mark.parametrize(
    ("verb", "error", "expected"),
    [
        (
            "prepare",
            "Error: initializing source docker://ghcr.io/acme/train:1.0: reading manifest 1.0 "
            "in ghcr.io/acme/train: manifest unknown",
            f"The image {IMAGE} could not be pulled: Error: initializing source "
            "docker://ghcr.io/acme/train:1.0: reading manifest 1.0 in ghcr.io/acme/train: "
            "manifest unknown",
        ),
        (
            "start",
            "Error: runc: runc create failed: unable to start container process: exec: "
            '"/opt/train": stat /opt/train: no such file or directory: OCI runtime attempted '
            "to invoke a command that was not found",
            "podman run failed: Error: runc: runc create failed: unable to start container "
            'process: exec: "/opt/train": stat /opt/train: no such file or directory: OCI '
            "runtime attempted to invoke a command that was not found",
        ),
    ],
    ids=["manifest-unknown", "bad-entrypoint"],
)
def test_an_ordinary_image_error_on_a_full_disk_stays_a_workload_failure(
    tmp_path, monkeypatch, verb, error, expected
):
    executor = _executor(tmp_path, **{"pull_error" if verb == "prepare" else "run_error": error})
    _disks(monkeypatch, {"/srv/containers/storage": FULL, "/var/tmp": FULL})

    with pytest.raises(ExecutorError) as failed:
        executor.run(verb, _payload(), no_progress)

    assert failed.value.node_failure is False
    assert str(failed.value) == expected


def test_an_image_bigger_than_a_roomy_disk_is_the_images_failure_saying_the_room_left(
    tmp_path, monkeypatch
):
    """The runtime removed what it pulled, and the disk has most of its room: every node would
    fail this image alike, so no node is taken out of sale for it. The same holds for words a
    registry put in its error."""
    executor = _executor(tmp_path, pull_error=PODMAN_PULL_FULL)
    _disks(monkeypatch, {"/srv/containers/storage": ROOMY, "/var/tmp": ROOMY})

    with pytest.raises(ExecutorError) as failed:
        executor.run("prepare", _payload(), no_progress)

    assert failed.value.node_failure is False
    assert str(failed.value) == (
        f"The image {IMAGE} could not be pulled: {PODMAN_PULL_FULL.splitlines()[-1]} (it "
        "needs more than the room left: /srv/containers/storage: 80.0 GiB free of 200.0 GiB)"
    )


def test_the_runtimes_word_stands_when_its_disk_cannot_be_measured(tmp_path, monkeypatch):
    executor = _executor(tmp_path, info={}, pull_error=PODMAN_PULL_FULL)
    _disks(monkeypatch, {})

    with pytest.raises(ExecutorError) as failed:
        executor.run("prepare", _payload(), no_progress)

    assert failed.value.node_failure is True
    assert str(failed.value).startswith(
        "The node's disk is full (/var/lib/containers/storage: free space unknown): "
    )


def test_disk_space_reads_the_nearest_existing_folder(tmp_path):
    free, total = switchyard_agent.disk_space(tmp_path / "not" / "made" / "yet")
    assert 0 <= free <= total and total > 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("broker", "allow_all_funding")
def test_a_full_disk_takes_the_node_out_of_sale_and_moves_the_reservation(
    live_server, tmp_path, monkeypatch
):
    """Through the API: the agent's failure is a node failure, the node goes to maintenance
    (where it gets no prepare or start job, heartbeats or not, until staff or a burn-in
    return it), and the reservation moves to the other node, nothing charged; a burn-in
    returns it only once its disk has room."""
    market = market_create(nodes=2, gpus=4)
    r = market.book(gpu_count=1, workload={"image": IMAGE})
    driver = SiteAgentDriver()
    assert reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0).outcome
    node = Allocation.objects.get(reservation=r, is_live=True).node
    _token, secret = node_token_issue(node=node, label="site agent")
    executor = _executor(tmp_path, pull_error=PODMAN_PULL_FULL)
    _disks(monkeypatch, {"/srv/containers/storage": FULL, "/var/tmp": FULL})
    agent = Agent(client=AgentClient(api=live_server.url, token=secret), executor=executor)

    assert agent.run_one() is True
    step = reservation_provision_step(reservation_id=r.pk, driver=driver, check_window=0)

    node.refresh_from_db()
    r.refresh_from_db()
    prepare = AgentJob.objects.get(reservation=r, node=node, kind="prepare")
    assert (prepare.status, prepare.result) == (AgentJobStatus.FAILED, {"node_failure": True})
    assert prepare.error.startswith("The node's disk is full (/srv/containers/storage: 120.0 MiB ")
    assert step.outcome == "retry"
    assert node.status == NodeStatus.MAINTENANCE
    assert node.status_changes.latest("at").reason.startswith(
        "Driver reported failure: The node's disk is full ("
    )
    other = next(n for n in market.nodes if n.pk != node.pk)
    assert Allocation.objects.get(reservation=r, is_live=True).node_id == other.pk
    assert r.status == ReservationStatus.PROVISIONING
    assert r.activated_at is None
    # Its heartbeats go on; they do not return it to sale, and it is handed no work.
    assert agent.heartbeat() is True
    node.refresh_from_db()
    assert node.status == NodeStatus.MAINTENANCE
    assert agent.lease() is None

    # A burn-in checks the GPUs, not the disk: while the disk is still full it fails without
    # running, saying why, and the node stays out of sale.
    node.site.burn_in_command = f"sh -c 'echo ran >> {tmp_path / 'burn.log'}'"
    node.site.save(update_fields=["burn_in_command"])
    burn_in_request(node=node, reason="disk cleaned?", requested_by="ops")
    assert agent.burn_in_one() is True
    burn_in = BurnIn.objects.get(node=node)
    assert (burn_in.status, burn_in.exit_code, burn_in.timed_out) == ("failed", None, False)
    assert burn_in.output == (
        "The node's disk is full (/srv/containers/storage: 120.0 MiB free of 200.0 GiB): the "
        "burn-in was not run. Free room on it, then queue another burn-in."
    )
    assert not (tmp_path / "burn.log").exists()
    node.refresh_from_db()
    assert node.status == NodeStatus.MAINTENANCE
    # Room freed: the next burn-in runs, passes and returns the node to sale.
    _disks(monkeypatch, {"/srv/containers/storage": ROOMY, "/var/tmp": ROOMY})
    burn_in_request(node=node, reason="images pruned", requested_by="ops")
    assert agent.burn_in_one() is True
    assert BurnIn.objects.filter(node=node).latest("pk").status == "passed"
    assert (tmp_path / "burn.log").read_text() == "ran\n"
    node.refresh_from_db()
    assert node.status == NodeStatus.AVAILABLE


def test_the_failure_report_says_node_failure(tmp_path, monkeypatch):
    """What the agent sends for it: the job's fail with node_failure true."""
    executor = _executor(tmp_path, pull_error=PODMAN_PULL_FULL)
    _disks(monkeypatch, {"/srv/containers/storage": FULL, "/var/tmp": FULL})
    sent = []

    class Client:
        def post(self, path, body, **kwargs):
            sent.append((path, body))
            return 200, {}

    agent = Agent(client=Client(), executor=executor, lease_seconds=60)
    agent.run_job(
        {"id": 7, "lease_id": "l1", "kind": "prepare", "reservation": "r", "payload": _payload()}
    )

    path, body = sent[-1]
    assert path == "agent/jobs/7/fail"
    assert body["node_failure"] is True
    assert body["error"].startswith("The node's disk is full (")
