"""The workload image the site agent's tests and the demo run: busybox (Debian's
busybox-static) and scripts/podman/workload-image/workload.sh, built locally so that no
registry is needed. Podman runs with scripts/podman/containers.conf (runc, cgroupfs).

    python scripts/podman_image.py        # builds it if missing, prints its tag
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "podman"
CONTAINERS_CONF = HERE / "containers.conf"
RUNTIME_ENV = {"CONTAINERS_CONF": str(CONTAINERS_CONF)}
BUSYBOX = Path("/bin/busybox")
SOURCES = [HERE / "workload-image" / "Containerfile", HERE / "workload-image" / "workload.sh"]


class ImageError(Exception):
    pass


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **RUNTIME_ENV},
    )


def workload_image_build() -> str:
    """localhost/switchyard-workload:<hash of its sources>, built only when missing."""
    if not shutil.which("podman") or not shutil.which("runc") or not BUSYBOX.exists():
        raise ImageError("podman, runc and busybox-static are needed (scripts/ensure_podman.sh)")
    if podman("info", check=False, timeout=60).returncode != 0:
        raise ImageError("podman does not work here with scripts/podman/containers.conf")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]
    tag = f"localhost/switchyard-workload:{digest}"
    # One build at a time (the suite's two workers, `make run`), each after the last has ended.
    with open(Path(tempfile.gettempdir()) / "switchyard-workload-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if podman("image", "exists", tag, check=False).returncode != 0:
            _build(tag)
    return tag


def _build(tag: str) -> None:
    with tempfile.TemporaryDirectory() as context:
        for path in SOURCES:
            shutil.copy(path, Path(context) / path.name)
        shutil.copy(BUSYBOX, Path(context) / "busybox")
        done = podman("build", "-q", "-t", tag, context, check=False, timeout=300)
        if done.returncode != 0:
            raise ImageError(f"podman build failed: {done.stderr.strip()[-500:]}")


if __name__ == "__main__":
    try:
        print(workload_image_build())
    except ImageError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
