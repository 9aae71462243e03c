"""Real containers for the site agent's tests: podman with runc (tests/agent/containers.conf)
and a workload image built once per run from Debian's busybox-static.

`make test` installs podman, runc and busybox-static when they are missing
(scripts/ensure_podman.sh); run alone, these tests fail saying what to install.
"""

import hashlib
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from switchyard_agent import ContainerExecutor

HERE = Path(__file__).resolve().parent
CONTAINERS_CONF = HERE / "containers.conf"
RUNTIME_ENV = {"CONTAINERS_CONF": str(CONTAINERS_CONF)}
BUSYBOX = Path("/bin/busybox")


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **RUNTIME_ENV},
    )


@pytest.fixture(scope="session", name="test_image")
def test_image_fixture(tmp_path_factory) -> str:
    """localhost/switchyard-test:<hash of its sources>, built at most once per run."""
    if not shutil.which("podman") or not BUSYBOX.exists():
        pytest.fail(
            "The site agent's container tests need podman, runc and busybox-static: "
            "`make test` installs them, or run 'apt-get install -y podman runc busybox-static'."
        )
    sources = [HERE / "image" / "Containerfile", HERE / "image" / "workload.sh"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
    tag = f"localhost/switchyard-test:{digest}"
    if podman("image", "exists", tag, check=False).returncode != 0:
        context = tmp_path_factory.mktemp("image")
        for path in sources:
            shutil.copy(path, context / path.name)
        shutil.copy(BUSYBOX, context / "busybox")
        podman("build", "-q", "-t", tag, str(context), timeout=300)
    return tag


@pytest.fixture
def executor_factory(tmp_path, test_image):
    """Executors on this machine's podman; every container and network they made is removed."""
    made: list[ContainerExecutor] = []

    def build(**overrides) -> ContainerExecutor:
        options = {
            "host": "127.0.0.1",
            "runtime": "podman",
            "state_dir": str(tmp_path / "state"),
            "node_cpus": 2.0,
            "node_memory_mib": 1024,
            "readiness_timeout_seconds": 10.0,
            "allow_private_registries": True,  # the test image is localhost/…
            "runtime_env": RUNTIME_ENV,
            **overrides,
        }
        executor = ContainerExecutor(**options)
        made.append(executor)
        return executor

    yield build
    for name in _names_made:
        podman("rm", "-f", "-t", "0", name, check=False)
        podman("network", "rm", "-f", f"{name}-net", check=False)
    _names_made.clear()


_names_made: list[str] = []


@pytest.fixture
def payload_for(test_image):
    """A job payload for a fresh reservation (unique names: runs may share the machine)."""

    def build(**workload) -> dict:
        reservation = f"rsv_test{uuid.uuid4().hex[:12]}"
        name = f"sy-{reservation}"
        _names_made.append(name)
        return {
            "reservation": reservation,
            "container_name": name,
            "gpu_indexes": [0],
            "node_gpu_count": 2,
            "image": test_image,
            "env": {},
            "ssh_public_keys": [],
            "ports": [],
            "readiness_timeout_seconds": 10,
            **workload,
        }

    return build


def no_progress(_progress: dict) -> None:
    return None
