"""A heartbeat written at once (inventory.services.node_heartbeat_record) holds its GPUs' rows
while it judges and writes them: a staff action on a GPU that commits meanwhile (mark failed,
return to service) is never overwritten by the health the heartbeat read before it."""

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from inventory import services
from inventory.heartbeat_input import heartbeat_fast_validate
from inventory.models import Gpu, GpuHealth, Outage
from inventory.services import node_heartbeat_record
from inventory.telemetry import gpu_mark_failed
from tests.factories import NodeFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_buffers")]


def test_staff_marking_a_gpu_failed_during_a_heartbeat_is_not_undone(monkeypatch):
    node = NodeFactory(gpus=2, last_heartbeat_at=timezone.now() - timedelta(seconds=10))
    gpu = Gpu.objects.get(node=node, index=0)
    # A hot reading starts an over-temperature run: the heartbeat writes GPU 0's row.
    hot = heartbeat_fast_validate(
        {"telemetry": {"gpus": [{"index": 0, "temperature_c": 95.0}]}}, gpu_indexes={0, 1}
    )["telemetry"]
    staff_done = threading.Event()

    def staff_marks_it_failed() -> None:
        try:
            gpu_mark_failed(gpu=gpu, actor=None, actor_label="ops", reason="fan seized")
            staff_done.set()
        finally:
            connection.close()

    original = services.telemetry_record

    def meanwhile(**kwargs):
        # Staff act after the heartbeat read the GPUs, before it writes them.
        staff = threading.Thread(target=staff_marks_it_failed)
        staff.start()
        staff.join(timeout=1)  # with the rows held, staff wait for the heartbeat
        kwargs_done.append(staff)
        return original(**kwargs)

    kwargs_done: list[threading.Thread] = []
    monkeypatch.setattr(services, "telemetry_record", meanwhile)

    node_heartbeat_record(node=node, telemetry=hot)
    kwargs_done[0].join(timeout=10)

    assert staff_done.is_set()
    fresh = Gpu.objects.get(pk=gpu.pk)
    assert (fresh.health, fresh.health_reason) == (
        GpuHealth.FAILED,
        "marked failed by staff: fan seized",
    )
    assert Outage.objects.filter(gpu=gpu, ended_at=None).count() == 1
