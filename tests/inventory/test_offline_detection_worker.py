"""The offline sweep as beat sends it: through Redis to a real Celery worker process."""

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from inventory.models import NodeStatus, Outage
from inventory.tasks import nodes_mark_offline
from tests.factories import NodeFactory
from tests.provisioning_support import (
    CeleryWorker,
    broker_fixture,  # noqa: F401 (a fixture: a private queue on the configured broker)
    broker_idle,
    e2e_redis_url,
    wait_for,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]


@pytest.fixture
def worker(broker, tmp_path):
    w = CeleryWorker(
        database=settings.DATABASES["default"],
        redis_url=e2e_redis_url(),
        log_dir=tmp_path,
        env={"CELERY_TASK_DEFAULT_QUEUE": broker},
    )
    yield w.start(concurrency=2)
    w.stop()


def test_the_worker_marks_a_silent_node_offline_once_even_when_delivered_twice(worker, broker):
    last = timezone.now() - timedelta(minutes=10)
    node = NodeFactory(last_heartbeat_at=last, gpus=1)
    fresh = NodeFactory(last_heartbeat_at=timezone.now(), gpus=1)

    for _ in range(3):
        nodes_mark_offline.delay()

    wait_for(lambda: broker_idle(broker), timeout=30, what="the worker to run the three sweeps")
    node.refresh_from_db()
    fresh.refresh_from_db()
    assert node.status == NodeStatus.OFFLINE
    assert fresh.status == NodeStatus.AVAILABLE
    outage = Outage.objects.get(node=node)
    assert (outage.started_at, outage.ended_at) == (last, None)
