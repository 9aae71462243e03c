"""The site agent's container executor against a real runtime (podman with runc).

Each test starts real containers from the busybox test image (conftest.py); the workload's
environment picks its behaviour (image/workload.sh).
"""

import json
import logging
import socket
import threading
import time

import pytest
import switchyard_agent
from switchyard_agent import ContainerExecutor, ExecutorError

from tests.agent.conftest import CONTAINERS_CONF, no_progress, podman

pytestmark = pytest.mark.container

KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOM1nKHaq3s3Z3kQgYHXsZ4y8b2Jm9bC8t7bqYgF3lQv test@example"
)


def _state(name: str) -> str | None:
    done = podman("container", "inspect", "--format", "{{.State.Status}}", name, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def _env_in(name: str, variable: str) -> str:
    return podman("exec", name, "/bin/sh", "-c", f'printf %s "${variable}"').stdout


def _echo(port: int, text: bytes = b"ping\n") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(text)
        return conn.recv(64)


def _start(executor: ContainerExecutor, payload: dict) -> dict:
    executor.run("prepare", payload, no_progress)
    return executor.run("start", payload, no_progress)


def test_a_workload_starts_ready_with_its_ports_published_on_the_node_address(
    executor_factory, payload_for
):
    executor = executor_factory()
    payload = payload_for(ssh_public_keys=[KEY], ports=[8888], env={"LISTEN": "22 8888"})

    result = _start(executor, payload)

    assert set(result) == {"host", "ssh_port", "ports", "container_id"}
    assert result["host"] == "127.0.0.1"
    published = podman("port", payload["container_name"]).stdout
    assert f"22/tcp -> 127.0.0.1:{result['ssh_port']}" in published
    assert f"8888/tcp -> 127.0.0.1:{result['ports']['8888']}" in published
    # What the customer is given answers: the test workload echoes each line back.
    assert _echo(result["ssh_port"]) == b"ping\n"
    assert _echo(result["ports"]["8888"]) == b"ping\n"
    assert _state(payload["container_name"]) == "running"
    assert (
        result["container_id"]
        == podman(
            "container", "inspect", "--format", "{{.Id}}", payload["container_name"]
        ).stdout.strip()
    )


def test_ssh_keys_are_delivered_as_a_file_and_in_the_environment(executor_factory, payload_for):
    executor = executor_factory()
    other = KEY.replace("test@example", "second@example")
    # A key with a line break in it (which the server refuses) would authorise what follows
    # the break: the agent drops it rather than write it.
    smuggled = KEY + '\ncommand="/bin/sh" ' + KEY.replace("test@example", "backdoor")
    payload = payload_for(ssh_public_keys=[KEY, smuggled, other], env={"LISTEN": "22"})
    _start(executor, payload)

    name = payload["container_name"]
    assert podman("exec", name, "cat", "/run/switchyard/authorized_keys").stdout == (
        f"{KEY}\n{other}\n"
    )
    assert _env_in(name, "SSH_PUBLIC_KEYS") == f"{KEY}\n{other}"
    # Read-only for the tenant: the agent alone writes there (notices).
    denied = podman("exec", name, "touch", "/run/switchyard/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_env_values_reach_the_container_but_no_command_line_or_log(
    executor_factory, payload_for, monkeypatch, caplog
):
    executor = executor_factory()
    secret = "sk-live-4f9a2b7c1d"
    payload = payload_for(env={"API_TOKEN": secret, "LISTEN": "8080"}, ports=[8080])
    command_lines: list[list[str]] = []
    real_cli = ContainerExecutor._cli

    def recording(self, args, **kwargs):
        command_lines.append(list(args))
        return real_cli(self, args, **kwargs)

    monkeypatch.setattr(ContainerExecutor, "_cli", recording)
    with caplog.at_level(logging.DEBUG, logger="switchyard.agent"):
        _start(executor, payload)

    name = payload["container_name"]
    assert _env_in(name, "API_TOKEN") == secret
    assert _env_in(name, "SWITCHYARD_PORTS") == "8080"
    run = next(args for args in command_lines if args[0] == "run")
    assert ["-e", "API_TOKEN"] == run[run.index("API_TOKEN") - 1 : run.index("API_TOKEN") + 1]
    assert not any(secret in arg for args in command_lines for arg in args)
    assert secret not in caplog.text


def test_a_missing_image_is_a_workload_failure(executor_factory, payload_for):
    executor = executor_factory()
    payload = payload_for(image="localhost/switchyard-no-such-image:404")

    with pytest.raises(ExecutorError) as failure:
        executor.run("prepare", payload, no_progress)

    assert failure.value.node_failure is False
    assert str(failure.value).startswith(
        "The image localhost/switchyard-no-such-image:404 could not be pulled:"
    )


def test_a_present_image_is_not_pulled_again(executor_factory, payload_for, test_image):
    result = executor_factory().run("prepare", payload_for(), no_progress)
    assert result == {"detail": f"image {test_image} present"}


def test_an_image_from_a_private_registry_is_refused_unless_the_site_allows_it(
    executor_factory, payload_for
):
    refusing = executor_factory(allow_private_registries=False)
    for image in ("10.0.0.5:5000/team/trainer:1", "169.254.169.254/x:1", "localhost/x:1"):
        with pytest.raises(ExecutorError, match="private address") as failure:
            refusing.run("prepare", payload_for(image=image), no_progress)
        assert failure.value.node_failure is False


def test_a_workload_that_exits_before_it_is_ready_fails_with_its_last_log_lines_redacted(
    executor_factory, payload_for
):
    executor = executor_factory()
    secret = "hf_secret_token_123"
    payload = payload_for(env={"MODE": "crash", "API_TOKEN": secret}, ports=[8080])

    with pytest.raises(ExecutorError) as failure:
        _start(executor, payload)

    message = str(failure.value)
    assert failure.value.node_failure is False
    assert message.startswith("The workload exited with code 3 before it was ready")
    assert message.endswith(
        "Last log lines:\nworkload starting (mode crash)\n"
        "loading weights with token [redacted]\nfatal: CUDA out of memory"
    )
    assert secret not in message


def test_a_workload_that_never_listens_is_not_ready_within_the_timeout(
    executor_factory, payload_for
):
    executor = executor_factory()
    payload = payload_for(env={"MODE": "deaf"}, ports=[8080], readiness_timeout_seconds=1.5)

    began = time.monotonic()
    with pytest.raises(ExecutorError) as failure:
        _start(executor, payload)

    assert 1.5 <= time.monotonic() - began < 20  # the timeout, not the first failure
    assert str(failure.value).startswith(
        "The workload was not ready within 1.5 s: port(s) [8080] did not accept connections "
        "on 127.0.0.1. Last log lines:\nworkload starting (mode deaf)"
    )


def test_readiness_waits_for_a_slow_workload(executor_factory, payload_for):
    executor = executor_factory()
    payload = payload_for(env={"READY_AFTER": "2", "LISTEN": "8080"}, ports=[8080])
    steps: list[dict] = []

    began = time.monotonic()
    executor.run("prepare", payload, no_progress)
    result = executor.run("start", payload, steps.append)

    assert time.monotonic() - began >= 2
    assert {"step": "readiness", "waiting_for_ports": [8080]} in steps
    assert _echo(result["ports"]["8080"]) == b"ping\n"


def test_stop_sends_sigterm_and_the_workload_checkpoints_before_it_is_removed(
    executor_factory, payload_for
):
    executor = executor_factory()
    payload = payload_for(env={"LISTEN": "8080"}, ports=[8080])
    _start(executor, payload)
    name = payload["container_name"]

    began = time.monotonic()
    podman("stop", "-t", "5", name)  # what stop does first, so the checkpoint can be read
    assert time.monotonic() - began < 4  # it exited on SIGTERM, not at SIGKILL after 5 s
    checkpoint = podman("cp", f"{name}:/checkpoint/step", "-").stdout
    assert "checkpoint at 20" in checkpoint
    assert podman("container", "inspect", "--format", "{{.State.ExitCode}}", name).stdout == "0\n"

    result = executor.run("stop", {**payload, "grace_seconds": 5}, no_progress)
    assert result == {"detail": f"stopped {name} (exit code 0)"}
    assert _state(name) is None
    assert podman("network", "exists", f"{name}-net", check=False).returncode == 1


def test_stop_kills_a_workload_that_ignores_sigterm_after_the_grace_period(
    executor_factory, payload_for
):
    executor = executor_factory()
    payload = payload_for(env={"LISTEN": "8080", "MODE": "stubborn"}, ports=[8080])
    _start(executor, payload)
    name = payload["container_name"]

    began = time.monotonic()
    result = executor.run("stop", {**payload, "grace_seconds": 2}, no_progress)
    elapsed = time.monotonic() - began

    assert 2 <= elapsed < 10
    assert result == {"detail": f"stopped {name} (exit code 137)"}
    assert _state(name) is None


def test_stopping_a_container_that_is_gone_is_done(executor_factory, payload_for):
    payload = payload_for()
    result = executor_factory().run("stop", {**payload, "grace_seconds": 1}, no_progress)
    assert result == {"detail": f"{payload['container_name']} was already gone"}


def test_a_leftover_container_from_a_crashed_agent_is_replaced(executor_factory, payload_for):
    executor = executor_factory()
    payload = payload_for(env={"LISTEN": "8080"}, ports=[8080])
    name = payload["container_name"]
    # What an agent that died between `create` and `start` leaves: a container that never ran.
    podman(
        "create", "--name", name, "--label", "switchyard.managed=1",
        "--label", f"switchyard.reservation={payload['reservation']}", payload["image"],
    )  # fmt: skip
    leftover = podman("container", "inspect", "--format", "{{.Id}}", name).stdout.strip()

    result = _start(executor, payload)

    assert result["container_id"] != leftover
    assert _state(name) == "running"
    assert _echo(result["ports"]["8080"]) == b"ping\n"


def test_a_container_of_the_same_name_not_started_by_the_agent_is_not_touched(
    executor_factory, payload_for
):
    executor = executor_factory()
    payload = payload_for()
    name = payload["container_name"]
    podman("create", "--name", name, payload["image"])

    with pytest.raises(ExecutorError, match="exists that this agent did not start"):
        _start(executor, payload)
    assert _state(name) == "created"


def test_a_restarted_agent_adopts_the_running_container_instead_of_starting_another(
    executor_factory, payload_for
):
    payload = payload_for(env={"LISTEN": "8080"}, ports=[8080])
    first = _start(executor_factory(), payload)

    # A new agent process (a new executor) gets the start job again after a restart.
    steps: list[dict] = []
    again = executor_factory().run("start", payload, steps.append)

    assert again == first
    assert steps[0] == {"step": "adopt", "container": payload["container_name"]}
    listed = podman(
        "ps", "-a", "--filter", f"label=switchyard.reservation={payload['reservation']}",
        "--format", "{{.ID}}",
    ).stdout.split()  # fmt: skip
    assert len(listed) == 1


def test_a_start_of_an_earlier_generation_never_replaces_a_later_one(executor_factory, payload_for):
    """A superseded start (its lease ran out mid-job while the reservation moved) that reaches
    the agent after the new placement's container runs must not put the workload back on
    the GPUs it left."""
    payload = payload_for(env={"LISTEN": "8080"}, ports=[8080], gpu_indexes=[0, 2])
    name = payload["container_name"]
    executor = executor_factory()
    current = _start(executor, {**payload, "generation": 1})

    with pytest.raises(ExecutorError, match="already runs generation 1") as failure:
        executor.run("start", {**payload, "generation": 0, "gpu_indexes": [0, 1]}, no_progress)

    assert not failure.value.node_failure
    labels = json.loads(
        podman("container", "inspect", "--format", "{{json .Config.Labels}}", name).stdout
    )
    assert (labels["switchyard.generation"], labels["switchyard.gpus"]) == ("1", "0,2")
    assert _echo(current["ports"]["8080"]) == b"ping\n"


def test_a_stop_of_an_earlier_generation_leaves_a_later_one_running(executor_factory, payload_for):
    """A superseded start's stop, run again after the reservation's new placement started on
    this node, must not take the new container down."""
    payload = payload_for(env={"LISTEN": "8080"}, ports=[8080], gpu_indexes=[0, 2])
    executor = executor_factory()
    current = _start(executor, {**payload, "generation": 1})

    old = executor.run("stop", {**payload, "generation": 0, "grace_seconds": 1}, no_progress)

    assert "left running" in old["detail"]
    assert _echo(current["ports"]["8080"]) == b"ping\n"
    executor.run("stop", {**payload, "generation": 1, "grace_seconds": 1}, no_progress)
    assert executor._inspect(payload["container_name"]) is None


def test_a_start_of_a_new_generation_replaces_the_running_container_with_the_new_gpus(
    executor_factory, payload_for
):
    """The reservation moved to other GPUs on this node and its old container's stop did not
    run: the new generation's start does not adopt the old container, it replaces it."""
    payload = payload_for(env={"LISTEN": "8080"}, ports=[8080], gpu_indexes=[0, 1])
    name = payload["container_name"]
    executor = executor_factory()
    first = _start(executor, payload)

    def labels() -> dict:
        return json.loads(
            podman("container", "inspect", "--format", "{{json .Config.Labels}}", name).stdout
        )

    assert (labels()["switchyard.generation"], labels()["switchyard.gpus"]) == ("0", "0,1")
    # The same generation again (a restarted agent) adopts it.
    assert executor.run("start", payload, no_progress) == first

    steps: list[dict] = []
    moved = {**payload, "generation": 1, "gpu_indexes": [2, 0], "grace_seconds": 5}
    second = executor.run("start", moved, steps.append)

    assert second["container_id"] != first["container_id"]
    assert {"step": "adopt", "container": name} not in steps
    assert (labels()["switchyard.generation"], labels()["switchyard.gpus"]) == ("1", "0,2")
    assert _echo(second["ports"]["8080"]) == b"ping\n"
    listed = podman(
        "ps",
        "-a",
        "--filter",
        f"label=switchyard.reservation={payload['reservation']}",
        "--format",
        "{{.ID}}",
    ).stdout.split()
    assert listed == [second["container_id"][:12]]


def test_an_unusable_state_directory_is_a_node_failure_not_a_crash(
    executor_factory, payload_for, tmp_path
):
    """A file where the state directory should be (or a full, read-only disk): the start
    raised OSError, the agent logged a crash, and the job was leased again for ever."""
    (tmp_path / "state").write_text("not a directory")
    executor = executor_factory(state_dir=str(tmp_path / "state"))
    payload = payload_for()
    executor.run("prepare", payload, no_progress)

    with pytest.raises(ExecutorError) as failed:
        executor.run("start", payload, no_progress)

    assert failed.value.node_failure is True
    assert str(failed.value) == (
        f"cannot write {tmp_path / 'state' / payload['container_name']}: Not a directory"
    )
    assert _state(payload["container_name"]) is None  # nothing started


def test_an_unusable_runtime_is_a_node_failure_not_a_workload_failure(
    executor_factory, payload_for, tmp_path
):
    broken = tmp_path / "containers.conf"
    broken.write_text(CONTAINERS_CONF.read_text().replace('"runc"', '"no-such-oci-runtime"'))
    executor = executor_factory(runtime_env={"CONTAINERS_CONF": str(broken)})

    for kind in ("prepare", "start"):
        with pytest.raises(ExecutorError) as failure:
            executor.run(kind, payload_for(), no_progress)
        assert failure.value.node_failure is True, kind


def test_the_heartbeat_lists_each_container_with_its_state_and_an_exits_last_lines(
    executor_factory, payload_for
):
    executor = executor_factory()
    running = payload_for(env={"LISTEN": "8080"}, ports=[8080])
    exits = payload_for(env={"LISTEN": "8081", "EXIT_AFTER": "2", "EXIT_CODE": "7"}, ports=[8081])
    _start(executor, running)
    _start(executor, exits)
    podman("wait", exits["container_name"], timeout=30)

    mine = {
        c["reservation"]: c
        for c in executor.containers()
        if c["reservation"] in (running["reservation"], exits["reservation"])
    }

    assert mine[running["reservation"]] == {
        "name": running["container_name"],
        "reservation": running["reservation"],
        "state": "running",
        "exit_code": None,
        "finished_at": None,
        "oom_killed": False,
    }
    exited = mine[exits["reservation"]]
    assert (exited["state"], exited["exit_code"], exited["oom_killed"]) == ("exited", 7, False)
    assert exited["finished_at"].startswith("20")
    assert exited["log_tail"] == (
        "workload starting (mode serve)\nlistening on 8081\ngiving up after 2 s"
    )


def test_a_stop_or_kill_from_outside_is_reported_as_such_and_an_own_exit_143_is_not(
    executor_factory, payload_for
):
    executor = executor_factory()
    stopped = payload_for(env={"LISTEN": "8080"}, ports=[8080])
    killed = payload_for(env={"LISTEN": "8081"}, ports=[8081])
    exits = payload_for(env={"LISTEN": "8082", "EXIT_AFTER": "2", "EXIT_CODE": "143"}, ports=[8082])
    for payload in (stopped, killed, exits):
        _start(executor, payload)

    # A site operator's stop (the workload catches SIGTERM and exits 0) and kill (137).
    podman("stop", "-t", "5", stopped["container_name"], timeout=30)
    podman("kill", killed["container_name"], timeout=30)
    podman("wait", exits["container_name"], timeout=30)

    mine = {c["reservation"]: (c["exit_code"], c.get("stopped_by")) for c in executor.containers()}
    seen = {p["reservation"]: mine[p["reservation"]] for p in (stopped, killed, exits)}
    assert seen == {
        stopped["reservation"]: (0, "runtime"),
        killed["reservation"]: (137, "runtime"),
        exits["reservation"]: (143, None),  # its own exit, whatever the code says
    }


def test_a_start_stopped_from_outside_while_it_waits_for_readiness_is_the_sites_doing(
    executor_factory, payload_for
):
    executor = executor_factory()
    # It listens only after 30 s: a site operator stops it while the agent waits for it.
    payload = payload_for(env={"LISTEN": "8080", "READY_AFTER": "30"}, ports=[8080],
                          readiness_timeout_seconds=25)  # fmt: skip
    name = payload["container_name"]

    def operator() -> None:
        deadline = time.monotonic() + 20
        while _state(name) != "running" and time.monotonic() < deadline:
            time.sleep(0.2)
        podman("stop", "-t", "1", name, timeout=30)

    stopper = threading.Thread(target=operator)
    stopper.start()
    try:
        with pytest.raises(ExecutorError) as failure:
            _start(executor, payload)
    finally:
        stopper.join(timeout=30)

    assert (failure.value.stopped_by, failure.value.node_failure) == ("runtime", False)
    assert str(failure.value).startswith(
        "The workload was stopped from outside it before it was ready (its container runtime "
        "stopped or killed it: a site operator, or the runtime shutting down; code 137, "
    )


def test_a_container_that_ended_before_the_node_last_booted_is_reported_stopped_by_the_reboot(
    executor_factory, payload_for, monkeypatch
):
    executor = executor_factory()
    payload = payload_for(
        env={"LISTEN": "8080", "EXIT_AFTER": "2", "EXIT_CODE": "143"}, ports=[8080]
    )
    _start(executor, payload)
    podman("wait", payload["container_name"], timeout=30)
    # The node booted after it ended (stood in: a test cannot reboot this machine).
    monkeypatch.setattr(switchyard_agent, "node_boot_time", lambda: time.time())

    (entry,) = [c for c in executor.containers() if c["reservation"] == payload["reservation"]]

    assert (entry["exit_code"], entry["stopped_by"]) == (143, "reboot")


def test_a_preemption_notice_is_written_inside_the_container_and_withdrawn(
    executor_factory, payload_for
):
    executor = executor_factory()
    payload = payload_for(env={"LISTEN": "8080"}, ports=[8080])
    _start(executor, payload)
    name = payload["container_name"]
    notice = {
        "reservation": payload["reservation"],
        "container": name,
        "preempt_at": "2026-12-06T12:00:00+00:00",
        "reason": "Grid curtailment at the site",
    }

    executor.notices_apply([notice])
    inside = podman("exec", name, "cat", "/run/switchyard/preemption").stdout
    assert json.loads(inside) == {
        "preempt_at": "2026-12-06T12:00:00+00:00",
        "reason": "Grid curtailment at the site",
    }

    executor.notices_apply([])
    gone = podman("exec", name, "cat", "/run/switchyard/preemption", check=False)
    assert gone.returncode != 0


def test_the_container_runs_unprivileged_with_its_share_of_the_node(executor_factory, payload_for):
    executor = executor_factory(node_cpus=8.0, node_memory_mib=4096)
    payload = payload_for(env={"LISTEN": "8080"}, ports=[8080], gpu_indexes=[1], node_gpu_count=4)
    _start(executor, payload)
    name = payload["container_name"]

    host_config = json.loads(podman("container", "inspect", name).stdout)[0]["HostConfig"]
    assert host_config["Privileged"] is False
    assert host_config["Memory"] == 1024 * 1024 * 1024  # a quarter of 4096 MiB
    assert host_config["NanoCpus"] == 2_000_000_000  # a quarter of 8 CPUs
    assert host_config["NetworkMode"] == "bridge" or host_config["NetworkMode"].endswith("-net")
    assert "no-new-privileges" in " ".join(host_config["SecurityOpt"])
    effective = podman("exec", name, "grep", "CapEff", "/proc/self/status").stdout.split()[1]
    assert int(effective, 16) & (1 << 13) == 0  # CAP_NET_RAW dropped
    assert int(effective, 16) & (1 << 21) == 0  # CAP_SYS_ADMIN dropped
    networks = json.loads(podman("container", "inspect", name).stdout)[0]["NetworkSettings"]
    assert list(networks["Networks"]) == [f"{name}-net"]


def _killed_for_memory(executor, monkeypatch) -> None:
    """The runtime's answers for a container the kernel killed for its --memory (podman on
    runc with cgroupfs here does not set OOMKilled, so the runtime's answer is stood in for)."""
    state = {"Status": "exited", "Running": False, "ExitCode": 137, "OOMKilled": True,
             "FinishedAt": "2026-12-06T10:31:02Z"}  # fmt: skip
    item = {"Name": "sy-res_1", "State": state, "Config": {"Labels": {
        "switchyard.managed": "1", "switchyard.reservation": "res_1"}, "Env": []}}  # fmt: skip
    monkeypatch.setattr(executor, "_inspect", lambda name: item)
    monkeypatch.setattr(executor, "_tail_suffix", lambda name, payload: "")
    monkeypatch.setattr(executor, "_managed_names", lambda: ["sy-res_1"])
    monkeypatch.setattr(executor, "log_tail", lambda name, secrets: "")

    class Done:
        returncode, stdout, stderr = 0, json.dumps([item]), ""

    monkeypatch.setattr(executor, "_cli", lambda args, timeout: Done())


def test_a_workload_killed_for_its_memory_before_it_was_ready_says_so(tmp_path, monkeypatch):
    executor = ContainerExecutor(host="127.0.0.1", runtime="podman", state_dir=str(tmp_path),
                                 node_cpus=8.0, node_memory_mib=65536)  # fmt: skip
    _killed_for_memory(executor, monkeypatch)
    payload = {"container_name": "sy-res_1", "ports": [8080], "gpu_indexes": [0, 1],
               "node_gpu_count": 8}  # fmt: skip

    with pytest.raises(ExecutorError) as failed:
        executor._wait_ready(payload, timeout=5, progress=no_progress)

    assert str(failed.value).startswith(
        "The workload ran out of memory before it was ready (killed with code 137 for using "
        "more than its 16384 MiB, "
    )
    assert failed.value.node_failure is False  # the workload's own doing


def test_the_heartbeat_says_which_container_was_killed_for_its_memory(tmp_path, monkeypatch):
    executor = ContainerExecutor(host="127.0.0.1", runtime="podman", state_dir=str(tmp_path))
    _killed_for_memory(executor, monkeypatch)

    (entry,) = executor.containers()

    assert (entry["state"], entry["exit_code"], entry["oom_killed"]) == ("exited", 137, True)
