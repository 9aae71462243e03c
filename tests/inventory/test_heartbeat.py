from datetime import timedelta

import pytest
from django.utils import timezone

from config.errors import ValidationFailed
from inventory.models import Gpu, GpuHealth, Node, NodeStatus, NodeToken
from inventory.services import (
    node_heartbeat_record,
    node_token_issue,
    node_token_revoke,
    token_hash,
)
from tests.factories import NodeFactory

pytestmark = pytest.mark.django_db

URL = "/api/v1/agent/heartbeat"


@pytest.fixture
def node():
    return NodeFactory(gpus=4)


@pytest.fixture
def secret(node):
    _, secret = node_token_issue(node=node, label="agent")
    return secret


def beat(api_client, secret, body=None, **extra):
    return api_client.post(
        URL, body or {}, format="json", HTTP_AUTHORIZATION=f"Bearer {secret}", **extra
    )


def test_a_good_token_records_the_heartbeat(api_client, node, secret):
    before = timezone.now()

    response = beat(api_client, secret, {"agent_version": "1.4.2"})

    assert response.status_code == 200
    node.refresh_from_db()
    assert before <= node.last_heartbeat_at <= timezone.now()
    assert node.agent_version == "1.4.2"
    assert response.json() == {
        "node": node.hostname,
        "status": "available",
        "last_heartbeat_at": node.last_heartbeat_at.isoformat().replace("+00:00", "Z"),
        "next_heartbeat_within_seconds": 180,
        "work_waiting": False,
        "heartbeat_seconds": 10,
    }
    token = NodeToken.objects.get(node=node)
    assert token.last_used_at is not None


def test_the_token_is_stored_only_as_a_hash(node):
    token, secret = node_token_issue(node=node, label="agent")

    assert secret.startswith(token.prefix + "_")
    assert token.prefix.startswith("nt_") and len(token.prefix) == 11
    assert token.secret_hash == token_hash(secret)
    assert secret not in token.secret_hash


@pytest.mark.parametrize(
    "header",
    [
        "Bearer nt_00000000_not-a-real-secret",
        "Bearer nt_",
        "Token nt_00000000_x",
        "",
    ],
)
def test_a_bad_or_missing_token_gets_401(api_client, node, secret, header):
    response = api_client.post(URL, {}, format="json", HTTP_AUTHORIZATION=header)

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    node.refresh_from_db()
    assert node.last_heartbeat_at is None


def test_a_token_with_the_right_prefix_but_wrong_secret_gets_401(api_client, node, secret):
    forged = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")

    response = beat(api_client, forged)

    assert response.status_code == 401
    node.refresh_from_db()
    assert node.last_heartbeat_at is None


def test_a_revoked_token_gets_401(api_client, node, secret):
    node_token_revoke(token=NodeToken.objects.get(node=node))

    response = beat(api_client, secret)

    assert response.status_code == 401
    assert response.json()["error"]["message"] == "Invalid or revoked node token."
    node.refresh_from_db()
    assert node.last_heartbeat_at is None


def test_a_token_in_the_query_string_is_refused(api_client, node, secret):
    response = api_client.post(f"{URL}?token={secret}&access_token={secret}", {}, format="json")

    assert response.status_code == 401
    node.refresh_from_db()
    assert node.last_heartbeat_at is None


def test_a_token_acts_only_for_its_own_node(api_client, node, secret):
    other = NodeFactory(gpus=1)

    beat(api_client, secret)

    other.refresh_from_db()
    assert other.last_heartbeat_at is None


def test_it_records_gpu_health(api_client, node, secret):
    body = {"gpus": [{"index": 0, "health": "ok"}, {"index": 2, "health": "failed"}]}

    response = beat(api_client, secret, body)

    assert response.status_code == 200
    health = dict(Gpu.objects.filter(node=node).values_list("index", "health"))
    assert health == {0: "ok", 1: "ok", 2: "failed", 3: "ok"}
    reported = Gpu.objects.get(node=node, index=2).health_reported_at
    assert reported is not None
    assert Gpu.objects.get(node=node, index=1).health_reported_at is None
    node.refresh_from_db()
    # A failed GPU does not take the node down: the node's other GPUs still serve.
    assert node.status == NodeStatus.AVAILABLE


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"gpus": [{"index": 0, "health": "on-fire"}]}, "gpus.0.health", "invalid_choice"),
        ({"gpus": [{"health": "ok"}]}, "gpus.0.index", "required"),
        ({"gpus": [{"index": -1, "health": "ok"}]}, "gpus.0.index", "min_value"),
        ({"gpus": "all fine"}, "gpus", "not_a_list"),
        ({"agent_version": "x" * 41}, "agent_version", "max_length"),
        ({"gpus": [{"index": 9, "health": "ok"}]}, "gpus.0.index", "unknown_gpu"),
        (
            {"gpus": [{"index": 1, "health": "ok"}, {"index": 1, "health": "failed"}]},
            "gpus.1.index",
            "duplicate",
        ),
    ],
)
def test_a_bad_body_gets_400_with_the_error_shape(api_client, node, secret, body, field, code):
    response = beat(api_client, secret, body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["field"], error["code"]) == (field, code)
    assert error["message"]
    node.refresh_from_db()
    assert node.last_heartbeat_at is None
    assert set(Gpu.objects.filter(node=node).values_list("health", flat=True)) == {GpuHealth.OK}


def test_last_used_at_is_written_at_most_once_a_minute(api_client, node, secret):
    token = NodeToken.objects.get(node=node)
    recent = timezone.now() - timedelta(seconds=10)
    NodeToken.objects.filter(pk=token.pk).update(last_used_at=recent)

    beat(api_client, secret)

    token.refresh_from_db()
    assert token.last_used_at == recent


def test_the_service_refuses_an_unknown_gpu_and_records_nothing(node):
    with pytest.raises(ValidationFailed) as refused:
        node_heartbeat_record(
            node=node, gpu_reports=[{"index": 0, "health": "failed"}, {"index": 7, "health": "ok"}]
        )

    assert (refused.value.field, refused.value.code) == ("gpus.1.index", "unknown_gpu")
    node.refresh_from_db()
    assert node.last_heartbeat_at is None
    assert Gpu.objects.get(node=node, index=0).health == GpuHealth.OK


def test_a_heartbeat_from_a_node_in_maintenance_keeps_it_in_maintenance(api_client, node, secret):
    Node.objects.filter(pk=node.pk).update(status=NodeStatus.MAINTENANCE)

    response = beat(api_client, secret)

    assert response.status_code == 200
    assert response.json()["status"] == "maintenance"
    node.refresh_from_db()
    assert node.status == NodeStatus.MAINTENANCE
    assert node.last_heartbeat_at is not None


@pytest.mark.parametrize(("content", "code"), [("{not json", "parse_error"), ("[1, 2]", "invalid")])
def test_a_body_that_is_not_a_json_object_gets_400(api_client, node, secret, content, code):
    response = api_client.generic(
        "POST",
        URL,
        content,
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {secret}",
    )

    assert response.status_code == 400
    assert response.json()["error"]["code"] == code
    node.refresh_from_db()
    assert node.last_heartbeat_at is None
