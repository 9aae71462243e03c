"""The heartbeat's answer says whether work waits for the node's agent (`work_waiting`): a job
a lease could hand out now or soon, or a queued burn-in. An idle agent leases only when told
so (agent/switchyard_agent.py), so the answer must be right on every path: the plain view,
DRF's view, and a heartbeat written at once under the node's lock."""

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from inventory.models import BurnIn, BurnInStatus, Node, NodeStatus, NodeToken
from inventory.services import _node_gpus_sql, _token_gpus_sql, node_token_issue
from marketplace.models import AgentJob, AgentJobStatus, ReservationStatus
from tests.factories import NodeFactory, OrganizationFactory
from tests.marketplace.market_helpers import make_reservation_rows

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_buffers")]
URL = "/api/v1/agent/heartbeat"
LEASE = "/api/v1/agent/jobs/lease"


def heard(**kwargs) -> tuple[Node, str]:
    """A node in service heard 10 s ago (so its next heartbeat is routine), and its token."""
    node = NodeFactory(
        gpus=2, agent_version="2.0", last_heartbeat_at=timezone.now() - timedelta(seconds=10)
    )
    token, secret = node_token_issue(node=node, label="agent")
    NodeToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return node, secret


def job(
    node: Node,
    *,
    status: str = AgentJobStatus.QUEUED,
    lease_in: float | None = None,
    kind: str = "prepare",
    reservation_status: str = ReservationStatus.SCHEDULED,
    placement_generation: int = 0,
):
    """An agent job of a fresh reservation on `node`; a leased one's lease ends `lease_in`
    seconds from now (negative: it has run out)."""
    (reservation,) = make_reservation_rows(
        OrganizationFactory(), 1, site=node.site, gpu_model=node.gpu_model,
        status=reservation_status, placement_generation=placement_generation,
    )  # fmt: skip
    lease = {}
    if lease_in is not None:
        lease = {
            "lease_owner": "l1",
            "lease_expires_at": timezone.now() + timedelta(seconds=lease_in),
        }
    return AgentJob.objects.create(
        node=node, reservation=reservation, kind=kind, status=status, **lease
    )


def burn_in(node: Node) -> BurnIn:
    """A queued burn-in of the whole node."""
    return BurnIn.objects.create(
        node=node, command="true", time_limit_seconds=60, reason="test", requested_by="ops"
    )


def beat(client, secret: str, *, drf: bool = False, monkeypatch=None) -> dict:
    if drf:
        monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)
    response = client.generic(
        "POST", URL, json.dumps({"agent_version": "2.0"}), content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {secret}",
    )  # fmt: skip
    if drf:
        monkeypatch.undo()
    assert response.status_code == 200, response.content
    return response.json()


def lease(client, secret: str):
    return client.post(
        LEASE, "{}", content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}"
    )


def both_paths(client, secret: str, monkeypatch) -> tuple[bool, bool]:
    """work_waiting as the plain view and DRF's view answer it."""
    plain = beat(client, secret)
    drf = beat(client, secret, drf=True, monkeypatch=monkeypatch)
    assert set(plain) == set(drf)
    return plain["work_waiting"], drf["work_waiting"]


def test_an_idle_node_has_no_work_waiting(client, monkeypatch):
    _node, secret = heard()

    assert both_paths(client, secret, monkeypatch) == (False, False)


@pytest.mark.parametrize(
    ("status", "lease_in", "waiting"),
    [
        (AgentJobStatus.QUEUED, None, True),
        (AgentJobStatus.LEASED, -1, True),  # its agent is presumed dead: a lease hands it out
        (AgentJobStatus.LEASED, 60, False),  # the agent runs it
        (AgentJobStatus.DONE, None, False),
        (AgentJobStatus.FAILED, None, False),
        (AgentJobStatus.CANCELLED, None, False),
    ],
)
def test_work_waits_for_a_job_a_lease_could_hand_out(
    client, monkeypatch, status, lease_in, waiting
):
    node, secret = heard()
    job(node, status=status, lease_in=lease_in)

    assert both_paths(client, secret, monkeypatch) == (waiting, waiting)


@pytest.mark.parametrize("kind", ["prepare", "start"])
@pytest.mark.parametrize(
    "ended", [ReservationStatus.CANCELLED, ReservationStatus.FAILED, ReservationStatus.PREEMPTED]
)
def test_a_dead_reservation_s_queued_work_is_not_waiting(client, monkeypatch, kind, ended):
    """A lease would cancel it, not hand it out: telling the agent to lease costs a request
    for nothing."""
    node, secret = heard()
    dead = job(node, kind=kind, reservation_status=ended)

    assert both_paths(client, secret, monkeypatch) == (False, False)
    job(node, kind="stop", reservation_status=ended)  # its stop is handed out, though
    assert both_paths(client, secret, monkeypatch) == (True, True)
    AgentJob.objects.filter(kind="stop").delete()
    leased = lease(client, secret)
    assert leased.status_code == 204
    assert AgentJob.objects.get(pk=dead.pk).status == AgentJobStatus.CANCELLED


def test_a_start_of_an_earlier_placement_is_not_waiting(client, monkeypatch):
    """Its lease ran out while the reservation moved: a lease cancels it, not hands it out."""
    node, secret = heard()
    old = job(node, kind="start", lease_in=-1, placement_generation=1)

    assert both_paths(client, secret, monkeypatch) == (False, False)
    assert lease(client, secret).status_code == 204
    assert AgentJob.objects.get(pk=old.pk).status == AgentJobStatus.CANCELLED


@pytest.mark.parametrize("status", [NodeStatus.MAINTENANCE, NodeStatus.RETIRED])
def test_a_node_out_of_service_is_told_only_of_its_stops(client, monkeypatch, status):
    """A lease hands a node in maintenance or retired its stops only: its queued prepare
    would make every heartbeat say work waits, and every lease answer 204, for ever."""
    node, secret = heard()
    queued = job(node)
    Node.objects.filter(pk=node.pk).update(status=status)

    assert both_paths(client, secret, monkeypatch) == (False, False)
    assert lease(client, secret).status_code == 204
    assert AgentJob.objects.get(pk=queued.pk).status == AgentJobStatus.QUEUED
    stop = job(node, kind="stop")
    assert both_paths(client, secret, monkeypatch) == (True, True)
    leased = lease(client, secret)
    assert (leased.status_code, leased.json()["id"]) == (200, stop.pk)


def test_an_offline_node_coming_back_is_told_of_its_work_at_once(client):
    """The heartbeat that reads work_waiting is the one that brings the node back."""
    node, secret = heard()
    queued = job(node)
    Node.objects.filter(pk=node.pk).update(status=NodeStatus.OFFLINE)

    assert beat(client, secret)["work_waiting"] is True
    assert Node.objects.get(pk=node.pk).status == NodeStatus.AVAILABLE
    leased = lease(client, secret)
    assert (leased.status_code, leased.json()["id"]) == (200, queued.pk)


def test_only_the_node_s_own_jobs_and_burn_ins_count(client, monkeypatch):
    node, secret = heard()
    other, _ = heard()
    job(other)
    burn_in(other)

    assert both_paths(client, secret, monkeypatch) == (False, False)


def test_a_queued_burn_in_is_work_waiting_and_a_running_one_is_not(client, monkeypatch):
    node, secret = heard()
    queued = burn_in(node)
    assert queued.status == BurnInStatus.QUEUED

    assert both_paths(client, secret, monkeypatch) == (True, True)
    BurnIn.objects.filter(pk=queued.pk).update(status=BurnInStatus.RUNNING)
    assert both_paths(client, secret, monkeypatch) == (False, False)


def test_the_answer_follows_the_job_through_its_lease(api_client):
    """Queued: waiting. Leased by the agent: not. Its lease runs out: waiting again."""
    node, secret = heard()
    queued = job(node)

    assert beat(api_client, secret)["work_waiting"] is True
    leased = api_client.post(
        LEASE, {"lease_seconds": 30}, format="json", HTTP_AUTHORIZATION=f"Bearer {secret}"
    )
    assert (leased.status_code, leased.json()["id"]) == (200, queued.pk)
    assert beat(api_client, secret)["work_waiting"] is False
    AgentJob.objects.filter(pk=queued.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    assert beat(api_client, secret)["work_waiting"] is True


def test_a_heartbeat_written_at_once_also_says_work_waits(client):
    """A node heard long ago (or never) is written under its lock (node_heartbeat_record)."""
    node, secret = heard()
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=None)
    job(node)

    answer = beat(client, secret)

    assert answer["work_waiting"] is True
    assert Node.objects.get(pk=node.pk).last_heartbeat_at is not None  # written, not buffered


def test_work_waiting_costs_the_heartbeat_no_query(client, monkeypatch):
    node, secret = heard()
    job(node)
    beat(client, secret)  # reads the health rules once

    with CaptureQueriesContext(connection) as plain:
        assert beat(client, secret)["work_waiting"] is True
    with CaptureQueriesContext(connection) as drf:
        assert beat(client, secret, drf=True, monkeypatch=monkeypatch)["work_waiting"] is True

    assert len(plain) == 1  # the token, its node, its GPUs and the work, as before
    assert len(drf) == 2  # the token and its node; the GPUs and the work


@pytest.mark.parametrize(
    ("statement", "key"), [(_token_gpus_sql, "nt_00000000"), (_node_gpus_sql, 1)]
)
def test_the_work_is_read_through_the_node_and_status_indexes(statement, key):
    """Every heartbeat runs these EXISTS: on a fleet's job history they must not scan."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # tiny tables: ask what it could use
        cursor.execute("EXPLAIN " + statement(), [key])
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "Seq Scan" not in plan, plan
    for table in (AgentJob._meta.db_table, BurnIn._meta.db_table):
        assert any(table in line and "Index" in line for line in plan.splitlines()), plan


def test_agent_work_registered_too_late_or_without_the_node_is_refused():
    """The heartbeat's statements are built once: a condition registered after that would be
    silently left out, so it is an error."""
    from inventory import agent_work

    before = list(agent_work._conditions)
    _token_gpus_sql()  # built

    with pytest.raises(RuntimeError, match="registered after the heartbeat's statements"):
        agent_work.agent_work_register("EXISTS (SELECT 1 WHERE {node_id} > 0)")
    assert agent_work._conditions == before
    assert AgentJob._meta.db_table in _token_gpus_sql()  # the marketplace's, from its ready()
