"""Celery task metrics, recorded in the process that runs the task (a prefork child writes to
PROMETHEUS_MULTIPROC_DIR), and served by the worker's main process on CELERY_METRICS_ADDRESS."""

import logging
import os
import time
from pathlib import Path

from celery import signals
from prometheus_client import Counter, Histogram, multiprocess, start_http_server

__all__ = ["metrics_server_start"]

logger = logging.getLogger(__name__)

tasks_total = Counter(
    "celery_tasks_total",
    "Celery tasks run, by task and final state (SUCCESS, FAILURE, RETRY, REJECTED, IGNORED).",
    ["task", "state"],
)
task_retries_total = Counter("celery_task_retries_total", "Celery task retries, by task.", ["task"])
task_seconds = Histogram(
    "celery_task_duration_seconds",
    "Run time of Celery tasks, by task.",
    ["task"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 180),
)
_started: dict[str, float] = {}


@signals.task_prerun.connect
def _task_started(task_id=None, **_kwargs) -> None:
    _started[task_id] = time.monotonic()


@signals.task_postrun.connect
def _task_finished(task_id=None, task=None, state=None, **_kwargs) -> None:
    started = _started.pop(task_id, None)
    tasks_total.labels(task.name, state or "UNKNOWN").inc()
    if started is not None:
        task_seconds.labels(task.name).observe(time.monotonic() - started)


@signals.task_retry.connect
def _task_retried(sender=None, **_kwargs) -> None:
    task_retries_total.labels(sender.name).inc()


@signals.worker_init.connect
def _multiprocess_dir_empty(**_kwargs) -> None:
    """A worker starting afresh drops what earlier runs left (the directory is its own)."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for leftover in Path(directory).glob("*.db"):
            leftover.unlink()


@signals.worker_process_shutdown.connect
def _process_gone(pid=None, **_kwargs) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid or os.getpid())


def metrics_server_start(address: str) -> None:
    """Serve this worker's task metrics (every prefork child's, summed) at host:port."""
    # At call time: config.celery imports this module before the settings module has loaded,
    # and the views (Django's HTTP layer, the business metrics) need the settings.
    from config.metrics.views import process_registry

    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=process_registry())
    logger.info("celery task metrics served on %s", address)
