"""Real containers for the site agent's tests: podman with runc (scripts/podman/containers.conf)
and a workload image built once per run from Debian's busybox-static (scripts/podman_image.py).

`make test` installs podman, runc and busybox-static when they are missing
(scripts/ensure_podman.sh); run alone, these tests fail saying what to install.
"""

import sys
import uuid
from pathlib import Path

import pytest
from switchyard_agent import ContainerExecutor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from podman_image import (  # noqa: E402
    CONTAINERS_CONF,
    RUNTIME_ENV,
    ImageError,
    podman,
    workload_image_build,
)

__all__ = ["CONTAINERS_CONF", "RUNTIME_ENV", "podman"]


@pytest.fixture(scope="session", name="test_image")
def test_image_fixture() -> str:
    """The workload image (scripts/podman_image.py), built at most once per run."""
    try:
        return workload_image_build()
    except ImageError as exc:
        pytest.fail(
            f"The site agent's container tests cannot run: {exc}. `make test` installs what "
            "they need, or run 'apt-get install -y podman runc busybox-static'."
        )


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
