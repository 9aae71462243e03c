"""gunicorn hooks: gunicorn -c config/gunicorn.py config.wsgi:application --workers 4 ...

With PROMETHEUS_MULTIPROC_DIR set (an empty directory of this gunicorn's own), every worker
writes its metrics there and GET /metrics sums them. The directory is emptied when gunicorn
starts, and a worker's live gauges are dropped when it exits.
"""

import os
from pathlib import Path

from prometheus_client import multiprocess


def on_starting(server) -> None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        for leftover in Path(directory).glob("*.db"):
            leftover.unlink()


def child_exit(server, worker) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(worker.pid)
