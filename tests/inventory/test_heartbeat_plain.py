"""The agent's routine heartbeat is answered without DRF (inventory.apis._heartbeat_plain):
the same answer, the same checks, nothing written for a body it refuses; anything else goes
to DRF's view with its errors."""

import json
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from inventory import telemetry
from inventory.apis import HeartbeatApi
from inventory.heartbeats import heartbeats_buffered, heartbeats_flush
from inventory.models import Gpu, GpuHealth, GpuSample, Node, NodeToken
from inventory.services import node_token_issue
from tests.factories import NodeFactory
from tests.inventory.test_heartbeat_buffer import report

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("empty_buffers")]
URL = "/api/v1/agent/heartbeat"


@pytest.fixture
def no_drf(monkeypatch):
    """Fails the test if DRF's view answers the heartbeat."""

    def refuse(self, request):
        raise AssertionError("DRF answered a heartbeat the plain path should have")

    monkeypatch.setattr(HeartbeatApi, "post", refuse)


def heard(seconds_ago: float = 10, **kwargs) -> tuple[Node, str]:
    """A node in service last heard `seconds_ago`, and its token used a moment ago."""
    kwargs.setdefault("gpus", 8)
    kwargs.setdefault("agent_version", "2.0")
    node = NodeFactory(last_heartbeat_at=timezone.now() - timedelta(seconds=seconds_ago), **kwargs)
    token, secret = node_token_issue(node=node, label="agent")
    NodeToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    return node, secret


def post(client, secret: str, content, content_type: str = "application/json"):
    if not isinstance(content, str | bytes):
        content = json.dumps(content)
    return client.generic(
        "POST", URL, content, content_type=content_type, HTTP_AUTHORIZATION=f"Bearer {secret}"
    )


def nothing_written(node: Node, before) -> None:
    fresh = Node.objects.get(pk=node.pk)
    assert fresh.last_heartbeat_at == before
    assert heartbeats_buffered([node.pk]) == {}
    assert telemetry.buffer_client().llen(telemetry.BUFFER_KEY) == 0
    assert GpuSample.objects.count() == 0
    assert set(Gpu.objects.filter(node=node).values_list("health", flat=True)) == {GpuHealth.OK}


def test_a_routine_heartbeat_is_answered_without_drf_in_one_query_and_flushed(client, no_drf):
    node, secret = heard()
    before = node.last_heartbeat_at
    body = {"agent_version": node.agent_version, "telemetry": report()}
    assert post(client, secret, body).status_code == 200  # reads the health rules once

    with CaptureQueriesContext(connection) as queries:
        response = post(client, secret, body)

    assert response.status_code == 200, response.content
    assert len(queries) == 1  # the token, its node, its GPUs and whether work waits
    assert response["Content-Type"] == "application/json"
    said = parse_datetime(response.json()["last_heartbeat_at"])
    assert response.json() == {
        "node": node.hostname,
        "status": "available",
        "last_heartbeat_at": said.isoformat().replace("+00:00", "Z"),
        "next_heartbeat_within_seconds": 180,
        "work_waiting": False,
        "heartbeat_seconds": 10,
    }
    assert Node.objects.get(pk=node.pk).last_heartbeat_at == before  # buffered
    assert heartbeats_flush() == 1
    assert Node.objects.get(pk=node.pk).last_heartbeat_at == said
    assert telemetry.telemetry_flush() == 16


def test_the_plain_answer_is_drf_s_answer(client, monkeypatch):
    node, secret = heard()
    plain = post(client, secret, {"telemetry": report()})
    monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)
    drf = post(client, secret, {"telemetry": report()})

    assert (plain.status_code, drf.status_code) == (200, 200)
    assert {k: v for k, v in plain.json().items() if k != "last_heartbeat_at"} == {
        k: v for k, v in drf.json().items() if k != "last_heartbeat_at"
    }
    for response in (plain, drf):  # DRF's date format: UTC with a Z
        assert response.json()["last_heartbeat_at"].endswith("Z")
    # Vary: Accept only where DRF has a second renderer (the browsable one, with DEBUG).
    assert {h: plain.get(h) for h in ("Content-Type", "Vary", "Allow")} == {
        h: drf.get(h) for h in ("Content-Type", "Vary", "Allow")
    }


def test_a_heartbeat_that_must_act_is_written_at_once_by_the_plain_path(client, no_drf):
    stale, stale_secret = heard(70)  # older than NODE_OFFLINE_AFTER / 3
    failing, failing_secret = heard(10)

    assert post(client, stale_secret, {"telemetry": report()}).status_code == 200
    response = post(
        client, failing_secret, {"telemetry": report("nvidia_h100_uncorrectable_ecc.xml")}
    )

    assert response.status_code == 200
    assert Node.objects.get(pk=stale.pk).last_heartbeat_at > timezone.now() - timedelta(seconds=5)
    assert Gpu.objects.get(node=failing, index=3).health == GpuHealth.FAILED
    assert heartbeats_buffered([stale.pk, failing.pk]) == {}


def test_a_node_without_gpus_heartbeats_through_the_plain_path(client, no_drf):
    node, secret = heard(gpus=0)

    response = post(client, secret, {"telemetry": {"source": "none", "gpus": []}})

    assert response.status_code == 200
    assert heartbeats_buffered([node.pk]) == {
        node.pk: parse_datetime(response.json()["last_heartbeat_at"])
    }


@pytest.mark.parametrize(
    ("content", "status", "code", "field"),
    [
        ('{"telemetry": {"gpus": [{"index": 0, "temperature_c": NaN}]}}', 400, "parse_error", None),
        ("{not json", 400, "parse_error", None),
        ([1, 2], 400, "invalid", None),
        ({"telemetry": {"gpus": [{"index": 0, "power_w": "lots"}]}}, 400, "invalid",
         "telemetry.gpus.0.power_w"),
        ({"telemetry": {"gpus": [{"index": 0, "temperature_c": 999}]}}, 400, "max_value",
         "telemetry.gpus.0.temperature_c"),
        ({"telemetry": {"gpus": [{"index": 8}]}}, 400, "unknown_gpu", "telemetry.gpus.0.index"),
        ({"telemetry": {"gpus": [{"index": 1}, {"index": 1}]}}, 400, "duplicate",
         "telemetry.gpus.1.index"),
        ({"agent_version": ""}, 400, "blank", "agent_version"),
    ],
)  # fmt: skip
def test_a_body_it_refuses_gets_drf_s_4xx_and_changes_nothing(client, content, status, code, field):
    node, secret = heard()

    response = post(client, secret, content)

    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert (error["type"], error["code"], error["field"]) == ("invalid_request_error", code, field)
    nothing_written(node, node.last_heartbeat_at)


def test_a_wrong_token_content_type_or_method_gets_drf_s_answer(client):
    node, secret = heard()
    body = {"telemetry": report()}

    wrong = post(client, secret + "x", body)
    form = post(client, secret, "agent_version=1", "application/x-www-form-urlencoded")
    got = client.get(URL, HTTP_AUTHORIZATION=f"Bearer {secret}")

    assert (wrong.status_code, wrong.json()["error"]["type"]) == (401, "authentication_error")
    assert wrong["WWW-Authenticate"] == 'Bearer realm="switchyard-agent"'
    assert form.status_code == 415
    assert got.status_code == 405
    nothing_written(node, node.last_heartbeat_at)


def test_the_schema_still_describes_the_heartbeat():
    from inventory.urls import urlpatterns

    view = next(p.callback for p in urlpatterns if p.name == "agent-heartbeat")
    assert view.cls is HeartbeatApi
    assert view.csrf_exempt is True


def test_both_paths_tell_the_agent_the_operator_s_heartbeat_interval_in_the_same_queries(
    client, monkeypatch, settings
):
    """AGENT_HEARTBEAT_SECONDS reaches the agent in every answer (agent/README.md), read from
    the settings: no query more on either path."""
    settings.AGENT_HEARTBEAT_SECONDS = 45
    node, secret = heard()
    post(client, secret, {"telemetry": report()})  # reads the health rules once
    with CaptureQueriesContext(connection) as plain_queries:
        plain = post(client, secret, {"telemetry": report()})
    monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)
    with CaptureQueriesContext(connection) as drf_queries:
        drf = post(client, secret, {"telemetry": report()})

    assert (plain.status_code, drf.status_code) == (200, 200)
    assert plain.json()["heartbeat_seconds"] == drf.json()["heartbeat_seconds"] == 45
    assert len(plain_queries) == 1
    assert len(drf_queries) == 2  # the token and its node; its GPUs and whether work waits


def test_the_agent_schema_documents_the_heartbeat_interval():
    from tests.clients import HttpsAPIClient

    response = HttpsAPIClient().get(
        "/api/schema/agent/", HTTP_ACCEPT="application/vnd.oai.openapi+json"
    )
    heartbeat = response.json()["components"]["schemas"]["Heartbeat"]

    assert heartbeat["properties"]["heartbeat_seconds"] == {"type": "integer", "readOnly": True}
    assert "heartbeat_seconds" in heartbeat["required"]
