"""A node's agent is held to AGENT_THROTTLE_RATE requests per window over every agent endpoint
(config.api.throttling.AgentRateThrottle): whoever holds a node token cannot heartbeat, post
telemetry, report or lease as fast as it likes. Past the limit: 429 with Retry-After and
nothing recorded; another node keeps its own budget; with Redis gone it never refuses."""

import json
import time

import pytest
import redis

from config.api import throttling
from inventory.heartbeats import heartbeats_buffered
from inventory.models import Node
from tests.inventory.test_heartbeat_buffer import report
from tests.inventory.test_heartbeat_plain import heard, post
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401 (autouse fixture)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_buffers")]


def call(client, secret: str, path: str, body: dict | None = None):
    return client.generic(
        "POST", f"/api/v1/agent/{path}", json.dumps(body or {}),
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {secret}",
    )  # fmt: skip


def assert_throttled(response) -> int:
    assert response.status_code == 429, response.content
    wait = int(response["Retry-After"])
    assert 1 <= wait <= 60
    error = response.json()["error"]
    assert (error["type"], error["code"], error["retry_after"]) == (
        "rate_limit_error",
        "rate_limited",
        wait,
    )
    return wait


@pytest.mark.parametrize("drf", [False, True])
def test_a_node_past_its_rate_gets_429_and_its_heartbeat_is_not_recorded(
    client, settings, monkeypatch, drf
):
    settings.AGENT_THROTTLE_RATE = "2/min"
    node, secret = heard()
    if drf:
        monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)
    body = {"agent_version": node.agent_version, "telemetry": report()}
    assert [post(client, secret, body).status_code for _ in range(2)] == [200, 200]
    before = heartbeats_buffered([node.pk])[node.pk]

    assert_throttled(post(client, secret, body))

    assert heartbeats_buffered([node.pk])[node.pk] == before
    assert Node.objects.get(pk=node.pk).last_heartbeat_at == node.last_heartbeat_at


def test_the_plain_429_is_drf_s_429(client, settings, monkeypatch):
    settings.AGENT_THROTTLE_RATE = "1/min"
    node, secret = heard()
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now)  # both answers say the same wait
    post(client, secret, {})
    plain = post(client, secret, {})
    monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)
    drf = post(client, secret, {})

    assert_throttled(plain)
    assert_throttled(drf)
    assert plain.json() == drf.json()
    assert plain["Content-Type"] == drf["Content-Type"]


def test_every_agent_endpoint_counts_against_the_node_s_budget(client, settings):
    settings.AGENT_THROTTLE_RATE = "4/min"
    node, secret = heard()
    other_node, other_secret = heard()

    answers = [
        post(client, secret, {}).status_code,
        call(client, secret, "workloads", {"containers": []}).status_code,
        call(client, secret, "jobs/lease").status_code,
        call(client, secret, "burn-ins/lease").status_code,
    ]
    assert answers == [200, 200, 204, 204]
    for path, body in [
        ("heartbeat", {}),
        ("workloads", {"containers": []}),
        ("jobs/lease", {}),
        ("jobs/1/progress", {"lease_id": "x"}),
        ("jobs/1/complete", {"lease_id": "x"}),
        ("jobs/1/fail", {"lease_id": "x", "error": "boom"}),
        ("burn-ins/lease", {}),
        ("burn-ins/1/result", {"exit_code": 0}),
    ]:
        assert_throttled(call(client, secret, path, body))
    # Another node's agent has its own budget.
    assert post(client, other_secret, {}).status_code == 200


def test_a_wrong_token_is_refused_and_not_counted_against_the_node(client, settings):
    settings.AGENT_THROTTLE_RATE = "1/min"
    node, secret = heard()
    assert post(client, secret[:-4] + "xxxx", {}).status_code == 401

    assert post(client, secret, {}).status_code == 200


def test_with_redis_unreachable_agents_are_never_refused(client, settings, monkeypatch):
    """The API's limiter answers 503 once Redis has been gone RATE_LIMIT_FAIL_OPEN_SECONDS;
    the agents' must not, or a Redis outage would take every node offline."""
    settings.AGENT_THROTTLE_RATE = "1/min"
    settings.RATE_LIMIT_FAIL_OPEN_SECONDS = 0
    node, secret = heard()

    def unreachable(*args, **kwargs):
        raise redis.ConnectionError("Redis is gone")

    monkeypatch.setattr(throttling, "_count", unreachable)
    monkeypatch.setattr(throttling, "outage", throttling.LimiterOutage())
    answers = [post(client, secret, {}).status_code for _ in range(3)]
    monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)
    answers += [
        post(client, secret, {}).status_code,
        call(client, secret, "jobs/lease").status_code,
    ]

    assert answers == [200, 200, 200, 200, 204]


@pytest.mark.parametrize(
    ("env", "ok"),
    [
        ({"AGENT_THROTTLE_RATE": "600/min"}, True),
        ({"AGENT_THROTTLE_RATE": "5/s"}, True),
        # A node over its budget waits out the window: a day-long one takes it offline.
        ({"AGENT_THROTTLE_RATE": "100000/day"}, False),
        ({"AGENT_THROTTLE_RATE": "120/min", "NODE_OFFLINE_AFTER_SECONDS": "60"}, False),
        # Fewer than a heartbeat, a workload report and a lease per interval.
        ({"AGENT_THROTTLE_RATE": "17/min"}, False),
        ({"AGENT_THROTTLE_RATE": "18/min"}, True),
        ({"AGENT_THROTTLE_RATE": "bogus"}, False),
    ],
)
def test_a_rate_that_would_silence_agents_fails_at_start_up(env, ok):
    import os
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", "import config.settings"],
        env={**os.environ, "DEBUG": "1", **env},
        capture_output=True,
        text=True,
    )
    assert (result.returncode == 0) == ok, result.stderr
    if not ok:
        assert "AGENT_THROTTLE_RATE must" in result.stderr
