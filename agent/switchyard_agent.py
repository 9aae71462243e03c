"""Switchyard site agent: runs at a site behind NAT, pulls its node's jobs and runs them.

    switchyard-agent --api https://switchyard.example --token-file /etc/switchyard/node-token \
        [--config /etc/switchyard/agent.toml] [--executor container|dry-run] [--host ADDRESS] …

One file, Python 3.11+ standard library only: install it with pip (`pip install ./agent`) or
copy this file to the node. It loops: heartbeat (with every container it runs and its state),
lease a job, run it through the executor while reporting progress (which extends the lease),
then report complete (with connection details) or fail. See agent/README.md.
"""

from __future__ import annotations

import argparse
import email.utils
import errno
import fcntl
import http.client
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path

try:  # GPU telemetry and burn-in: the two modules beside this file (pip installs all three)
    import burn_in as _burn_in
    import gpu_telemetry as _gpu_telemetry
except ImportError:  # copied alone: the agent runs workloads, without telemetry or burn-in
    _burn_in = _gpu_telemetry = None

__all__ = [
    "AGENT_VERSION",
    "Settings",
    "SettingsError",
    "ExecutorError",
    "DryRunExecutor",
    "ContainerExecutor",
    "AgentClient",
    "Agent",
    "gpu_args",
    "isolation_args",
    "image_registry_refusal",
    "is_public_address",
    "token_read",
    "settings_load",
    "main",
]

AGENT_VERSION = "2.0"
logger = logging.getLogger("switchyard.agent")

# Every container the agent starts carries these labels; they are how it finds its own
# containers again after a restart (it adopts them rather than starting duplicates).
LABEL_MANAGED = "switchyard.managed"
LABEL_RESERVATION = "switchyard.reservation"
# The reservation's placement generation and the GPUs the container was given: a start job of
# another generation (the reservation moved to other GPUs) replaces the container.
LABEL_GENERATION = "switchyard.generation"
LABEL_GPUS = "switchyard.gpus"
# Mounted read-only at /run/switchyard in the container: authorized_keys, and the preemption
# notice once one is given.
NOTICE_DIR_IN_CONTAINER = "/run/switchyard"
# Capabilities a workload keeps (everything else is dropped): enough for sshd to switch users
# and bind port 22, and for a package manager to chown files. Not NET_RAW, MKNOD, SYS_ADMIN,
# SYS_PTRACE, SETPCAP, SETFCAP, NET_ADMIN.
KEPT_CAPABILITIES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "AUDIT_WRITE",
)
PIDS_LIMIT = 8192
LOG_TAIL_LINES = 20
LOG_TAIL_CHARS = 1500
# ENOSPC and EDQUOT (an XFS project quota on the runtime's storage reads as a full disk) as
# podman, docker (Go) and the C library word them, in any case.
DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded")
# A runtime's write refused for want of space is the node's fault when the runtime's storage has
# less than this share of its disk free, measured after the failure (a runtime may have removed
# what it wrote of the pull). With more free, the image alone needs more than the room, and would fail on
# every node alike (a node failure would take them out of sale one by one); or the words came
# from what the runtime quotes (a registry's error text, an entrypoint's name).
DISK_FULL_FREE_SHARE = 0.10


class SettingsError(Exception):
    """A setting, the token file or the runtime is not usable: the agent does not start."""


# Names the runtime command reads from the environment the agent starts it with (the
# workload's variables are passed to it by name): never a workload's. The server refuses them
# at booking (marketplace/provisioning/workload.py); this is the agent's own check, since it
# imports nothing of the server's.
_HOST_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "TMPDIR",
        "TMP",
        "TEMP",
        "SHELL",
        "IFS",
        "USER",
        "LOGNAME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "REGISTRY_AUTH_FILE",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "CUDA_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "ROCR_VISIBLE_DEVICES",
        "GPU_DEVICE_ORDINAL",
        "GODEBUG",
        "GOTRACEBACK",
        "GOMAXPROCS",
        "GOGC",
        "GOMEMLIMIT",
    }  # fmt: skip
)
_HOST_ENV_PREFIXES = ("LD_", "DYLD_", "DOCKER_", "CONTAINER", "PODMAN_", "BUILDAH_", "STORAGE_",
                      "XDG_", "CNI_", "NETAVARK_", "CRUN_", "RUNC_", "SYSTEMD_", "DBUS_",
                      "NVIDIA_")  # fmt: skip


def host_env_name(name: str) -> bool:
    """Whether the runtime itself would read a variable of this name."""
    upper = name.upper()
    return upper in _HOST_ENV_NAMES or upper.startswith(_HOST_ENV_PREFIXES)


class ExecutorError(Exception):
    """A job failed. node_failure: the node itself is at fault (runtime unusable), not the
    workload; the platform then takes the node out of sale and moves the reservation.
    stopped_by: the site stopped the container from outside while it started (an operator,
    a reboot: STOPPED_BY_*), not the workload's doing; the platform starts it again."""

    def __init__(self, message: str, *, node_failure: bool = False, stopped_by: str | None = None):
        super().__init__(message)
        self.node_failure = node_failure
        self.stopped_by = stopped_by


# --- settings -----------------------------------------------------------------------------


@dataclass
class Settings:
    """Every setting, from (highest first) flags, SWITCHYARD_<NAME> variables, the config
    file (TOML, same names), then these defaults."""

    api: str = ""
    token_file: str = "/etc/switchyard/node-token"
    executor: str = "container"
    runtime: str = ""  # podman or docker (a name on PATH or a path); empty: podman, else docker
    host: str = field(default_factory=socket.getfqdn)  # the address customers connect to
    publish_address: str = ""  # where ports are published; empty: host if it is an IP, else 0.0.0.0
    state_dir: str = "/var/lib/switchyard-agent"
    gpu_vendor: str = "none"  # nvidia, amd or none
    nvidia_mode: str = "cdi"  # cdi (--device nvidia.com/gpu=N) or gpus (--gpus device=N)
    amd_render_node_base: int = 128  # GPU index i is /dev/dri/renderD<base + i>
    node_cpus: float = 0.0  # 0: os.cpu_count()
    node_memory_mib: int = 0  # 0: MemTotal from /proc/meminfo
    readiness_timeout_seconds: float = 120.0
    allow_private_registries: bool = False
    lease_seconds: int = 60
    max_parallel_jobs: int = 4
    poll_seconds: float = 2.0  # while jobs run, or against an API that does not say work waits
    # Given: this pace, whatever the API says. Not given: the API's (its heartbeat answer's
    # heartbeat_seconds), this one until it says, or when it does not (an older API).
    heartbeat_seconds: float = 10.0
    idle_poll_seconds: float = 300.0  # idle: lease when a heartbeat says work waits, or this often
    status_file: str = ""  # empty: <state_dir>/status.json (what `--check` reads)
    once: bool = False
    # Not a setting: the names above that the config file, the environment or a flag gave
    # (settings_load fills it), e.g. whether heartbeat_seconds was chosen for this node.
    given: frozenset[str] = field(default=frozenset(), repr=False)


_CHOICES = {
    "executor": {"container", "dry-run"},
    "gpu_vendor": {"nvidia", "amd", "none"},
    "nvidia_mode": {"cdi", "gpus"},
}


def _coerce(name: str, kind: type, value) -> object:
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise SettingsError(f"{name} must be a boolean, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} must be {kind.__name__}, got {value!r}") from None


def settings_load(
    flags: dict, *, environ: dict[str, str] | None = None, config_path: str | None = None
) -> Settings:
    """Merge the defaults, the config file, the environment and the flags (in that order)."""
    environ = os.environ if environ is None else environ
    types = {
        f.name: type(getattr(Settings(host="x"), f.name))
        for f in fields(Settings)
        if f.name != "given"
    }
    values: dict[str, object] = {}
    config_path = config_path or environ.get("SWITCHYARD_CONFIG")
    if config_path:
        try:
            with open(config_path, "rb") as handle:
                data = tomllib.load(handle)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read the config file {config_path}: {exc}") from None
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise SettingsError(f"unknown setting {unknown[0]!r} in {config_path}")
        values.update(data)
    for name in types:
        env_value = environ.get(f"SWITCHYARD_{name.upper()}")
        if env_value is not None:
            values[name] = env_value
    values.update({k: v for k, v in flags.items() if v is not None and k in types})
    settings = Settings(
        **{k: _coerce(k, types[k], v) for k, v in values.items()}, given=frozenset(values)
    )
    for name, allowed in _CHOICES.items():
        if getattr(settings, name) not in allowed:
            raise SettingsError(f"{name} must be one of {sorted(allowed)}")
    if not settings.api.startswith(("http://", "https://")):
        raise SettingsError(
            "api must be the base URL of Switchyard, e.g. https://switchyard.example"
        )
    if settings.readiness_timeout_seconds <= 0 or settings.lease_seconds < 5:
        raise SettingsError("readiness_timeout_seconds must be > 0 and lease_seconds >= 5")
    if settings.max_parallel_jobs < 1:
        raise SettingsError("max_parallel_jobs must be at least 1")
    if settings.poll_seconds <= 0 or settings.heartbeat_seconds <= 0:
        raise SettingsError("poll_seconds and heartbeat_seconds must be > 0")
    if settings.idle_poll_seconds < settings.poll_seconds:
        raise SettingsError("idle_poll_seconds must be at least poll_seconds")
    return settings


def token_read(path: str) -> str:
    """The node token from `path`, refused if anyone but its owner may read or write it."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise SettingsError(f"cannot read the node token file {path}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SettingsError(
            f"the node token file {path} is readable by others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}); run 'chmod 600 {path}'"
        )
    with open(path, encoding="utf-8") as handle:
        token = handle.read().strip()
    if not token.startswith("nt_"):
        raise SettingsError(f"{path} does not hold a node token (nt_…)")
    return token


# --- pure helpers: GPU arguments, isolation, image policy, redaction ------------------------


def gpu_args(
    vendor: str,
    indexes: Iterable[int],
    *,
    nvidia_mode: str = "cdi",
    amd_render_node_base: int = 128,
) -> list[str]:
    """The runtime arguments that hand exactly these GPUs (node-local indexes) to a container.

    NVIDIA: CDI devices (`--device nvidia.com/gpu=N`, podman ≥ 4.1 or docker ≥ 25 with the
    NVIDIA Container Toolkit's CDI spec) or docker's `--gpus "device=N,M"`. AMD: the compute
    interface /dev/kfd and each GPU's render node /dev/dri/renderD<base + N>.
    """
    indexes = sorted(set(int(i) for i in indexes))
    if not indexes or vendor == "none":
        return []
    if vendor == "nvidia":
        if nvidia_mode == "cdi":
            return [arg for i in indexes for arg in ("--device", f"nvidia.com/gpu={i}")]
        # One CSV field: quoted so that docker does not split "device=0,1" at the comma.
        return ["--gpus", f'"device={",".join(str(i) for i in indexes)}"']
    if vendor == "amd":
        args = ["--device", "/dev/kfd"]
        for i in indexes:
            args += ["--device", f"/dev/dri/renderD{amd_render_node_base + i}"]
        return args
    raise ValueError(f"unknown GPU vendor {vendor!r}")


def isolation_args(*, network: str, cpus: float, memory_mib: int) -> list[str]:
    """What keeps tenants apart on a node: no privileges, few capabilities, own network, limits."""
    args = ["--cap-drop=ALL", *[f"--cap-add={c}" for c in KEPT_CAPABILITIES]]
    args += ["--security-opt=no-new-privileges", f"--pids-limit={PIDS_LIMIT}"]
    args += [f"--network={network}", f"--cpus={cpus:g}", f"--memory={memory_mib}m"]
    # Swap would let a container exceed its memory share at the node's expense.
    args.append(f"--memory-swap={memory_mib}m")
    return args


def _registry_host(image: str) -> str | None:
    """The registry host of an image reference, or None for the default registry."""
    first, slash, _rest = image.partition("/")
    if not slash or not ("." in first or ":" in first or first == "localhost"):
        return None
    if first.startswith("["):  # [v6]:port
        return first[1 : first.index("]")]
    return first.rsplit(":", 1)[0] if first.count(":") == 1 else first


# The server's rule for public addresses (config/netaddr.py), copied: the agent imports
# nothing of the server's. tests/agent/test_agent_settings.py holds the two to one answer.
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_IETF = ipaddress.ip_network("192.0.0.0/24")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """A global unicast address: not loopback, private, link-local, shared (100.64.0.0/10),
    reserved, site-local or a metadata service, nor one of those inside an IPv4-mapped, 6to4
    or NAT64 address (a translator or relay on the site's network would reach it there)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64_LOCAL:
            return False
        inner = ip.ipv4_mapped or ip.sixtofour
        if inner is None and ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            return is_public_address(inner)
    if ip in _METADATA or ip.is_multicast or not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return not (ip.is_reserved or ip.is_site_local)
    return ip not in _IETF


def image_registry_refusal(image: str, *, resolve: Callable | None = None) -> str | None:
    """Why an image must not be pulled (its registry is on an address that is not public,
    which a tenant could use to reach the node itself or the site's own network), or None."""
    host = _registry_host(image)
    if host is None:
        return None
    resolve = resolve or socket.getaddrinfo
    try:
        addresses = {ipaddress.ip_address(host)}
    except ValueError:
        try:
            addresses = {ipaddress.ip_address(info[4][0]) for info in resolve(host, None)}
        except (OSError, UnicodeError):
            return None  # unresolvable: the pull fails on its own
    for address in sorted(addresses, key=str):
        if not is_public_address(address):
            return (
                f"The image's registry {host} is on a private address ({address}); "
                "this site does not pull from private registries."
            )
    return None


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in sorted((s for s in secrets if len(s) >= 6), key=len, reverse=True):
        text = text.replace(secret, "[redacted]")
    return text


def log_tail_bound(lines: list[str], secrets: Iterable[str]) -> str:
    """The last lines of a log, at most LOG_TAIL_LINES and LOG_TAIL_CHARS, secrets redacted."""
    secrets = list(secrets)
    kept: list[str] = []
    size = 0
    for line in reversed(lines[-LOG_TAIL_LINES:]):
        line = redact(line.rstrip()[:300], secrets)
        if size + len(line) + 1 > LOG_TAIL_CHARS:
            break
        kept.append(line)
        size += len(line) + 1
    return "\n".join(reversed(kept))


def disk_space(path: str | Path) -> tuple[int, int] | None:
    """Free and total bytes of the filesystem holding `path` (or its nearest existing parent);
    None when it cannot be read."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return None
    return usage.free, usage.total


def _bytes_text(count: int) -> str:
    return f"{count / (1 << 30):.1f} GiB" if count >= 1 << 30 else f"{count / (1 << 20):.1f} MiB"


def disk_text(path: str | Path, space: tuple[int, int] | None) -> str:
    """`path` and its disk's free space, for a message: "/var/lib/x: 12.0 MiB free of 200.0 GiB"."""
    if space is None:
        return f"{path}: free space unknown"
    return f"{path}: {_bytes_text(space[0])} free of {_bytes_text(space[1])}"


def _node_memory_mib() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


# What stopped a container from outside its workload (a heartbeat's `stopped_by`): Switchyard
# restarts such a workload in place and counts the gap as an outage, where a workload's own
# exit ends its reservation. None: nothing the runtime records says so (its own exit).
STOPPED_BY_RUNTIME = "runtime"  # stopped or killed through the runtime: an operator, a shutdown
STOPPED_BY_REBOOT = "reboot"  # it ended before the node's last boot: the reboot stopped it
# How a start's failure names what stopped its container.
_STOPPED_BY_TEXT = {
    STOPPED_BY_RUNTIME: "its container runtime stopped or killed it: a site operator, or the "
    "runtime shutting down",
    STOPPED_BY_REBOOT: "it ended before the node last booted: a restart of the node stopped it",
}
# How long after a container's end the runtime's events of its stop are looked for (the
# stopping command logs its last one just after the exit).
STOP_EVENTS_SETTLE_SECONDS = 3.0
# An RFC 3339 time as podman and docker print it (up to nanoseconds), or Go's default form
# ("2026-12-06 10:31:02.123 +0000 UTC").
_RUNTIME_TIME = re.compile(
    r"(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))? ?(Z|[+-]\d{2}:?\d{2})"
)


def runtime_time(value: object) -> float | None:
    """A time from the runtime's inspect, in epoch seconds; None when absent, without a zone,
    or Go's zero time (a container that never finished)."""
    found = _RUNTIME_TIME.match(value) if isinstance(value, str) else None
    if found is None:
        return None
    day, clock, fraction, zone = found.groups()
    offset = timedelta()
    if zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        zone = zone[1:].replace(":", "")
        offset = sign * timedelta(hours=int(zone[:2]), minutes=int(zone[2:]))
    try:
        local = datetime.fromisoformat(f"{day}T{clock}")
    except ValueError:
        return None
    if local.year < 1970:
        return None
    moment = (local - offset).replace(tzinfo=UTC).timestamp()
    return moment + float(f"0.{fraction}") if fraction else moment


def node_boot_time() -> float | None:
    """When this node last booted, in epoch seconds (/proc/stat's btime); None if unreadable."""
    try:
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def stopped_from_outside(
    state: dict, *, boot_time: float | None, stop_signalled: Callable[[], bool] | None = None
) -> str | None:
    """Why a container that is not running was stopped from outside its workload, by what the
    runtime records (never by its exit code: a workload may exit 143 or 137 itself):
    STOPPED_BY_RUNTIME when it was stopped or killed through the runtime (State.StoppedByUser
    where the runtime's inspect shows it; else its events of this run, `stop_signalled`:
    docker and podman 4 show no such field); STOPPED_BY_REBOOT when it ended before the node's
    last boot; None for its own exit, a kill for its memory, or a container that has not
    ended."""
    if state.get("Running") or state.get("OOMKilled"):
        return None
    finished = runtime_time(state.get("FinishedAt"))
    if finished is None:
        return None
    if state.get("StoppedByUser"):
        return STOPPED_BY_RUNTIME
    if boot_time is not None and finished < boot_time:
        return STOPPED_BY_REBOOT
    if "StoppedByUser" not in state and stop_signalled is not None and stop_signalled():
        return STOPPED_BY_RUNTIME
    return None


# --- executors ----------------------------------------------------------------------------


class DryRunExecutor:
    """Runs nothing; answers as if it had. For trying the whole flow without containers."""

    name = "dry-run"

    def __init__(self, *, host: str):
        self.host = host

    def run(self, kind: str, payload: dict, progress: Callable[[dict], None]) -> dict:
        name = payload.get("container_name", "sy-unknown")
        if kind == "prepare":
            progress({"step": "pull", "image": payload.get("image")})
            return {"detail": f"dry run: would pull {payload.get('image')}"}
        if kind == "start":
            ports = {str(p): int(p) for p in payload.get("ports", [])}
            result = {"host": self.host, "ports": ports, "container_id": name}
            if payload.get("ssh_public_keys"):
                result["ssh_port"] = 22
            return result
        if kind == "stop":
            return {"detail": f"dry run: would stop {name}"}
        raise ExecutorError(f"Unknown job kind {kind!r}.")

    def containers(self) -> list[dict]:
        return []

    def notices_apply(self, notices: list[dict]) -> None:
        return None

    def storage_full(self) -> str | None:
        return None


def _ssh_keys(payload: dict) -> list[str]:
    """The workload's SSH public keys, one line each whatever the server let through: a key
    with a line break in it would authorise what follows the break."""
    return [
        k
        for k in payload.get("ssh_public_keys") or []
        if isinstance(k, str) and k and "\n" not in k and "\r" not in k
    ]


@dataclass(frozen=True)
class _DiskVerdict:
    """A runtime's error said a write found no space: whether the disk is full (the node's
    fault), and which disk with its free space (disk_text)."""

    full: bool
    where: str


class ContainerExecutor:
    """Runs workloads with podman or docker through the CLI verbs both share (run, inspect,
    port, logs, stop, rm, pull, network).

    Environment values reach the container through the runtime's own environment (`-e NAME`,
    the value in the CLI process's environment, readable only by the agent's user): never on a
    command line, never in a log line. A container is named after the reservation and labelled
    with it, so the agent finds and adopts it after a restart instead of starting another.
    """

    name = "container"

    def __init__(
        self,
        *,
        host: str,
        runtime: str = "",
        publish_address: str = "",
        state_dir: str,
        gpu_vendor: str = "none",
        nvidia_mode: str = "cdi",
        amd_render_node_base: int = 128,
        node_cpus: float = 0.0,
        node_memory_mib: int = 0,
        readiness_timeout_seconds: float = 120.0,
        allow_private_registries: bool = False,
        runtime_env: dict[str, str] | None = None,
    ):
        found = shutil.which(runtime) if runtime else None
        found = found or (None if runtime else shutil.which("podman") or shutil.which("docker"))
        if not found:
            raise SettingsError(
                f"the container executor needs {runtime or 'podman or docker'} on PATH; "
                "install it, or run with --executor dry-run"
            )
        self.runtime = found
        self.flavour = "docker" if Path(found).name.startswith("docker") else "podman"
        self.host = host
        self.publish_address = publish_address or (host if _is_ip(host) else "0.0.0.0")
        self.state_dir = Path(state_dir)
        self.gpu_vendor = gpu_vendor
        self.nvidia_mode = nvidia_mode
        self.amd_render_node_base = amd_render_node_base
        self.node_cpus = node_cpus or float(os.cpu_count() or 1)
        self.node_memory_mib = node_memory_mib or _node_memory_mib() or 1024
        self.readiness_timeout = readiness_timeout_seconds
        self.allow_private_registries = allow_private_registries
        self.runtime_env = dict(runtime_env or {})
        # Whether the runtime logged a stop or kill of a container's run, by (id, FinishedAt):
        # a run that ended does not change, so its events are read once.
        self._stop_events_seen: dict[tuple[str, str], bool] = {}

    # The runtime's CLI.

    def _cli(
        self, args: list[str], *, env: dict | None = None, timeout: float = 900
    ) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(
                [self.runtime, *args],
                capture_output=True,
                text=True,
                timeout=timeout,
                env={**os.environ, **self.runtime_env, **(env or {})},
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ExecutorError(
                f"{self.flavour} {args[0]} timed out after {timeout:g} s."
            ) from None
        except OSError as exc:
            raise ExecutorError(
                f"cannot run {self.runtime}: {exc.strerror}", node_failure=True
            ) from None

    def _run(self, args: list[str], *, env: dict | None = None, timeout: float = 900) -> str:
        done = self._cli(args, env=env, timeout=timeout)
        if done.returncode != 0:
            message = (done.stderr or done.stdout).strip()[-1000:]
            disk = self._disk_full(message)
            if disk is not None and disk.full:
                raise ExecutorError(
                    f"The node's disk is full ({disk.where}): {self.flavour} {args[0]} failed: "
                    f"{message}",
                    node_failure=True,
                )
            raise ExecutorError(
                f"{self.flavour} {args[0]} failed: {message}"
                + (f" ({disk.where})" if disk is not None else ""),
                node_failure=not self.runtime_usable(),
            )
        return done.stdout

    def _storage_paths(self) -> list[str]:
        """Where the runtime writes images and containers, as its `info` says: podman's graph
        root and the folder it copies images through, docker's root (their defaults if unsaid)."""
        try:
            done = self._cli(["info", "--format", "{{json .}}"], timeout=60)
            info = json.loads(done.stdout) if done.returncode == 0 else {}
        except (ExecutorError, ValueError):
            info = {}
        info = info if isinstance(info, dict) else {}
        if self.flavour == "docker":
            return [info.get("DockerRootDir") or "/var/lib/docker"]
        store = info.get("store") if isinstance(info.get("store"), dict) else {}
        paths = [
            store.get("graphRoot") or "/var/lib/containers/storage",
            store.get("imageCopyTmpDir") or "/var/tmp",
        ]
        return list(dict.fromkeys(paths))

    def _disk_full(self, error: str) -> _DiskVerdict | None:
        """For a runtime's error that says a write found no space (None for any other): whether
        the disk is full, judged on the fullest of its storage paths now (DISK_FULL_FREE_SHARE;
        not on a path the error names, which may be quoted text or inside the image)."""
        if not any(text in error.lower() for text in DISK_FULL_TEXTS):
            return None
        verdict = self._storage_verdict()
        if verdict is None:  # nothing to judge by but the runtime's word
            return _DiskVerdict(full=True, where=disk_text(self._storage_paths()[0], None))
        return verdict

    def _storage_verdict(self) -> _DiskVerdict | None:
        """The fullest of the runtime's storage paths now, and whether it is full
        (DISK_FULL_FREE_SHARE); None when none of them can be measured."""
        measured = [(path, disk_space(path)) for path in self._storage_paths()]
        known = [(path, space) for path, space in measured if space is not None and space[1] > 0]
        if not known:
            return None
        path, space = min(known, key=lambda m: m[1][0] / m[1][1])
        return _DiskVerdict(
            full=space[0] < space[1] * DISK_FULL_FREE_SHARE, where=disk_text(path, space)
        )

    def storage_full(self) -> str | None:
        """What is wrong when the runtime's storage is full now (None when it has room or cannot
        be measured): a node whose disk is full fails every workload alike, whatever else a
        burn-in finds healthy."""
        verdict = self._storage_verdict()
        if verdict is None or not verdict.full:
            return None
        return f"The node's disk is full ({verdict.where})"

    def runtime_usable(self) -> bool:
        """Whether the runtime answers at all (daemon up, storage readable)."""
        try:
            return self._cli(["info", "--format", "{{json .}}"], timeout=60).returncode == 0
        except ExecutorError:
            return False

    def _inspect(self, name: str) -> dict | None:
        done = self._cli(["container", "inspect", name], timeout=60)
        if done.returncode != 0:
            if not self.runtime_usable():
                raise ExecutorError(
                    f"{self.flavour} does not answer: {done.stderr.strip()[-500:]}",
                    node_failure=True,
                )
            return None
        found = json.loads(done.stdout or "[]")
        return found[0] if found else None

    # Jobs.

    def run(self, kind: str, payload: dict, progress: Callable[[dict], None]) -> dict:
        if kind == "prepare":
            return self.prepare(payload, progress)
        if kind == "start":
            return self.start(payload, progress)
        if kind == "stop":
            return self.stop(payload)
        raise ExecutorError(f"Unknown job kind {kind!r}.")

    def prepare(self, payload: dict, progress: Callable[[dict], None]) -> dict:
        image = payload["image"]
        if not self.allow_private_registries:
            refusal = image_registry_refusal(image)
            if refusal:
                raise ExecutorError(refusal)
        if not self.runtime_usable():
            raise ExecutorError(f"{self.flavour} does not answer on this node.", node_failure=True)
        if self._cli(["image", "inspect", image], timeout=60).returncode == 0:
            return {"detail": f"image {image} present"}
        progress({"step": "pull", "image": image})
        done = self._cli(["pull", image])
        if done.returncode != 0:
            if not self.runtime_usable():
                raise ExecutorError(f"{self.flavour} stopped answering.", node_failure=True)
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            disk = self._disk_full(done.stderr or done.stdout)
            if disk is not None and disk.full:
                raise ExecutorError(
                    f"The node's disk is full ({disk.where}): the image {image} could not be "
                    f"pulled: {last[0][-500:]}",
                    node_failure=True,
                )
            if disk is not None:
                raise ExecutorError(
                    f"The image {image} could not be pulled: {last[0][-500:]} (it needs more "
                    f"than the room left: {disk.where})"
                )
            raise ExecutorError(f"The image {image} could not be pulled: {last[0][-500:]}")
        return {"detail": f"pulled {image}"}

    def _network(self, name: str) -> str:
        network = f"{name}-net"
        if self._cli(["network", "inspect", network], timeout=60).returncode != 0:
            done = self._cli(
                ["network", "create", "--label", f"{LABEL_MANAGED}=1", network], timeout=60
            )
            if done.returncode != 0 and "exists" not in done.stderr:
                raise ExecutorError(
                    f"cannot create the network {network}: {done.stderr.strip()[-500:]}",
                    node_failure=True,
                )
        return network

    def _share(self, payload: dict) -> tuple[float, int]:
        """This reservation's CPU and memory: the node's, times its share of the node's GPUs."""
        here = len(payload.get("gpu_indexes", [])) or 1
        total = max(int(payload.get("node_gpu_count") or here), here)
        cpus = max(round(self.node_cpus * here / total, 2), 0.5)
        memory = max(self.node_memory_mib * here // total, 256)
        return cpus, memory

    def run_args(self, payload: dict, *, network: str, notice_dir: str) -> list[str]:
        """The whole `run` command line after the runtime's name (no environment values)."""
        name = payload["container_name"]
        cpus, memory = self._share(payload)
        args = ["run", "-d", "--name", name]
        args += ["--label", f"{LABEL_MANAGED}=1"]
        args += ["--label", f"{LABEL_RESERVATION}={payload['reservation']}"]
        args += ["--label", f"{LABEL_GENERATION}={int(payload.get('generation') or 0)}"]
        gpus = ",".join(str(int(i)) for i in sorted(payload.get("gpu_indexes", [])))
        args += ["--label", f"{LABEL_GPUS}={gpus}"]
        args += isolation_args(network=network, cpus=cpus, memory_mib=memory)
        args += gpu_args(
            self.gpu_vendor,
            payload.get("gpu_indexes", []),
            nvidia_mode=self.nvidia_mode,
            amd_render_node_base=self.amd_render_node_base,
        )
        args += ["--volume", f"{notice_dir}:{NOTICE_DIR_IN_CONTAINER}:ro"]
        args += ["--log-driver", "json-file" if self.flavour == "docker" else "k8s-file"]
        for key in sorted(self._env(payload)):
            args += ["-e", key]
        for port in self._ports(payload):
            args += ["-p", f"{_publish_host(self.publish_address)}::{port}"]
        args.append(payload["image"])
        return args

    @staticmethod
    def _ports(payload: dict) -> list[int]:
        """Port 22 when the customer gave SSH keys, then each port asked for."""
        asked = [int(p) for p in payload.get("ports", [])]
        ssh = [22] if payload.get("ssh_public_keys") else []
        return ssh + [p for p in asked if p not in ssh]

    @classmethod
    def _env(cls, payload: dict) -> dict[str, str]:
        env = dict(payload.get("env", {}))
        refused = sorted(name for name in env if host_env_name(name))
        if refused:
            # Passed by name, it would be in the runtime's own environment (LD_PRELOAD, a
            # containers.conf, another daemon): the job fails rather than run it.
            raise ExecutorError(
                f"The workload sets {', '.join(refused)}, which the container runtime would "
                "read itself; refused."
            )
        # Which container ports are published (and checked for readiness), for the workload.
        env["SWITCHYARD_PORTS"] = " ".join(str(p) for p in cls._ports(payload))
        if _ssh_keys(payload):
            env["SSH_PUBLIC_KEYS"] = "\n".join(_ssh_keys(payload))
        return env

    def _notice_dir(self, name: str, payload: dict) -> Path:
        directory = self.state_dir / name
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)
        keys = "".join(f"{k}\n" for k in _ssh_keys(payload))
        _write_atomic(directory / "authorized_keys", keys, mode=0o644)
        return directory

    def start(self, payload: dict, progress: Callable[[dict], None]) -> dict:
        name = payload["container_name"]
        existing = self._inspect(name)
        if existing is not None and (
            _labels(existing).get(LABEL_RESERVATION) != payload["reservation"]
        ):
            raise ExecutorError(f"A container named {name} exists that this agent did not start.")
        generation = str(int(payload.get("generation") or 0))
        running = _labels(existing).get(LABEL_GENERATION, "0") if existing is not None else None
        if (
            running is not None
            and existing["State"].get("Running")
            and _generation_number(running) > int(generation)
        ):
            # A later placement's container: this start was superseded (its lease ran out
            # while the reservation moved). It must not put the workload back on old GPUs.
            raise ExecutorError(
                f"{name} already runs generation {running}; this start of generation "
                f"{generation} is superseded."
            )
        if (
            existing is not None
            and existing["State"].get("Running")
            and _labels(existing).get(LABEL_GENERATION, "0") != generation
        ):
            # An earlier placement's container (its stop job did not run): it must not keep
            # the GPUs it had. Stopped as a stop job would, then replaced below.
            logger.info(
                "replacing %s of an earlier generation with generation %s", name, generation
            )
            grace = int(payload.get("grace_seconds", 10))
            self._run(["stop", "-t", str(grace), name], timeout=grace + 120)
            existing = self._inspect(name)
        if existing is not None and existing["State"].get("Running"):
            progress({"step": "adopt", "container": name})
            logger.info("adopting running container %s", name)
        else:
            if existing is not None:
                # Left by an agent that crashed before it was ready, or stopped: start afresh.
                logger.info(
                    "removing leftover container %s (%s)", name, existing["State"]["Status"]
                )
                self._run(["rm", "-f", name], timeout=120)
            network = self._network(name)
            try:
                notice_dir = self._notice_dir(name, payload)
            except OSError as exc:
                # The state directory is unusable (a full or read-only disk, a file in its
                # place): the node's fault, and every start here would fail alike.
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ExecutorError(
                        f"The node's disk is full "
                        f"({disk_text(self.state_dir, disk_space(self.state_dir))}): "
                        f"cannot write {self.state_dir / name}: {exc.strerror}",
                        node_failure=True,
                    ) from None
                raise ExecutorError(
                    f"cannot write {self.state_dir / name}: {exc.strerror}", node_failure=True
                ) from None
            progress({"step": "run", "image": payload["image"]})
            self._run(
                self.run_args(payload, network=network, notice_dir=str(notice_dir)),
                env=self._env(payload),
            )
        timeout = float(payload.get("readiness_timeout_seconds") or self.readiness_timeout)
        return self._wait_ready(payload, timeout=timeout, progress=progress)

    def _published(self, name: str) -> dict[int, int]:
        """Container port → host port, from `port NAME` (`8080/tcp -> 127.0.0.1:49153`)."""
        mapped: dict[int, int] = {}
        for line in self._run(["port", name], timeout=60).splitlines():
            inner, _, outer = line.partition("->")
            port = inner.strip().split("/")[0]
            host_port = outer.strip().rsplit(":", 1)[-1]
            if port.isdigit() and host_port.isdigit():
                mapped.setdefault(int(port), int(host_port))
        return mapped

    def _wait_ready(
        self, payload: dict, *, timeout: float, progress: Callable[[dict], None]
    ) -> dict:
        """Until `timeout`: the container runs and every published port accepts TCP on the
        address customers are given. Else the workload's failure, with its last log lines."""
        name = payload["container_name"]
        wanted = self._ports(payload)
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        mapped: dict[int, int] = {}
        waiting: list[int] = wanted
        while True:
            inspected = self._inspect(name) or {}
            state = inspected.get("State", {})
            # Not running and its end not recorded yet: being stopped (podman's "stopping",
            # whose exit code reads 0 until then) or paused. Not ready; judged once it ended.
            ending = (
                bool(inspected)
                and not state.get("Running")
                and runtime_time(state.get("FinishedAt")) is None
            )
            if not state.get("Running") and not ending:
                self._ended_before_ready(inspected, payload, after=time.monotonic() - started)
            if not ending:
                if not mapped and wanted:
                    mapped = self._published(name)
                    missing = [p for p in wanted if p not in mapped]
                    if missing:
                        raise ExecutorError(f"Port(s) {missing} were not published.")
                waiting = [p for p in wanted if not _accepts(self.host, mapped[p])]
                if not waiting:
                    break
            if time.monotonic() >= deadline:
                raise ExecutorError(
                    f"The workload was not ready within {timeout:g} s: port(s) "
                    f"{waiting} did not accept connections on {self.host}."
                    + self._tail_suffix(name, payload)
                )
            progress({"step": "readiness", "waiting_for_ports": waiting})
            time.sleep(0.25)
        inspected = self._inspect(name) or {}
        result = {
            "host": self.host,
            "ports": {str(p): mapped[p] for p in payload.get("ports", [])},
            "container_id": inspected.get("Id", "")[:64],
        }
        if 22 in wanted:
            result["ssh_port"] = mapped[22]
        return result

    def _ended_before_ready(self, inspected: dict, payload: dict, *, after: float) -> None:
        """Raise the failure of a start whose container ended (or vanished) before it was
        ready, `after` seconds after it started: its memory ran out, the site stopped it from
        outside (stopped_by: Switchyard starts it again), or the workload exited by itself."""
        name = payload["container_name"]
        state = inspected.get("State", {})
        # podman says "stopped" or "exited" for the same thing, depending on timing.
        code = state.get("ExitCode")
        if state.get("OOMKilled"):
            raise ExecutorError(
                f"The workload ran out of memory before it was ready (killed with code {code} "
                f"for using more than its {self._share(payload)[1]} MiB, {after:.1f} s after "
                f"start)." + self._tail_suffix(name, payload)
            )
        # Stopped from outside (an operator's stop or kill, a reboot), by the rule the
        # heartbeat applies: the site's doing, which Switchyard retries, not a failure.
        stopped_by = stopped_from_outside(
            state,
            boot_time=node_boot_time(),
            stop_signalled=lambda: self._stop_signalled(inspected),
        )
        if stopped_by:
            raise ExecutorError(
                f"The workload was stopped from outside it before it was ready "
                f"({_STOPPED_BY_TEXT.get(stopped_by, stopped_by)}; code {code}, {after:.1f} s "
                f"after start)." + self._tail_suffix(name, payload),
                stopped_by=stopped_by,
            )
        raise ExecutorError(
            f"The workload exited with code {code} before it was ready ({after:.1f} s after "
            f"start)." + self._tail_suffix(name, payload)
        )

    def log_tail(self, name: str, secrets: Iterable[str]) -> str:
        done = self._cli(["logs", "--tail", str(LOG_TAIL_LINES), name], timeout=60)
        lines = (done.stdout + done.stderr).splitlines() if done.returncode == 0 else []
        return log_tail_bound(lines, secrets)

    def _tail_suffix(self, name: str, payload: dict) -> str:
        tail = self.log_tail(name, self._env(payload).values())
        return f" Last log lines:\n{tail}" if tail else " It wrote no log."

    def stop(self, payload: dict) -> dict:
        """SIGTERM, up to grace_seconds for the workload to exit, then SIGKILL; then remove
        the container, its network and its notice folder."""
        name = payload["container_name"]
        grace = int(payload.get("grace_seconds", 10))
        existing = self._inspect(name)
        detail = f"{name} was already gone"
        if existing is not None and "generation" in payload:
            running = _labels(existing).get(LABEL_GENERATION, "0")
            if _generation_number(running) > int(payload["generation"] or 0):
                # The reservation's later placement runs here now: this stop is of an earlier
                # one's container, which is gone already.
                return {"detail": f"{name} runs generation {running}, left running"}
        if existing is not None:
            if existing["State"].get("Running"):
                self._run(["stop", "-t", str(grace), name], timeout=grace + 120)
            state = (self._inspect(name) or existing)["State"]
            detail = f"stopped {name} (exit code {state.get('ExitCode')})"
            self._run(["rm", "-f", name], timeout=120)
        network = f"{name}-net"
        if self._cli(["network", "inspect", network], timeout=60).returncode == 0:
            self._run(["network", "rm", network], timeout=60)
        shutil.rmtree(self.state_dir / name, ignore_errors=True)
        return {"detail": detail}

    # What the heartbeat reports, and preemption notices.

    def containers(self) -> list[dict]:
        """Every container this agent runs (found by label) and its state. The list is
        complete or not given (ExecutorError): Switchyard ends the reservation of a container
        missing from it."""
        names = self._managed_names()
        if not names:
            return []
        # A container removed since `ps` (a stop job runs meanwhile) fails the inspect of that
        # one only: the others are still printed.
        done = self._cli(["container", "inspect", *names], timeout=60)
        try:
            inspected = json.loads(done.stdout or "[]")
        except ValueError:
            raise ExecutorError(f"{self.flavour} inspect failed: {done.stderr[-500:]}") from None
        if done.returncode != 0:
            # Left out only if it is gone for `ps` too: not for a runtime that failed to answer.
            found = {item.get("Name", "").lstrip("/") for item in inspected}
            unseen = sorted(set(self._managed_names()) & (set(names) - found))
            if unseen:
                raise ExecutorError(
                    f"{self.flavour} inspect failed for {', '.join(unseen)}: "
                    f"{done.stderr.strip()[-500:]}"
                )
        report = []
        for item in inspected:
            labels = _labels(item)
            state = item.get("State", {})
            entry = {
                "name": item.get("Name", "").lstrip("/"),
                "reservation": labels.get(LABEL_RESERVATION, ""),
                "state": state.get("Status", "unknown"),
                "exit_code": None if state.get("Running") else state.get("ExitCode"),
                "finished_at": None if state.get("Running") else state.get("FinishedAt"),
                # Killed by the kernel for going over its --memory (exit code 137 alone could
                # be anyone's SIGKILL): the customer is told which.
                "oom_killed": bool(state.get("OOMKilled")),
            }
            if not state.get("Running"):
                secrets = [e.partition("=")[2] for e in (item.get("Config", {}).get("Env") or [])]
                entry["log_tail"] = self.log_tail(entry["name"], secrets)
                # Stopped from outside (an operator's stop or kill, a reboot): not the
                # workload's own exit, which Switchyard tells the customer it was.
                entry["stopped_by"] = stopped_from_outside(
                    state,
                    boot_time=node_boot_time(),
                    stop_signalled=lambda item=item: self._stop_signalled(item),
                )
            report.append(entry)
        ids = {item.get("Id", "") for item in inspected}
        # A start's readiness wait (another thread) may add to it meanwhile: iterate a copy.
        for key in [k for k in list(self._stop_events_seen) if k[0] not in ids]:
            self._stop_events_seen.pop(key, None)
        return sorted(report, key=lambda e: e["name"])

    def _stop_signalled(self, item: dict) -> bool:
        """Whether the runtime's events show this run of the container (from its start to
        STOP_EVENTS_SETTLE_SECONDS after its end) stopped through the runtime, for a runtime
        whose inspect does not say (docker, podman 4.3): a `stop` or `kill` event (docker logs
        both for its stop; podman 4.3 logs `kill` for its kill and, for its stop, a second
        `cleanup`, the stopping command's own after the one its exit logs). False when the
        events cannot be read: then nothing proves a stop from outside."""
        state = item.get("State") or {}
        key = (item.get("Id", ""), str(state.get("FinishedAt")))
        if key in self._stop_events_seen:
            return self._stop_events_seen[key]
        started = runtime_time(state.get("StartedAt"))
        finished = runtime_time(state.get("FinishedAt"))
        if not key[0] or started is None or finished is None:
            return False
        until = math.ceil(finished + STOP_EVENTS_SETTLE_SECONDS)
        # The stopping command logs its events just after the exit: wait for them (once per
        # run; an --until still to come would make the runtime wait for it instead).
        time.sleep(max(0.0, min(until - time.time(), STOP_EVENTS_SETTLE_SECONDS + 1)))
        # podman 4 with its file log answers an --until in the past with nothing: it is told
        # not to stream instead, and the window is kept below (_run_events).
        end = ["--stream=false"] if self.flavour == "podman" else ["--until", _rfc3339(until)]
        try:
            done = self._cli(
                ["events", "--since", _rfc3339(math.floor(started)), *end,
                 "--filter", f"container={key[0]}", "--format", "{{json .}}"],
                timeout=30,
            )  # fmt: skip
        except ExecutorError as exc:
            logger.warning("cannot read %s's events: %s", self.flavour, exc)
            return False
        if done.returncode != 0:
            logger.warning("cannot read %s's events: %s", self.flavour, done.stderr[-300:])
            return False
        actions = _run_events(done.stdout, started=started, until=until)
        signalled = bool({"stop", "kill"} & set(actions)) or actions.count("cleanup") >= 2
        self._stop_events_seen[key] = signalled
        return signalled

    def _managed_names(self) -> list[str]:
        return self._run(
            ["ps", "-a", "--filter", f"label={LABEL_MANAGED}=1", "--format", "{{.Names}}"],
            timeout=60,
        ).split()

    def notices_apply(self, notices: list[dict]) -> None:
        """Write /run/switchyard/preemption in each noticed container (time and reason, JSON);
        remove it from containers whose notice was withdrawn."""
        noticed = {n["container"]: n for n in notices}
        if not self.state_dir.is_dir():
            return
        for directory in self.state_dir.iterdir():
            if not directory.name.startswith("sy-"):
                continue  # the agent's own files (agent.lock, agent-id, status.json)
            path = directory / "preemption"
            notice = noticed.get(directory.name)
            try:
                if notice is None:
                    path.unlink(missing_ok=True)
                    continue
                body = json.dumps(
                    {"preempt_at": notice["preempt_at"], "reason": notice.get("reason", "")}
                )
                if not path.exists() or path.read_text() != body + "\n":
                    _write_atomic(path, body + "\n", mode=0o644)
                    logger.info(
                        "preemption notice for %s: %s", directory.name, notice["preempt_at"]
                    )
            except OSError as exc:  # removed by a stop job meanwhile
                logger.info("no notice folder for %s: %s", directory.name, exc.strerror)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _run_events(lines: str, *, started: float, until: float) -> list[str]:
    """The verbs of a container's events (`events --format '{{json .}}'`, one JSON object a
    line) logged from `started` to `until`: podman names them Status (with Time), docker
    Action (with timeNano)."""
    verbs = []
    for line in lines.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        nanos = event.get("timeNano")
        at = nanos / 1e9 if isinstance(nanos, int) else runtime_time(event.get("Time"))
        if at is not None and not started <= at <= until:
            continue  # the second before its start (a previous run's) or after the window
        verbs.append(str(event.get("Action") or event.get("Status") or "").lower())
    return verbs


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _publish_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _generation_number(label: str) -> int:
    """A container's generation label as a number (-1 when unreadable: treated as older)."""
    try:
        return int(label)
    except ValueError:
        return -1


def _labels(inspected: dict) -> dict[str, str]:
    return (inspected.get("Config") or {}).get("Labels") or {}


def _accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _write_atomic(path: Path, text: str, *, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# --- the API and the loop -----------------------------------------------------------------


# Retry-After (on a 429, or a 503) is obeyed up to this many seconds, so a wrong header
# cannot silence the node for long; a request refused this way is sent again at most
# RETRY_AFTER_RETRIES times, so a job's report is not lost to a rate limit.
RETRY_AFTER_MAX_SECONDS = 120.0
RETRY_AFTER_RETRIES = 3
# What a request to an API that cannot be reached (down, reset, timed out) raises.
API_UNREACHABLE = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)
# A finished job's report (complete or fail) is sent again through an API outage or 5xx
# answers, this long at most: the server takes it from the lease's holder even after the
# lease ran out, so the work is not done again once the API is back.
REPORT_RETRY_SECONDS = 600.0
# A job's progress of one step is sent at most this often (the renewals keep its lease).
PROGRESS_REPEAT_SECONDS = 5.0


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """A Retry-After header's wait in seconds (a number, or an HTTP date), at most
    RETRY_AFTER_MAX_SECONDS; None when there is none or it cannot be read."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_SECONDS)


class AgentClient:
    """POSTs to the API with the node token. A 429 or 503 with Retry-After pauses every
    request of this client (the heartbeat's, the loop's, the jobs') until then, and the
    refused request is sent again after it, so the agent slows down to what the API allows
    instead of dropping its reports."""

    def __init__(
        self,
        *,
        api: str,
        token: str,
        timeout: float = 15,
        retries: int = RETRY_AFTER_RETRIES,
        instance: str = "",
    ):
        self.api = api.rstrip("/")
        self.token = token
        # This agent's id (agent_instance_id): Switchyard refuses a second agent that uses the
        # node's token while this one is heard (409 agent_conflict).
        self.instance = instance
        self.timeout = timeout
        self.retries = retries
        self._paused_until = 0.0  # time.monotonic(): no request leaves before then
        self._pause_lock = threading.Lock()

    def post(self, path: str, body: dict, *, request_id: str = "") -> tuple[int, dict | None]:
        for attempt in range(self.retries + 1):
            self._wait_out_pause()
            status, answer, retry_after = self._send(path, body, request_id=request_id)
            if status not in (429, 503) or retry_after is None:
                return status, answer
            self._pause(retry_after)
            logger.warning(
                "%s answered %s: waiting %.0f s as Retry-After says%s",
                path, status, retry_after, "" if attempt < self.retries else "; giving up",
            )  # fmt: skip
        return status, answer

    def _pause(self, seconds: float) -> None:
        with self._pause_lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def _wait_out_pause(self) -> None:
        while (wait := self._paused_until - time.monotonic()) > 0:
            time.sleep(wait)

    def _send(
        self, path: str, body: dict, *, request_id: str
    ) -> tuple[int, dict | None, float | None]:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": f"switchyard-site-agent/{AGENT_VERSION}",
        }
        if self.instance:
            headers[INSTANCE_HEADER] = self.instance
        if request_id:
            # A job's reports carry the id of the request behind it, so the server's log lines
            # for them can be found with that request's.
            headers["X-Request-Id"] = request_id
        request = urllib.request.Request(
            f"{self.api}/api/v1/{path}", data=json.dumps(body).encode(), method="POST",
            headers=headers,
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                raw = response.read()
                return response.status, json.loads(raw) if raw else None, None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            retry_after = retry_after_seconds(exc.headers.get("Retry-After"))
            try:
                return exc.code, json.loads(raw) if raw else None, retry_after
            except ValueError:
                message = {"error": {"message": raw.decode(errors="replace")[:500]}}
                return exc.code, message, retry_after


# The heartbeat interval an API may set (its answer's heartbeat_seconds): anything outside is
# taken as the nearest bound, so a misconfigured server can neither flood itself nor make
# its nodes look silent.
SERVER_HEARTBEAT_SECONDS = (1.0, 300.0)


def server_heartbeat_seconds(answer: object) -> float | None:
    """The heartbeat interval a heartbeat's answer sets, within SERVER_HEARTBEAT_SECONDS; None
    when it sets none (an older API) or not a number (ignored: the agent keeps its own)."""
    value = answer.get("heartbeat_seconds") if isinstance(answer, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    low, high = SERVER_HEARTBEAT_SECONDS
    return min(max(float(value), low), high)


def _error_text(body: object) -> str:
    """An API error body (type, code, field, message) in one line."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "no reason given"
    field_name = error.get("field")
    message = str(error.get("message") or error.get("code") or "no reason given")
    return f"{field_name}: {message}" if field_name else message


def _error_code(body: object) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code") or "") if isinstance(error, dict) else ""


def status_file_path(settings: Settings) -> Path:
    return Path(settings.status_file or Path(settings.state_dir) / "status.json")


def status_write(
    path: Path, *, heartbeat_seconds: float | None = None, now: float | None = None
) -> None:
    """Record a heartbeat the API accepted, for orchestrators (`switchyard-agent --check`),
    with the interval the agent now heartbeats at (the API's may differ from the config's)."""
    now = time.time() if now is None else now
    body = {"last_heartbeat_at": now, "agent_version": AGENT_VERSION, "pid": os.getpid()}
    if heartbeat_seconds is not None:
        body["heartbeat_seconds"] = heartbeat_seconds
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, json.dumps(body), mode=0o644)
    except OSError as exc:
        logger.warning("cannot write the status file %s: %s", path, exc)


def status_check(path: Path, *, heartbeat_seconds: float, now: float | None = None) -> str | None:
    """None when the last accepted heartbeat is at most three intervals old (at least 30 s),
    else what is wrong. The interval is the one the status file records (the agent's, which
    the API may have set), else `heartbeat_seconds` (the config's)."""
    now = time.time() if now is None else now
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
        last = float(status["last_heartbeat_at"])
        heartbeat_seconds = float(status.get("heartbeat_seconds", heartbeat_seconds))
    except FileNotFoundError:
        return f"no heartbeat recorded yet ({path} does not exist)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable status file {path}: {exc}"
    max_age_seconds = max(3 * heartbeat_seconds, 30)
    age = now - last
    if age > max_age_seconds:
        return f"last accepted heartbeat {age:.0f} s ago (more than {max_age_seconds:.0f} s)"
    return None


class Agent:
    def __init__(
        self,
        *,
        client: AgentClient,
        executor,
        lease_seconds: int = 60,
        max_parallel_jobs: int = 4,
        status_file: Path | None = None,
    ):
        self.client = client
        self.executor = executor
        self.status_file = status_file
        self.lease_seconds = lease_seconds
        self.max_parallel_jobs = max_parallel_jobs
        self.kernel_cursor = _gpu_telemetry.KernelEventCursor() if _gpu_telemetry else None
        self.workloads_reported: list[dict] | None = None  # the last report the API accepted
        # Set by a heartbeat whose answer says work waits for this node (a job or a burn-in to
        # lease): the idle loop waits on it instead of polling. work_signalled: the last
        # heartbeat was answered, with that field (an older API's answer has none; then the
        # loop polls as it always did).
        self.work_waiting = threading.Event()
        self.work_signalled = False
        # The heartbeat interval: heartbeat_seconds (the node's setting, given to loop) until
        # the API's answer sets one, and whenever an answer sets none (an older API); with
        # heartbeat_pinned (the setting was given for this node), always. An unanswered
        # heartbeat changes nothing: an API that asked for a slower pace is not retried faster
        # while it is down.
        self.heartbeat_seconds = self.heartbeat_interval = 10.0
        self.heartbeat_pinned = False
        # The jobs this agent runs now, by id: one leased again while it runs (its lease ran
        # out during an API outage) goes on under the new lease instead of running twice.
        self.jobs_running: dict[int, dict] = {}
        self.jobs_lock = threading.Lock()
        # Switchyard's word while another agent uses this node's token (409 agent_conflict on
        # the last heartbeat): this one leases nothing until a heartbeat is accepted again.
        self.conflict: str | None = None

    def telemetry(self) -> dict | None:
        """Per-GPU readings for the heartbeat (gpu_telemetry.py); None on a node without
        nvidia-smi, amd-smi or rocm-smi (nothing to report) or without the module."""
        if _gpu_telemetry is None:
            return None
        report = _gpu_telemetry.telemetry_collect(cursor=self.kernel_cursor)
        return None if report.get("source") == "none" else report

    def heartbeat(self) -> bool:
        """Say the node is alive with its GPUs' telemetry, report every container and its
        state, apply the notices. A node that runs no container, and said so last time, sends
        no report: nothing can have exited and no notice has a container to go to."""
        beat: dict = {"agent_version": AGENT_VERSION}
        telemetry = self.telemetry()
        if telemetry is not None:
            beat["telemetry"] = telemetry
        try:
            status, body = self.client.post("agent/heartbeat", beat)
            if status == 400 and telemetry is not None:
                # Readings Switchyard refuses (a GPU its inventory does not have, a value it
                # does not take) must not cost the node its liveness: sent again without
                # them, saying why, which staff see as the node's telemetry error.
                logger.warning("heartbeat refused with its telemetry: %s", body)
                beat["telemetry"] = {
                    "source": str(telemetry.get("source", ""))[:40],
                    "gpus": [],
                    "unreadable": f"telemetry refused by Switchyard: {_error_text(body)}"[:500],
                }
                status, body = self.client.post("agent/heartbeat", beat)
        except Exception:
            self.work_signalled = False  # no answer: the loop polls until one comes
            raise
        self.work_signalled = (
            status == 200 and isinstance(body, dict) and isinstance(body.get("work_waiting"), bool)
        )
        if self.work_signalled and body["work_waiting"]:
            self.work_waiting.set()
        if status == 401:
            raise SettingsError("the API refused the node token (revoked or wrong)")
        if status == 409 and _error_code(body) == "agent_conflict":
            if self.conflict is None:
                logger.error("refused, so no job runs here: %s", _error_text(body))
            self.conflict = _error_text(body)
            return False
        self.conflict = None
        if status != 200:
            logger.warning("heartbeat answered %s: %s", status, body)
            return False
        self._heartbeat_interval_set(server_heartbeat_seconds(body))
        if self.status_file is not None:
            status_write(self.status_file, heartbeat_seconds=self.heartbeat_interval)
        try:
            containers = self.executor.containers()
        except ExecutorError as exc:
            logger.warning("cannot list containers: %s", exc)
            return True
        if not containers and self.workloads_reported == []:
            return True
        status, body = self.client.post("agent/workloads", {"containers": containers})
        if status == 200 and body is not None:
            self.workloads_reported = containers
            self.executor.notices_apply(body.get("notices", []))
        else:
            logger.warning("workload report answered %s: %s", status, body)
        return True

    def _heartbeat_interval_set(self, told: float | None) -> None:
        """Follow the interval an answered heartbeat set (None: it set none)."""
        interval = self.heartbeat_seconds if self.heartbeat_pinned or told is None else told
        if interval != self.heartbeat_interval:
            logger.info(
                "heartbeating every %g s (%s)",
                interval,
                "as Switchyard asks" if interval == told else "heartbeat_seconds",
            )
            self.heartbeat_interval = interval

    def run_one(self) -> bool:
        """Lease and run one job; False when there was none."""
        job = self.lease()
        if job is None:
            return False
        self.run_job(job)
        return True

    def lease(self) -> dict | None:
        """This node's next job, or None."""
        if self.conflict is not None:
            return None  # another agent runs the node's jobs
        status, job = self.client.post("agent/jobs/lease", {"lease_seconds": self.lease_seconds})
        if status == 204:
            return None
        if status != 200 or job is None:
            logger.warning("lease answered %s: %s", status, job)
            return None
        return job

    def run_job(self, job: dict) -> None:
        """Run a leased job through the executor (renewing its lease) and report its end."""
        job_id = job["id"]
        request_id = job.get("request_id") or ""
        logger.info(
            "job %s: %s for %s (request %s)",
            job_id, job["kind"], job["reservation"], request_id or "-",
        )  # fmt: skip
        with self.jobs_lock:
            self.jobs_running[job_id] = job
        stop_renewing = threading.Event()
        last_sent = {"step": None, "at": -PROGRESS_REPEAT_SECONDS}
        sent_lock = threading.Lock()

        def send_progress(progress: dict) -> None:
            # Never raises: the API being unreachable a moment must not abort the job (the
            # next renewal, or the final report, gets through once it is back).
            try:
                self.client.post(
                    f"agent/jobs/{job_id}/progress",
                    {
                        "lease_id": job["lease_id"],
                        "progress": progress,
                        "lease_seconds": self.lease_seconds,
                    },
                    request_id=request_id,
                )
            except API_UNREACHABLE as exc:
                logger.warning("job %s: progress not reported: %s", job_id, exc)

        def report_progress(progress: dict) -> None:
            # The executor's: the same step again within PROGRESS_REPEAT_SECONDS is not sent (a
            # start waiting for its ports says so four times a second, and a few at once went
            # over the node's request limit, whose 429 pauses the heartbeats too). The
            # renewals below are always sent: they keep the lease.
            with sent_lock:
                now = time.monotonic()
                if progress.get("step") == last_sent["step"] and (
                    now - last_sent["at"] < PROGRESS_REPEAT_SECONDS
                ):
                    return
                last_sent.update(step=progress.get("step"), at=now)
            send_progress(progress)

        def renew() -> None:
            while not stop_renewing.wait(max(1.0, self.lease_seconds / 3)):
                send_progress({"step": "running"})

        renewer = threading.Thread(target=renew, daemon=True)
        renewer.start()
        try:
            result = self.executor.run(job["kind"], job["payload"], report_progress)
        except ExecutorError as exc:
            stop_renewing.set()
            body = {"error": str(exc)[:2000], "node_failure": exc.node_failure}
            if exc.stopped_by:
                body["stopped_by"] = exc.stopped_by  # the site's doing: the start is retried
            code, _answer = self._job_report(job, "fail", body)
            # The message may quote the workload's log: only its first line goes to our log.
            logger.warning(
                "job %s failed: %s (reported: %s)", job_id, str(exc).splitlines()[0], code
            )
            return
        except BaseException:
            with self.jobs_lock:
                self.jobs_running.pop(job_id, None)
            raise
        finally:
            stop_renewing.set()
            renewer.join(timeout=5)
        code, answer = self._job_report(job, "complete", {"result": result})
        if code == 200:
            logger.info("job %s done", job_id)
        else:
            # 409: the lease passed to another agent while this one was slow; its result stands.
            logger.warning("job %s completion refused (%s): %s", job_id, code, answer)

    def job_lease_again(self, job: dict) -> bool:
        """Whether a leased job is one this agent runs already (its lease ran out while the
        API was unreachable, and the API handed it out again): it goes on under the new lease,
        and is not started a second time."""
        with self.jobs_lock:
            running = self.jobs_running.get(job["id"])
            if running is None:
                return False
            running["lease_id"] = job["lease_id"]
        logger.info(
            "job %s leased again while it runs here: going on under the new lease", job["id"]
        )
        return True

    def _job_report(self, job: dict, action: str, body: dict) -> tuple[int | None, dict | None]:
        """Report a finished job (`complete` or `fail`) under its current lease. Sent again,
        with growing pauses for up to REPORT_RETRY_SECONDS, while the API is unreachable or
        answers 5xx; and at once when it was refused because the job was leased again here
        meanwhile (job_lease_again). The job stops being this agent's once this returns."""
        deadline = time.monotonic() + REPORT_RETRY_SECONDS
        pause = 1.0
        try:
            while True:
                lease_id = job["lease_id"]
                try:
                    code, answer = self.client.post(
                        f"agent/jobs/{job['id']}/{action}",
                        {"lease_id": lease_id, **body},
                        request_id=job.get("request_id") or "",
                    )
                except API_UNREACHABLE as exc:
                    code, answer = None, {"error": {"message": str(exc)}}
                with self.jobs_lock:
                    if code == 409 and job["lease_id"] != lease_id:
                        continue
                    if (code is not None and code < 500) or time.monotonic() >= deadline:
                        self.jobs_running.pop(job["id"], None)
                        return code, answer
                logger.warning(
                    "job %s: %s not reported (%s); sending it again in %.0f s",
                    job["id"], action, code or answer["error"]["message"], pause,
                )  # fmt: skip
                time.sleep(pause)
                pause = min(pause * 2, 30.0)
        except BaseException:
            with self.jobs_lock:
                self.jobs_running.pop(job["id"], None)
            raise

    def burn_in_one(self) -> bool:
        """Lease and run this node's burn-in, if one is queued (burn_in.py); False if none."""
        if _burn_in is None or self.conflict is not None:
            return False
        status, job = self.client.post("agent/burn-ins/lease", {})
        if status != 200 or job is None:
            if status != 204:
                logger.warning("burn-in lease answered %s: %s", status, job)
            return False
        logger.info(
            "burn-in %s: %s (limit %s s)", job["id"], job["command"], job["time_limit_seconds"]
        )
        full = getattr(self.executor, "storage_full", lambda: None)()
        if full:
            # The GPUs may be fine, but a passed burn-in would put the node back on sale with no
            # room for the next workload's image: it fails here, saying why.
            result = {
                "exit_code": None,
                "timed_out": False,
                "output": f"{full}: the burn-in was not run. Free room on it, then queue "
                "another burn-in.",
            }
        else:
            result = _burn_in.burn_in_run(job)
        code, body = self.client.post(
            f"agent/burn-ins/{job['id']}/result",
            {k: result[k] for k in ("exit_code", "timed_out", "output")},
        )
        logger.info("burn-in %s: exit %s, reported (%s)", job["id"], result["exit_code"], code)
        return True

    def loop(
        self,
        *,
        poll_seconds: float,
        heartbeat_seconds: float,
        once: bool,
        idle_poll_seconds: float = 300.0,
        heartbeat_pinned: bool = False,
    ) -> None:
        """Heartbeat, then run jobs until stopped. Heartbeats have their own thread, so a long
        pull, readiness wait or grace period never makes the node look silent (offline).

        Heartbeats come every heartbeat_seconds until an answer sets the interval (the API's
        heartbeat_seconds, which the operator sets for the whole fleet), then at that pace;
        heartbeat_pinned (the node's own setting was given) keeps heartbeat_seconds.

        While jobs run (or one was just leased) the loop leases every poll_seconds. Idle (the
        last leases found nothing and nothing runs) it waits until a heartbeat's answer says
        work waits, so an idle node sends only its heartbeats, and a job queued for it starts
        within one heartbeat; it still leases every idle_poll_seconds, should a signal be
        missed. Against an API whose answer does not say (an older one), it polls as before.
        """
        refused: list[SettingsError] = []
        stop = threading.Event()
        self.heartbeat_seconds = self.heartbeat_interval = heartbeat_seconds
        self.heartbeat_pinned = heartbeat_pinned

        def beat() -> None:
            try:
                self.heartbeat()
            except API_UNREACHABLE as exc:
                logger.warning("API unreachable for the heartbeat: %s; retrying", exc)
            except SettingsError:
                raise
            except Exception:  # noqa: BLE001 (the heartbeat must outlive any one failure)
                logger.exception("heartbeat failed; retrying")

        def beat_forever() -> None:
            while not stop.wait(self.heartbeat_interval):  # the last answer's, or ours
                try:
                    beat()
                except SettingsError as exc:  # the token was revoked: the agent must stop
                    refused.append(exc)
                    self.work_waiting.set()  # wakes an idle loop to stop
                    return

        beat()
        if not once:
            threading.Thread(target=beat_forever, name="heartbeat", daemon=True).start()
        # Jobs run side by side (up to max_parallel_jobs): one workload's readiness wait or
        # grace period does not hold up another's start or stop (and its billing).
        running: list[threading.Thread] = []
        try:
            while not refused:
                running = [t for t in running if t.is_alive()]
                job = None
                idle = False
                # A heartbeat that says work waits from here on wakes the wait below, even one
                # answered while the leases are on their way.
                self.work_waiting.clear()
                try:
                    if len(running) < self.max_parallel_jobs:
                        job = self.lease()
                    if job is not None and self.job_lease_again(job):
                        continue
                    if job is not None:
                        worker = threading.Thread(
                            target=self._run_job_logged, args=(job,), name=f"job-{job['id']}"
                        )
                        worker.start()
                        running.append(worker)
                        continue  # lease the next one at once
                    if not running and self.burn_in_one():  # a burn-in needs the node idle
                        continue
                    idle = not running
                except API_UNREACHABLE as exc:
                    logger.warning("API unreachable: %s; retrying", exc)
                if once and not running:
                    return
                signalled = idle and self.work_signalled
                self.work_waiting.wait(idle_poll_seconds if signalled else poll_seconds)
            raise refused[0]
        finally:
            stop.set()
            for worker in running:
                worker.join()

    def _run_job_logged(self, job: dict) -> None:
        try:
            self.run_job(job)
        except Exception:  # noqa: BLE001 (one job's crash must not stop the agent)
            logger.exception(
                "job %s crashed; its lease will expire and it will be retried", job["id"]
            )


def executor_build(settings: Settings):
    if settings.executor == "dry-run":
        return DryRunExecutor(host=settings.host)
    return ContainerExecutor(
        host=settings.host,
        runtime=settings.runtime,
        publish_address=settings.publish_address,
        state_dir=settings.state_dir,
        gpu_vendor=settings.gpu_vendor,
        nvidia_mode=settings.nvidia_mode,
        amd_render_node_base=settings.amd_render_node_base,
        node_cpus=settings.node_cpus,
        node_memory_mib=settings.node_memory_mib,
        readiness_timeout_seconds=settings.readiness_timeout_seconds,
        allow_private_registries=settings.allow_private_registries,
    )


def arguments_add(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The agent's flags (also offered by `manage.py site_agent`)."""
    p.add_argument("--config", help="TOML file with any of the settings below (by their names)")
    p.add_argument("--api", help="base URL of Switchyard, e.g. https://switchyard.example")
    p.add_argument("--token-file", help="file holding the node token (mode 600)")
    p.add_argument("--executor", choices=sorted(_CHOICES["executor"]))
    p.add_argument("--runtime", help="podman or docker (name on PATH or path)")
    p.add_argument("--host", help="the address customers connect to")
    p.add_argument("--publish-address", help="address ports are published on (default: --host)")
    p.add_argument("--state-dir", help="where notice folders are kept")
    p.add_argument("--gpu-vendor", choices=sorted(_CHOICES["gpu_vendor"]))
    p.add_argument("--nvidia-mode", choices=sorted(_CHOICES["nvidia_mode"]))
    p.add_argument("--amd-render-node-base", type=int)
    p.add_argument("--node-cpus", type=float)
    p.add_argument("--node-memory-mib", type=int)
    p.add_argument("--readiness-timeout-seconds", type=float)
    p.add_argument("--allow-private-registries", action="store_const", const=True, default=None)
    p.add_argument("--lease-seconds", type=int)
    p.add_argument("--max-parallel-jobs", type=int)
    p.add_argument("--poll-seconds", type=float)
    p.add_argument("--heartbeat-seconds", type=float,
                   help="heartbeat this often whatever Switchyard asks (default: as it asks, "
                        "10 s until it does)")  # fmt: skip
    p.add_argument("--idle-poll-seconds", type=float,
                   help="idle, lease this often even if no heartbeat says work waits")  # fmt: skip
    p.add_argument("--status-file", help="where each accepted heartbeat is recorded")
    p.add_argument("--once", action="store_const", const=True, default=None,
                   help="run the jobs waiting now, then exit")  # fmt: skip
    return p


def _parser() -> argparse.ArgumentParser:
    description = __doc__.split("\n")[0]
    p = arguments_add(argparse.ArgumentParser(prog="switchyard-agent", description=description))
    p.add_argument("--check", action="store_true",
                   help="exit 0 if the running agent's last heartbeat was accepted within three "
                        "heartbeat intervals (at least 30 s), else 1: for orchestrators' probes")  # fmt: skip
    return p


def logging_setup() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(threadName)s %(name)s %(message)s",
        stream=sys.stdout,
    )


INSTANCE_HEADER = "X-Switchyard-Agent"
_INSTANCE_FILE = "agent-id"


def agent_instance_id(state_dir: str) -> str:
    """This node's agent's id, made once and kept in <state_dir>/agent-id: an agent restarted
    on the node keeps it (and goes on at once), while a second agent using the same token (a
    copied token, a cloned node) has another, which Switchyard refuses while this one is heard:
    it would report none of this node's containers (restarting its workloads) and run its jobs
    elsewhere. Call with the state directory's lock held."""
    path = Path(state_dir) / _INSTANCE_FILE
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        value = ""
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"cannot read {path}: {exc}") from None
    if len(value) == 32 and all(c in "0123456789abcdef" for c in value):
        return value
    value = os.urandom(16).hex()
    try:
        _write_atomic(path, value + "\n", mode=0o600)
    except OSError as exc:
        raise SettingsError(f"cannot write {path}: {exc.strerror}") from None
    return value


def single_agent_lock(state_dir: str):
    """An exclusive lock on <state_dir>/agent.lock, held as long as the returned file is open:
    a second agent started on the node by mistake would lease the same jobs, start their
    containers twice and tear down the other's. SettingsError while another holds it."""
    path = Path(state_dir) / "agent.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path, "a+")  # noqa: SIM115 (held open for the agent's whole life)
    except OSError as exc:
        raise SettingsError(f"cannot use the state directory {state_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise SettingsError(
            f"another agent already runs with the state directory {state_dir} (pid {holder}): "
            "one agent per node"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def main(
    argv: list[str] | None = None, *, token: str | None = None, flags: dict | None = None
) -> int:
    """The console entry point. The development wrapper passes parsed `flags` and a `token`
    (which skips the token file)."""
    args = dict(flags) if flags is not None else vars(_parser().parse_args(argv))
    args.setdefault("config", None)
    check = args.pop("check", False)
    logging_setup()
    try:
        settings = settings_load(args, config_path=args.pop("config"))
        if check:
            problem = status_check(
                status_file_path(settings), heartbeat_seconds=settings.heartbeat_seconds
            )
            print(
                f"switchyard-agent: {problem or 'ok'}", file=sys.stderr if problem else sys.stdout
            )
            return 1 if problem else 0
        token = token or token_read(settings.token_file)
        executor = executor_build(settings)
        held = single_agent_lock(settings.state_dir)  # noqa: F841 (held until main returns)
        instance = agent_instance_id(settings.state_dir)
    except SettingsError as exc:
        print(f"switchyard-agent: {exc}", file=sys.stderr)
        return 2
    runtime = getattr(executor, "runtime", "no runtime")
    logger.info(
        "site agent %s (%s, %s) for %s, customers connect to %s",
        AGENT_VERSION, executor.name, runtime, settings.api, settings.host,
    )  # fmt: skip
    agent = Agent(
        client=AgentClient(api=settings.api, token=token, instance=instance),
        executor=executor,
        lease_seconds=settings.lease_seconds,
        max_parallel_jobs=settings.max_parallel_jobs,
        status_file=status_file_path(settings),
    )
    try:
        agent.loop(
            poll_seconds=settings.poll_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            once=settings.once,
            idle_poll_seconds=settings.idle_poll_seconds,
            heartbeat_pinned="heartbeat_seconds" in settings.given,
        )
    except SettingsError as exc:
        print(f"switchyard-agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
