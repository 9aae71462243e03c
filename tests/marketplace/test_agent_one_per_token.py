"""One site agent per node token: while an agent (by the id it sends in X-Switchyard-Agent) is
heard, a second one using the same token (a token copied to another machine, a cloned node) is
refused 409 agent_conflict on every agent endpoint. Before, its report, which lists none of
the node's containers, restarted the node's running workloads, and it leased their jobs and
ran them on the wrong machine (its pulls failed: the reservations failed, and their real
containers were left running on GPUs sold again)."""

import pytest
import redis

from inventory import auth
from inventory.auth import AGENT_INSTANCE_KEY, agent_instance_hold_seconds
from inventory.models import Node
from inventory.services import node_token_issue
from inventory.telemetry import buffer_client
from marketplace.models import AgentJob, AgentJobStatus, Reservation, ReservationStatus
from tests.clients import HttpsAPIClient
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.marketplace.test_agent_report_delivery import (
    HEARTBEAT,
    LEASE,
    REPORT,
    _active_through_agent,
    _container,
    _provision,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus
FIRST, SECOND = "a" * 32, "b" * 32


def _agent(secret: str, instance: str | None) -> HttpsAPIClient:
    client = HttpsAPIClient()
    headers = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    if instance is not None:
        headers["HTTP_X_SWITCHYARD_AGENT"] = instance
    client.credentials(**headers)
    return client


@pytest.fixture
def node_with_two_agents():
    """An active reservation on a node whose token two agents use: the first heard first."""
    r, node, _agent_client, market = _active_through_agent()
    _token, secret = node_token_issue(node=node, label="site agent")
    buffer_client().delete(AGENT_INSTANCE_KEY.format(node_id=node.pk))
    first, second = _agent(secret, FIRST), _agent(secret, SECOND)
    assert first.post(HEARTBEAT, {}, format="json").status_code == 200
    running = {"containers": [_container(r, "running")]}
    assert first.post(REPORT, running, format="json").status_code == 200
    return r, node, secret, first, second, market


def test_a_second_agent_with_the_nodes_token_is_refused_and_changes_nothing(
    node_with_two_agents,
):
    r, node, _secret, _first, second, market = node_with_two_agents
    heard = Node.objects.get(pk=node.pk).last_heartbeat_at
    # A job waits for the node (a second booking on it).
    other = market.book(gpu_count=2)
    _provision(other)
    queued = list(AgentJob.objects.filter(node=node, status=AgentJobStatus.QUEUED))
    assert queued

    answers = [
        second.post(HEARTBEAT, {}, format="json"),  # the plain heartbeat path
        second.post(HEARTBEAT, {"agent_version": " 2.0"}, format="json"),  # DRF's
        second.post(REPORT, {"containers": []}, format="json"),
        second.post(LEASE, {}, format="json"),
    ]

    for answer in answers:
        assert answer.status_code == 409
        error = answer.json()["error"]
        assert error["code"] == "agent_conflict"
        assert error["message"].startswith(
            f"Another site agent (id aaaaaaaa…) is using node {node.hostname}'s token and was "
            "heard within the last "
        )
    # Its empty report restarted nothing, it leased nothing, its heartbeats were not taken.
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE
    assert Reservation.objects.get(pk=r.pk).placement_generation == 0
    assert [j.status for j in AgentJob.objects.filter(pk__in=[j.pk for j in queued])] == [
        AgentJobStatus.QUEUED
    ] * len(queued)
    assert Node.objects.get(pk=node.pk).last_heartbeat_at == heard


def test_the_agent_restarted_with_its_id_goes_on_at_once(node_with_two_agents):
    _r, _node, secret, _first, _second, _market = node_with_two_agents
    again = _agent(secret, FIRST)
    assert again.post(HEARTBEAT, {}, format="json").status_code == 200
    assert again.post(LEASE, {}, format="json").status_code == 204


def test_a_new_agent_takes_over_once_the_old_one_is_silent_for_the_hold(node_with_two_agents):
    r, node, _secret, first, second, _market = node_with_two_agents
    key = AGENT_INSTANCE_KEY.format(node_id=node.pk)
    assert 0 < buffer_client().ttl(key) <= agent_instance_hold_seconds() == 90
    buffer_client().expire(key, 0)  # the first agent has been silent for the hold (a rebuild)

    assert second.post(HEARTBEAT, {}, format="json").status_code == 200
    running = {"containers": [_container(r, "running")]}
    assert second.post(REPORT, running, format="json").status_code == 200
    assert first.post(HEARTBEAT, {}, format="json").status_code == 409
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_an_agent_without_an_id_is_not_checked_and_a_malformed_one_is_refused(
    node_with_two_agents,
):
    _r, node, secret, _first, _second, _market = node_with_two_agents
    # An older agent sends no id: as before.
    assert _agent(secret, None).post(HEARTBEAT, {}, format="json").status_code == 200
    for bad in ("short", "x" * 65, "has space in it", "slash/in/the/id"):
        answer = _agent(secret, bad).post(LEASE, {}, format="json")
        assert answer.status_code == 400
        assert answer.json()["error"]["code"] == "invalid_agent_instance"
    assert buffer_client().get(AGENT_INSTANCE_KEY.format(node_id=node.pk)) == FIRST.encode()


def test_with_redis_unreachable_agents_are_not_checked(node_with_two_agents, monkeypatch):
    def down(*args, **kwargs):
        raise redis.ConnectionError("Redis is down")

    monkeypatch.setattr(auth, "_claim_script", down)
    _r, _node, _secret, _first, second, _market = node_with_two_agents
    assert second.post(HEARTBEAT, {}, format="json").status_code == 200
