"""Routine heartbeats wait in Redis and are written in batches; whatever must act does so at
once; the offline sweeper is never fooled by a heartbeat that sat in the buffer, whatever
Redis did with it (inventory/heartbeats.py)."""

import threading
from datetime import timedelta

import pytest
import redis
from django.db import connection, connections, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from inventory import heartbeats, telemetry
from inventory.heartbeats import LAST_SEEN_KEY, heartbeats_buffered, heartbeats_flush
from inventory.models import (
    Gpu,
    GpuHealth,
    GpuSample,
    HeartbeatFlush,
    Node,
    NodeStatus,
    NodeToken,
    Outage,
    OutageCause,
)
from inventory.services import (
    node_heartbeat_accept,
    node_mark_offline,
    node_token_issue,
    nodes_mark_silent_offline,
)
from tests.agent.test_gpu_telemetry import fixture
from tests.factories import NodeFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_buffers")]
URL = "/api/v1/agent/heartbeat"


def heard(seconds_ago: float, **kwargs) -> Node:
    """A node in service whose last heartbeat in the database was `seconds_ago`."""
    kwargs.setdefault("gpus", 8)
    return NodeFactory(last_heartbeat_at=timezone.now() - timedelta(seconds=seconds_ago), **kwargs)


def report(name: str = "nvidia_h100_healthy.xml") -> dict:
    from agent import gpu_telemetry

    return gpu_telemetry.parse_nvidia_smi_xml(fixture(name))


def beat(api_client, node: Node, body: dict | None = None):
    _, secret = node_token_issue(node=node, label="agent")
    return api_client.post(URL, body or {}, format="json", HTTP_AUTHORIZATION=f"Bearer {secret}")


def in_db(node: Node) -> Node:
    return Node.objects.get(pk=node.pk)


def test_a_routine_heartbeat_is_buffered_and_written_by_the_flush(api_client):
    node = heard(10)
    before = node.last_heartbeat_at

    response = beat(api_client, node, {"telemetry": report()})

    assert response.status_code == 200, response.json()
    said = parse_datetime(response.json()["last_heartbeat_at"])
    assert said > before
    assert in_db(node).last_heartbeat_at == before  # nothing written yet
    assert GpuSample.objects.count() == 0
    assert heartbeats_buffered([node.pk]) == {node.pk: said}
    assert telemetry.buffer_client().llen(telemetry.BUFFER_KEY) == 1

    assert heartbeats_flush() == 1

    assert in_db(node).last_heartbeat_at == said
    assert heartbeats_buffered([node.pk]) == {}
    assert heartbeats_flush() == 0  # idempotent: nothing left
    assert telemetry.telemetry_flush() == 8
    assert HeartbeatFlush.objects.get().flushed_through > before


def test_a_first_heartbeat_an_offline_node_and_a_stale_one_are_written_at_once(api_client):
    first = NodeFactory(gpus=1)
    stale = heard(70, gpus=1)  # older than NODE_OFFLINE_AFTER / 3 = 60 s
    offline = heard(5, gpus=1)
    node_mark_offline(node=offline, reason="test")

    for node in (first, stale, offline):
        assert beat(api_client, node).status_code == 200

    for node in (first, stale, offline):
        fresh = in_db(node)
        assert fresh.last_heartbeat_at > timezone.now() - timedelta(seconds=5)
        assert fresh.status == NodeStatus.AVAILABLE
    assert Outage.objects.get(node=offline).ended_at is not None
    assert heartbeats_buffered([first.pk, stale.pk, offline.pk]) == {}


def test_a_gpu_that_fails_in_a_routine_heartbeat_fails_at_once(
    api_client, django_capture_on_commit_callbacks
):
    node = heard(10)

    with django_capture_on_commit_callbacks() as callbacks:
        response = beat(
            api_client, node, {"telemetry": report("nvidia_h100_uncorrectable_ecc.xml")}
        )

    assert response.status_code == 200
    assert Gpu.objects.get(node=node, index=3).health == GpuHealth.FAILED
    outage = Outage.objects.get(node=node)
    assert (outage.gpu.index, outage.cause, outage.ended_at) == (3, OutageCause.GPU_FAILURE, None)
    assert len(callbacks) == 1  # the marketplace is asked to move the work
    assert in_db(node).last_heartbeat_at == parse_datetime(response.json()["last_heartbeat_at"])


def test_an_over_temperature_run_is_recorded_at_once_then_buffered_until_it_fails(api_client):
    node = heard(10)
    hot = report()
    hot["gpus"][2]["temperature_c"] = 95.0

    beat(api_client, node, {"telemetry": hot})
    since = Gpu.objects.get(node=node, index=2).over_temp_since
    assert since is not None  # the run's start is state: written at once
    db_time = in_db(node).last_heartbeat_at

    beat(api_client, node, {"telemetry": hot})  # still hot, nothing new: buffered
    assert in_db(node).last_heartbeat_at == db_time
    assert Gpu.objects.get(node=node, index=2).over_temp_since == since
    assert telemetry.buffer_client().llen(telemetry.BUFFER_KEY) == 2


def test_a_new_agent_version_or_unreadable_telemetry_is_written_at_once(api_client):
    upgraded, unreadable = heard(10), heard(10)

    beat(api_client, upgraded, {"agent_version": "9.9.9"})
    beat(
        api_client, unreadable, {"telemetry": {"gpus": [], "unreadable": "telemetry unreadable: x"}}
    )

    assert in_db(upgraded).agent_version == "9.9.9"
    assert in_db(unreadable).telemetry_error == "telemetry unreadable: x"


def test_without_redis_a_routine_heartbeat_is_written_at_once(api_client, monkeypatch):
    import redis

    class Down:
        def pipeline(self, **kwargs):
            raise redis.ConnectionError("down")

        def rpush(self, *args):
            raise redis.ConnectionError("down")

        def hset(self, *args):
            raise redis.ConnectionError("down")

    node = heard(10)
    monkeypatch.setattr(telemetry, "_redis", Down())

    response = beat(api_client, node, {"telemetry": report()})

    assert response.status_code == 200
    assert in_db(node).last_heartbeat_at == parse_datetime(response.json()["last_heartbeat_at"])
    assert GpuSample.objects.count() == 8  # COPYed by the heartbeat itself


def test_the_flush_never_moves_a_heartbeat_back(empty_buffers):
    node = heard(1)
    older = node.last_heartbeat_at - timedelta(seconds=30)
    empty_buffers.hset(LAST_SEEN_KEY, str(node.pk), f"{older.timestamp():.6f}")

    heartbeats_flush()

    assert in_db(node).last_heartbeat_at == node.last_heartbeat_at


def test_a_heartbeat_that_arrives_during_a_flush_is_kept_for_the_next(monkeypatch, empty_buffers):
    node = heard(20)
    first = timezone.now() - timedelta(seconds=10)
    later = timezone.now()
    empty_buffers.hset(LAST_SEEN_KEY, str(node.pk), f"{first.timestamp():.6f}")
    read = heartbeats._entries

    def read_then_beat(raw):
        entries = read(raw)
        if raw and b"." in next(iter(raw.values())):  # the node hash, not the tokens'
            empty_buffers.hset(LAST_SEEN_KEY, str(node.pk), f"{later.timestamp():.6f}")
        return entries

    monkeypatch.setattr(heartbeats, "_entries", read_then_beat)
    heartbeats_flush()
    monkeypatch.setattr(heartbeats, "_entries", read)

    assert in_db(node).last_heartbeat_at == first
    assert heartbeats_buffered([node.pk]) == {node.pk: later}
    heartbeats_flush()
    assert in_db(node).last_heartbeat_at == later


@pytest.mark.django_db(transaction=True)
def test_a_flush_finding_another_running_writes_nothing_and_keeps_the_buffer(empty_buffers):
    node = heard(20)
    at = timezone.now()
    empty_buffers.hset(LAST_SEEN_KEY, str(node.pk), f"{at.timestamp():.6f}")
    locked, release = threading.Event(), threading.Event()

    def another_flush() -> None:  # holds the flush's lock as a running flush does
        try:
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(%s)", [heartbeats._LOCK_KEY])
                locked.set()
                release.wait(timeout=10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=another_flush)
    holder.start()
    try:
        assert locked.wait(timeout=10)
        assert heartbeats_flush() == 0
        assert heartbeats_buffered([node.pk]) == {node.pk: at}
    finally:
        release.set()
        holder.join()
    assert heartbeats_flush() == 1
    assert in_db(node).last_heartbeat_at == at


def test_a_token_s_use_is_buffered_after_its_first(api_client):
    node = heard(10)
    token, secret = node_token_issue(node=node)
    auth = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    api_client.post(URL, {}, format="json", **auth)
    first = NodeToken.objects.get(pk=token.pk).last_used_at
    assert first is not None  # the first use is written at once
    NodeToken.objects.filter(pk=token.pk).update(last_used_at=first - timedelta(minutes=2))

    api_client.post(URL, {}, format="json", **auth)
    assert NodeToken.objects.get(pk=token.pk).last_used_at == first - timedelta(minutes=2)

    heartbeats_flush()
    assert NodeToken.objects.get(pk=token.pk).last_used_at > first - timedelta(seconds=1)


def test_beat_flushes_heartbeats_every_five_seconds():
    from config.celery import app

    app.loader.import_default_modules()
    entry = app.conf.beat_schedule["inventory-heartbeats-flush"]
    node = heard(20)
    heartbeats.heartbeat_buffer_push(node_id=node.pk, at=timezone.now(), samples=[])

    assert entry["schedule"] == 5.0
    assert app.tasks[entry["task"]]() == 1


# --- the sweeper and the buffer -----------------------------------------------------------


def flushed(at) -> None:
    HeartbeatFlush.objects.update_or_create(pk=1, defaults={"flushed_through": at})


def test_with_the_flush_current_the_sweeper_goes_by_the_database():
    now = timezone.now()
    node = NodeFactory(gpus=1, last_heartbeat_at=now - timedelta(seconds=200))
    flushed(now - timedelta(seconds=15))

    assert nodes_mark_silent_offline(now=now) == [node.pk]
    assert Outage.objects.get(node=node).started_at == now - timedelta(seconds=200)


def test_a_buffered_heartbeat_keeps_a_node_in_service_when_the_flush_is_behind(empty_buffers):
    now = timezone.now()
    node = NodeFactory(gpus=1, last_heartbeat_at=now - timedelta(seconds=200))
    flushed(now - timedelta(seconds=200))
    empty_buffers.hset(LAST_SEEN_KEY, str(node.pk), f"{(now - timedelta(seconds=150)).timestamp()}")

    assert nodes_mark_silent_offline(now=now) == []
    assert in_db(node).status == NodeStatus.AVAILABLE


@pytest.mark.parametrize("redis_state", ["lost its data", "down"])
def test_a_heartbeat_redis_lost_does_not_make_a_node_offline(redis_state, monkeypatch):
    """The flush is behind and Redis lost (or cannot tell) a heartbeat from 150 s ago: the
    database says 200 s, but a heartbeat up to 60 s after that may have been buffered, so the
    node is not declared offline yet; it is once even that bound is past the cutoff."""
    now = timezone.now()
    node = NodeFactory(gpus=1, last_heartbeat_at=now - timedelta(seconds=200))
    flushed(now - timedelta(seconds=200))
    if redis_state == "down":

        class Down:
            def hmget(self, *args):
                raise redis.ConnectionError("down")

        monkeypatch.setattr(telemetry, "_redis", Down())

    assert nodes_mark_silent_offline(now=now) == []
    assert nodes_mark_silent_offline(now=now + timedelta(seconds=39)) == []
    assert nodes_mark_silent_offline(now=now + timedelta(seconds=41)) == [node.pk]
    assert Outage.objects.get(node=node).started_at == now - timedelta(seconds=200)


def test_a_silent_node_s_buffered_heartbeat_starts_its_outage(empty_buffers):
    now = timezone.now()
    node = NodeFactory(gpus=1, last_heartbeat_at=now - timedelta(seconds=300))
    flushed(now - timedelta(seconds=300))
    last = now - timedelta(seconds=250)
    empty_buffers.hset(LAST_SEEN_KEY, str(node.pk), f"{last.timestamp():.6f}")

    assert nodes_mark_silent_offline(now=now) == [node.pk]

    fresh = in_db(node)
    assert (fresh.status, fresh.last_heartbeat_at) == (NodeStatus.OFFLINE, last)
    assert Outage.objects.get(node=node).started_at == last
    heartbeats_flush()  # the buffered value is the one already written: the outage stays open
    assert Outage.objects.get(node=node).ended_at is None


def test_the_sweep_runs_the_same_statements_whatever_the_fleet_size():
    now = timezone.now()
    flushed(now)
    NodeFactory(gpus=1, last_heartbeat_at=now - timedelta(seconds=600))
    with CaptureQueriesContext(connection) as small:
        assert len(nodes_mark_silent_offline(now=now)) == 1
    NodeFactory.create_batch(40, gpus=1, last_heartbeat_at=now - timedelta(seconds=5))
    NodeFactory(gpus=1, last_heartbeat_at=now - timedelta(seconds=600))
    with CaptureQueriesContext(connection) as large:
        assert len(nodes_mark_silent_offline(now=now)) == 1
    assert len(large) == len(small)


def test_the_sweep_reads_watched_nodes_through_their_last_heartbeat_index():
    with connection.cursor() as cur:
        cur.execute("SET LOCAL enable_seqscan = off")  # a tiny table: ask what it could use
        cur.execute(
            "EXPLAIN SELECT id FROM inventory_node WHERE status IN ('available', 'draining') "
            "AND last_heartbeat_at < now() - interval '3 minutes'"
        )
        plan = "\n".join(row[0] for row in cur.fetchall())
    assert "node_watched_last_heartbeat" in plan


@pytest.mark.django_db(transaction=True)
def test_heartbeats_racing_flushes_leave_every_node_at_its_last_heartbeat():
    """Four threads heartbeat 20 nodes through the service while two flush in a loop; after a
    last flush every node holds the time of its own last heartbeat, never an older one."""
    nodes = [heard(10, gpus=2) for _ in range(20)]
    last: dict[int, object] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def agent(share: list[Node]) -> None:
        try:
            for _ in range(15):
                for node in share:
                    fresh = Node.objects.get(pk=node.pk)
                    gpus = {g.index: g for g in Gpu.objects.filter(node=fresh)}
                    done = node_heartbeat_accept(node=fresh, gpus=gpus, actor_label="t")
                    last[node.pk] = done.last_heartbeat_at
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connections.close_all()

    def flusher() -> None:
        try:
            while not stop.is_set():
                heartbeats_flush()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connections.close_all()

    agents = [threading.Thread(target=agent, args=(nodes[i::4],)) for i in range(4)]
    flushers = [threading.Thread(target=flusher) for _ in range(2)]
    for thread in agents + flushers:
        thread.start()
    for thread in agents:
        thread.join()
    stop.set()
    for thread in flushers:
        thread.join()
    heartbeats_flush()

    assert errors == []
    assert {n.pk: in_db(n).last_heartbeat_at for n in nodes} == last
    assert heartbeats_buffered([n.pk for n in nodes]) == {}
