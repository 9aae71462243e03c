import threading
from datetime import timedelta

import pytest
from django.db import connections, transaction
from django.utils import timezone

from inventory.models import Node, NodeStatus, Outage, OutageCause, StatusChange
from inventory.services import (
    SWEEPER_LABEL,
    node_heartbeat_record,
    node_token_issue,
    status_change,
)
from inventory.tasks import nodes_mark_offline
from tests.factories import NodeFactory, UserFactory

pytestmark = pytest.mark.django_db

N = NodeStatus


def silent_node(seconds: int, **kwargs) -> Node:
    """A node whose last heartbeat was `seconds` ago (NODE_OFFLINE_AFTER is 180 s)."""
    last = timezone.now() - timedelta(seconds=seconds)
    return NodeFactory(last_heartbeat_at=last, gpus=1, **kwargs)


def test_a_silent_node_goes_offline_with_an_outage_from_its_last_heartbeat():
    node = silent_node(600)
    last = node.last_heartbeat_at

    assert nodes_mark_offline() == 1

    node.refresh_from_db()
    assert node.status == N.OFFLINE
    outage = Outage.objects.get(node=node)
    assert outage.cause == OutageCause.HEARTBEAT_MISSED
    assert outage.started_at == last
    assert outage.ended_at is None
    change = StatusChange.objects.get(node=node)
    assert (change.from_status, change.to_status) == (N.AVAILABLE, N.OFFLINE)
    assert (change.actor, change.actor_label) == (None, SWEEPER_LABEL)
    assert change.reason.startswith("No heartbeat for 60")


def test_a_recent_heartbeat_keeps_the_node_available():
    node = silent_node(60)

    assert nodes_mark_offline() == 0

    node.refresh_from_db()
    assert node.status == N.AVAILABLE
    assert Outage.objects.count() == 0


def test_running_twice_opens_one_outage():
    node = silent_node(600)

    assert nodes_mark_offline() == 1
    assert nodes_mark_offline() == 0

    assert Outage.objects.filter(node=node).count() == 1
    assert StatusChange.objects.filter(node=node).count() == 1


@pytest.mark.parametrize("status", [N.MAINTENANCE, N.RETIRED, N.OFFLINE])
def test_nodes_not_expected_to_talk_are_not_touched(status):
    node = silent_node(600, status=status)

    assert nodes_mark_offline() == 0

    node.refresh_from_db()
    assert node.status == status
    assert Outage.objects.count() == 0
    assert StatusChange.objects.count() == 0


def test_a_node_that_never_heartbeated_is_not_watched():
    node = NodeFactory(gpus=1)

    assert nodes_mark_offline() == 0

    node.refresh_from_db()
    assert node.status == N.AVAILABLE


def test_a_silent_draining_node_goes_offline_and_comes_back_draining():
    node = silent_node(600)
    status_change(action="drain", node=node, actor=UserFactory(), reason="swap PSU")
    Node.objects.filter(pk=node.pk).update(
        status_changed_at=timezone.now() - timedelta(seconds=500)
    )
    assert nodes_mark_offline() == 1

    node_heartbeat_record(node=node)

    node.refresh_from_db()
    assert node.status == N.DRAINING
    assert Outage.objects.get(node=node).ended_at == node.last_heartbeat_at


def test_a_heartbeat_returns_the_node_to_available_and_closes_the_outage():
    node = silent_node(600)
    nodes_mark_offline()

    node_heartbeat_record(node=node, actor_label="node agent (nt_test)")

    node.refresh_from_db()
    assert node.status == N.AVAILABLE
    outage = Outage.objects.get(node=node)
    assert outage.ended_at == node.last_heartbeat_at
    assert outage.ended_at > outage.started_at
    back = StatusChange.objects.filter(node=node).first()
    assert (back.from_status, back.to_status) == (N.OFFLINE, N.AVAILABLE)
    assert back.actor_label == "node agent (nt_test)"
    assert back.reason.startswith("Heartbeat received after ")


def test_a_heartbeat_over_http_closes_the_outage(api_client):
    node = silent_node(600)
    _, secret = node_token_issue(node=node)
    nodes_mark_offline()

    response = api_client.post(
        "/api/v1/agent/heartbeat", {}, format="json", HTTP_AUTHORIZATION=f"Bearer {secret}"
    )

    assert response.status_code == 200
    assert response.json()["status"] == "available"
    assert Outage.objects.get(node=node).ended_at is not None


def test_silence_is_measured_from_a_later_return_to_service():
    node = silent_node(3600, status=N.MAINTENANCE)
    status_change(action="return_to_service", node=node, actor=UserFactory(), reason="repaired")

    assert nodes_mark_offline() == 0

    # Once silent long enough after the return, the outage starts at the return, not at the
    # heartbeat an hour before it (the node was in maintenance then, not out of service).
    returned_at = timezone.now() - timedelta(seconds=300)
    Node.objects.filter(pk=node.pk).update(status_changed_at=returned_at)
    assert nodes_mark_offline() == 1
    assert Outage.objects.get(node=node).started_at == returned_at


def test_an_outage_stays_open_through_maintenance_until_the_node_is_heard():
    node = silent_node(600)
    nodes_mark_offline()
    status_change(action="set_maintenance", node=node, actor=UserFactory(), reason="on site visit")
    status_change(action="return_to_service", node=node, actor=UserFactory(), reason="repaired")
    assert Outage.objects.get(node=node).ended_at is None

    node_heartbeat_record(node=node)

    node.refresh_from_db()
    assert node.status == N.AVAILABLE
    assert Outage.objects.get(node=node).ended_at == node.last_heartbeat_at


def test_an_already_open_outage_is_kept_not_doubled():
    node = silent_node(600)
    hardware = Outage.objects.create(
        node=node,
        started_at=timezone.now() - timedelta(hours=2),
        cause=OutageCause.HARDWARE_FAILURE,
    )

    assert nodes_mark_offline() == 1

    assert list(Outage.objects.filter(node=node)) == [hardware]


@pytest.mark.django_db(transaction=True)
def test_the_sweep_skips_a_node_another_transaction_holds():
    node = silent_node(600)
    locked, release = threading.Event(), threading.Event()

    def hold_lock():
        try:
            with transaction.atomic():
                Node.objects.select_for_update().get(pk=node.pk)
                locked.set()
                release.wait(timeout=10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_lock)
    holder.start()
    try:
        assert locked.wait(timeout=10)
        assert nodes_mark_offline() == 0  # skipped, not blocked
    finally:
        release.set()
        holder.join()

    assert nodes_mark_offline() == 1
    node.refresh_from_db()
    assert node.status == N.OFFLINE


def test_beat_runs_the_registered_sweep_task():
    from config.celery import app

    app.loader.import_default_modules()
    entry = app.conf.beat_schedule["inventory-mark-silent-nodes-offline"]

    node = silent_node(600)

    assert entry["schedule"] == 30.0
    assert app.tasks[entry["task"]]() == 1  # the registered task runs the sweep
    node.refresh_from_db()
    assert node.status == N.OFFLINE


def test_returning_a_repaired_node_closes_a_hardware_outage_but_not_silence():
    repaired = NodeFactory(gpus=1, status=N.MAINTENANCE)
    hardware = Outage.objects.create(
        node=repaired,
        started_at=timezone.now() - timedelta(hours=1),
        cause=OutageCause.HARDWARE_FAILURE,
    )
    silent = silent_node(600)
    nodes_mark_offline()
    status_change(action="set_maintenance", node=silent, actor=UserFactory(), reason="site visit")

    back = status_change(
        action="return_to_service", node=repaired, actor=UserFactory(), reason="PSU replaced"
    )
    status_change(
        action="return_to_service", node=silent, actor=UserFactory(), reason="cable reseated"
    )

    hardware.refresh_from_db()
    assert hardware.ended_at == back.status_changed_at
    assert Outage.objects.get(node=silent).ended_at is None
