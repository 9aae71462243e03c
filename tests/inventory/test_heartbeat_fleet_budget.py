"""The fleet's heartbeats stay within AGENT_HEARTBEATS_PER_SECOND: as nodes are added, every
heartbeat's answer tells a longer interval (nodes ÷ budget), never past a third of
NODE_OFFLINE_AFTER, so a growing fleet does not overload the web tier unnoticed
(inventory.selectors.agent_heartbeat_seconds)."""

import logging
from datetime import timedelta

import pytest

from inventory import selectors
from inventory.models import NodeStatus
from inventory.selectors import agent_heartbeat_seconds
from tests.factories import NodeFactory
from tests.inventory.test_heartbeat_plain import heard, post

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_buffers")]


@pytest.fixture
def fleet(settings):
    settings.AGENT_HEARTBEAT_SECONDS = 10
    settings.NODE_OFFLINE_AFTER = timedelta(seconds=180)

    def nodes(count: int, **kwargs) -> None:
        NodeFactory.create_batch(count, gpus=0, **kwargs)

    return nodes


def test_a_small_fleet_heartbeats_at_the_operators_interval(fleet, settings):
    settings.AGENT_HEARTBEATS_PER_SECOND = 400
    fleet(30)

    assert agent_heartbeat_seconds() == 10


@pytest.mark.parametrize("drf", [False, True])
def test_a_fleet_past_the_budget_is_told_a_longer_interval(
    fleet, settings, client, monkeypatch, drf
):
    settings.AGENT_HEARTBEATS_PER_SECOND = 2
    fleet(24)
    fleet(50, status=NodeStatus.RETIRED)  # no agent heartbeats for a retired node
    _, secret = heard()  # the 25th in service
    if drf:
        monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)

    answer = post(client, secret, {}).json()

    assert answer["heartbeat_seconds"] == 13  # 25 nodes at 2 a second: every 12.5 s, rounded up


def test_the_interval_stops_at_a_third_of_the_offline_time_and_says_so(fleet, settings, caplog):
    settings.AGENT_HEARTBEATS_PER_SECOND = 1
    settings.NODE_OFFLINE_AFTER = timedelta(seconds=60)
    fleet(45)

    with caplog.at_level(logging.WARNING, logger="inventory.selectors"):
        seconds = agent_heartbeat_seconds()

    assert seconds == 20  # not 45: a node must still miss three heartbeats to go offline
    assert "45 nodes heartbeat every 20 s" in caplog.text
    assert "NODE_OFFLINE_AFTER_SECONDS" in caplog.text


def test_the_interval_stops_at_what_agents_take(fleet, settings):
    settings.AGENT_HEARTBEATS_PER_SECOND = 1
    settings.NODE_OFFLINE_AFTER = timedelta(hours=1)  # a third: 1,200 s
    fleet(400)

    assert agent_heartbeat_seconds() == 300  # agents clamp an answer to 1-300 s


def test_no_budget_leaves_the_operators_interval(fleet, settings):
    settings.AGENT_HEARTBEATS_PER_SECOND = 0
    fleet(40)

    assert agent_heartbeat_seconds() == 10


def test_the_fleet_is_counted_once_a_minute(
    fleet, settings, monkeypatch, django_assert_num_queries
):
    settings.AGENT_HEARTBEATS_PER_SECOND = 1
    fleet(12)
    clock = [1000.0]
    monkeypatch.setattr(selectors.time, "monotonic", lambda: clock[0])
    with django_assert_num_queries(1):
        assert agent_heartbeat_seconds() == 12
    fleet(18)

    with django_assert_num_queries(0):
        assert agent_heartbeat_seconds() == 12  # within the minute: as counted
    clock[0] += selectors.FLEET_COUNT_SECONDS

    assert agent_heartbeat_seconds() == 30
