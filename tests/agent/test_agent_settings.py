"""The standalone agent's settings, token file, GPU arguments, isolation and image policy
(no runtime needed)."""

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from switchyard_agent import (
    KEPT_CAPABILITIES,
    Agent,
    DryRunExecutor,
    SettingsError,
    gpu_args,
    image_registry_refusal,
    is_public_address,
    isolation_args,
    settings_load,
    token_read,
)

from config import netaddr as config_netaddr

AGENT = Path(__file__).resolve().parents[2] / "agent" / "switchyard_agent.py"


def test_gpu_args_for_nvidia_through_cdi_name_each_of_the_reservations_gpus():
    assert gpu_args("nvidia", [3, 1], nvidia_mode="cdi") == [
        "--device", "nvidia.com/gpu=1", "--device", "nvidia.com/gpu=3",
    ]  # fmt: skip


def test_gpu_args_for_nvidia_through_gpus_are_one_quoted_device_list():
    assert gpu_args("nvidia", [0, 2], nvidia_mode="gpus") == ["--gpus", '"device=0,2"']
    assert gpu_args("nvidia", [5], nvidia_mode="gpus") == ["--gpus", '"device=5"']


def test_gpu_args_for_amd_are_kfd_and_each_gpus_render_node():
    assert gpu_args("amd", [0, 2]) == [
        "--device", "/dev/kfd", "--device", "/dev/dri/renderD128",
        "--device", "/dev/dri/renderD130",
    ]  # fmt: skip
    assert gpu_args("amd", [1], amd_render_node_base=129) == [
        "--device", "/dev/kfd", "--device", "/dev/dri/renderD130",
    ]  # fmt: skip


def test_no_gpu_args_without_gpus_or_a_vendor():
    assert gpu_args("nvidia", []) == []
    assert gpu_args("none", [0, 1]) == []
    with pytest.raises(ValueError):
        gpu_args("intel", [0])


def test_isolation_args_drop_capabilities_and_limit_the_container():
    args = isolation_args(network="sy-r1-net", cpus=3.5, memory_mib=2048)
    assert args[0] == "--cap-drop=ALL"
    assert args[1 : 1 + len(KEPT_CAPABILITIES)] == [f"--cap-add={c}" for c in KEPT_CAPABILITIES]
    assert args[1 + len(KEPT_CAPABILITIES) :] == [
        "--security-opt=no-new-privileges", "--pids-limit=8192", "--network=sy-r1-net",
        "--cpus=3.5", "--memory=2048m", "--memory-swap=2048m",
    ]  # fmt: skip
    assert not {"SYS_ADMIN", "NET_RAW", "NET_ADMIN", "SYS_PTRACE", "MKNOD"} & set(KEPT_CAPABILITIES)
    assert "--privileged" not in args and not any("host" in a for a in args)


@pytest.mark.parametrize(
    ("image", "refused"),
    [
        ("ubuntu:24.04", False),
        ("docker.io/library/ubuntu:24.04", False),
        ("ghcr.io/org/trainer:1.2", False),
        ("10.1.2.3:5000/team/trainer:1", True),
        ("192.168.1.10/trainer", True),
        ("169.254.169.254/latest:1", True),
        ("[fd00::1]:5000/x:1", True),
        ("[fe80::1]/x", True),
        ("localhost:5000/x", True),
        ("registry.site.internal/x:1", True),  # resolves to a private address (below)
        ("8.8.8.8/x:1", False),
    ],
)
def test_images_from_private_or_link_local_registries_are_refused(image, refused):
    def resolve(host, _port):
        table = {"registry.site.internal": "10.9.8.7", "localhost": "127.0.0.1"}
        return [(None, None, None, "", (table.get(host, "93.184.216.34"), 0))]

    reason = image_registry_refusal(image, resolve=resolve)
    assert (reason is not None) == refused, reason


# Where a registry's name may point that is not public, though Python's is_private says no:
# the shared range (a site's carrier-grade NAT or overlay network), private IPv4 inside NAT64
# and 6to4, the IPv4-compatible form, IETF protocol assignments, site-local, multicast.
NOT_PUBLIC_NOR_PRIVATE = [
    "100.64.0.5", "64:ff9b::a00:5", "2002:a00:5::1", "::7f00:1", "::a9fe:a9fe", "192.0.0.8",
    "fec0::1", "224.0.0.1",
]  # fmt: skip


@pytest.mark.parametrize("address", NOT_PUBLIC_NOR_PRIVATE)
def test_a_registry_name_resolving_to_any_address_that_is_not_public_is_refused(address):
    def resolve(host, _port):
        return [(None, None, None, "", ("93.184.216.34", 0)), (None, None, None, "", (address, 0))]

    reason = image_registry_refusal("registry.site.example/team/x:1", resolve=resolve)

    assert reason == (
        f"The image's registry registry.site.example is on a private address "
        f"({ipaddress.ip_address(address)}); this site does not pull from private registries."
    )


@pytest.mark.parametrize(
    "image", ["[64:ff9b::a00:5]:5000/x:1", "100.64.0.5:5000/x:1", "[::7f00:1]:5000/x:1"]
)
def test_a_registry_address_the_server_refuses_is_refused_by_the_agent_too(image):
    """A forged job, or a server from before the rule, must not get such a pull past the node."""
    assert image_registry_refusal(image) is not None


@pytest.mark.parametrize(
    "address",
    [
        *NOT_PUBLIC_NOR_PRIVATE, "93.184.216.34", "2606:4700:4700::1111", "64:ff9b::5db8:d822",
        "2002:5db8:d822::1", "127.0.0.1", "10.0.0.5", "169.254.169.254", "fd00:ec2::254",
        "::ffff:127.0.0.1", "64:ff9b:1::a00:1", "0.0.0.0", "::", "fe80::1", "4000::1",
        "2001:db8::1", "198.18.0.1", "240.0.0.1",
    ],
)  # fmt: skip
def test_the_agents_rule_for_public_addresses_is_the_servers(address):
    assert is_public_address(address) == config_netaddr.is_public_address(address)


def test_settings_come_from_flags_over_env_over_the_config_file(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text(
        'api = "https://file.example"\nhost = "gpu1.site.example"\n'
        'gpu_vendor = "amd"\nreadiness_timeout_seconds = 30\nlease_seconds = 90\n'
    )
    environ = {"SWITCHYARD_HOST": "env.site.example", "SWITCHYARD_LEASE_SECONDS": "45"}

    settings = settings_load({"lease_seconds": 20}, environ=environ, config_path=str(config))

    assert settings.api == "https://file.example"
    assert settings.host == "env.site.example"
    assert settings.gpu_vendor == "amd"
    assert settings.readiness_timeout_seconds == 30.0
    assert settings.lease_seconds == 20
    assert settings.allow_private_registries is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('api = "https://x"\nbogus = 1\n', "unknown setting 'bogus'"),
        ('api = "https://x"\ngpu_vendor = "intel"\n', "gpu_vendor must be one of"),
        ('api = "ftp://x"\n', "api must be the base URL"),
        ('api = "https://x"\nlease_seconds = "soon"\n', "lease_seconds must be int"),
        ("api = \n", "cannot read the config file"),
    ],
)
def test_bad_settings_stop_the_agent_with_a_clear_message(tmp_path, text, message):
    config = tmp_path / "agent.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=message):
        settings_load({}, environ={}, config_path=str(config))


def test_the_token_file_is_refused_when_others_may_read_it(tmp_path):
    path = tmp_path / "node-token"
    path.write_text("nt_abc123\n")
    path.chmod(0o640)
    with pytest.raises(SettingsError, match=r"readable by others \(mode 0640\)"):
        token_read(str(path))
    path.chmod(0o600)
    assert token_read(str(path)) == "nt_abc123"
    path.write_text("sk_live_wrong\n")
    with pytest.raises(SettingsError, match="does not hold a node token"):
        token_read(str(path))
    with pytest.raises(SettingsError, match="cannot read the node token file"):
        token_read(str(tmp_path / "missing"))


def test_the_agent_runs_as_one_file_with_the_standard_library_only(tmp_path):
    """Copied alone to a site and run with `python -I` (no site-packages, no project)."""
    alone = tmp_path / "switchyard_agent.py"
    alone.write_bytes(AGENT.read_bytes())
    token = tmp_path / "token"
    token.write_text("nt_x")
    token.chmod(0o644)
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(alone), "--api", "https://x.example",
         "--token-file", str(token), "--executor", "dry-run", "--once"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
    )  # fmt: skip
    assert done.returncode == 2
    assert "is readable by others (mode 0644)" in done.stderr


class _RecordingApi:
    """Answers the agent's requests like the API does (its jobs, then none); records when each
    arrives. Heartbeats are refused (401, a revoked token) after `beats_allowed`."""

    def __init__(self, *, beats_allowed: int, jobs: list[dict]):
        self.calls: list[tuple[float, str]] = []
        self.beats_allowed = beats_allowed
        self.jobs = list(jobs)

    def post(self, path: str, body: dict, *, request_id: str = ""):
        self.calls.append((time.monotonic(), path))
        if path == "agent/heartbeat":
            self.beats_allowed -= 1
            return (200, {}) if self.beats_allowed >= 0 else (401, None)
        if path == "agent/workloads":
            return 200, {"notices": []}
        if path == "agent/jobs/lease" and self.jobs:
            return 200, self.jobs.pop(0)
        if path in ("agent/jobs/lease", "agent/burn-ins/lease"):
            return 204, None
        return 200, {}


def _job(job_id: int, kind: str, reservation: str) -> dict:
    payload = {"container_name": f"sy-{reservation}"}
    return {"id": job_id, "lease_id": f"l{job_id}", "kind": kind, "reservation": reservation,
            "payload": payload}  # fmt: skip


class _SlowStart(DryRunExecutor):
    def run(self, kind, payload, progress):
        if kind == "start":
            time.sleep(2.0)
        return super().run(kind, payload, progress)


def _at(api: _RecordingApi, path: str) -> float:
    return next(at for at, called in api.calls if called == path)


def test_heartbeats_go_on_while_a_long_job_runs_and_a_revoked_token_stops_the_agent():
    api = _RecordingApi(beats_allowed=5, jobs=[_job(7, "start", "r1")])
    agent = Agent(client=api, executor=_SlowStart(host="h"), lease_seconds=60)

    with pytest.raises(SettingsError, match="refused the node token"):
        agent.loop(poll_seconds=0.1, heartbeat_seconds=0.3, once=False)

    paths = [path for _at, path in api.calls]
    started, completed = _at(api, "agent/jobs/lease"), _at(api, "agent/jobs/7/complete")
    during = [
        at for at, path in api.calls if path == "agent/heartbeat" and started < at < completed
    ]
    assert completed - started >= 2.0
    assert len(during) >= 4  # every 0.3 s while the job ran, not only between jobs
    assert paths.count("agent/heartbeat") == 6  # 5 answered, the 6th refused: none after it


def test_a_stop_is_not_held_up_by_another_workloads_slow_start():
    api = _RecordingApi(beats_allowed=100, jobs=[_job(1, "start", "r1"), _job(2, "stop", "r2")])
    agent = Agent(client=api, executor=_SlowStart(host="h"), lease_seconds=60)

    agent.loop(poll_seconds=0.1, heartbeat_seconds=60, once=True)  # returns when both are done

    assert _at(api, "agent/jobs/2/complete") < _at(api, "agent/jobs/1/complete")
    assert _at(api, "agent/jobs/2/complete") - _at(api, "agent/heartbeat") < 1.5


def test_with_one_job_at_a_time_they_run_in_order():
    api = _RecordingApi(beats_allowed=100, jobs=[_job(1, "start", "r1"), _job(2, "stop", "r2")])
    agent = Agent(client=api, executor=_SlowStart(host="h"), lease_seconds=60, max_parallel_jobs=1)

    agent.loop(poll_seconds=0.1, heartbeat_seconds=60, once=True)

    assert _at(api, "agent/jobs/1/complete") < _at(api, "agent/jobs/2/complete")


def test_a_second_agent_on_the_same_state_directory_is_refused(tmp_path):
    """Two agents on one node would lease the same jobs and start their containers twice."""
    from switchyard_agent import SettingsError, single_agent_lock

    first = single_agent_lock(str(tmp_path / "state"))
    with pytest.raises(SettingsError) as refused:
        single_agent_lock(str(tmp_path / "state"))
    assert str(refused.value) == (
        f"another agent already runs with the state directory {tmp_path / 'state'} "
        f"(pid {os.getpid()}): one agent per node"
    )

    first.close()  # the first agent has stopped
    single_agent_lock(str(tmp_path / "state")).close()
