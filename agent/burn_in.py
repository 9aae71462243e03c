"""Burn-in runner for the site agent, standard library only (Python 3.9+).

The agent leases a burn-in (`POST /api/v1/agent/burn-ins/lease`: id, command, time limit, GPU
indexes), runs it with `burn_in_run` and posts the result to
`/api/v1/agent/burn-ins/<id>/result`. The command is split like a shell would (`shlex`) but
run without one; the GPUs under test are the only ones it sees (CUDA_VISIBLE_DEVICES and
HIP_VISIBLE_DEVICES; all of the node's when the list is empty). A command that outlives the
limit is killed (its process group) and reported as timed out; its output's last 64 KiB go
with the result.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time

__all__ = ["OUTPUT_LIMIT", "burn_in_run"]

OUTPUT_LIMIT = 64 * 1024


def burn_in_run(job: dict, *, env: dict | None = None) -> dict:
    """Run one burn-in job; returns {"exit_code", "timed_out", "output", "seconds"}."""
    environment = dict(os.environ if env is None else env)
    if job.get("gpu_indexes"):
        visible = ",".join(str(i) for i in job["gpu_indexes"])
        environment["CUDA_VISIBLE_DEVICES"] = environment["HIP_VISIBLE_DEVICES"] = visible
    started = time.monotonic()
    try:
        args = shlex.split(job["command"])
        process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,  # its own process group, so a timeout kills it whole
        )
    except (OSError, ValueError) as exc:
        return {"exit_code": None, "timed_out": False, "output": f"could not start: {exc}",
                "seconds": 0.0}  # fmt: skip
    timed_out = False
    try:
        output, _ = process.communicate(timeout=job["time_limit_seconds"])
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        output, _ = process.communicate()
    text = output.decode("utf-8", errors="replace")[-OUTPUT_LIMIT:]
    return {
        "exit_code": None if timed_out else process.returncode,
        "timed_out": timed_out,
        "output": text,
        "seconds": round(time.monotonic() - started, 3),
    }
