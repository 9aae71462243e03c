"""A buggy or hostile agent's heartbeat: every malformed value is a clear 4xx that changes
nothing, never a 500, on the plain path and on DRF's alike."""

import pytest

from inventory.models import Gpu, GpuHealth, GpuHealthChange, Node
from inventory.services import node_token_issue
from tests.factories import NodeFactory

pytestmark = pytest.mark.django_db
URL = "/api/v1/agent/heartbeat"
TOO_BIG_FOR_A_FLOAT = "1" + "0" * 400  # a JSON integer: float() of it raises OverflowError


@pytest.fixture
def node():
    return NodeFactory(gpus=4)


@pytest.fixture
def secret(node):
    return node_token_issue(node=node, label="agent")[1]


def _beat(api_client, body: str, header: str):
    return api_client.generic(
        "POST", URL, body, content_type="application/json", HTTP_AUTHORIZATION=header
    )


@pytest.mark.parametrize("field", ["temperature_c", "power_w", "utilization_pct"])
@pytest.mark.parametrize("extra", ["", ', "metrics": {}'])  # the plain path; DRF's
def test_a_reading_too_large_for_a_float_is_a_400_and_changes_nothing(
    api_client, node, secret, field, extra
):
    body = f'{{"telemetry": {{"gpus": [{{"index": 0, "{field}": {TOO_BIG_FOR_A_FLOAT}}}]}}{extra}}}'

    response = _beat(api_client, body, f"Bearer {secret}")

    assert response.status_code == 400
    assert response.json()["error"]["field"] == f"telemetry.gpus.0.{field}"
    node.refresh_from_db()
    assert node.last_heartbeat_at is None
    assert set(Gpu.objects.filter(node=node).values_list("health", flat=True)) == {GpuHealth.OK}
    assert not GpuHealthChange.objects.exists()


@pytest.mark.parametrize(
    "secret_text",
    ["nt_\x00abcdefg_xxxxxxxxxxxx", "nt_0000\x00abc_xxxxxxxx", "nt_00000000_\x00", "nt_é0000000_x"],
)
def test_a_token_with_bytes_no_token_has_is_a_401_without_a_lookup(
    api_client, node, secret, secret_text, django_assert_num_queries
):
    # gunicorn refuses a NUL in a header, other servers may not: it must not reach PostgreSQL.
    with django_assert_num_queries(0):
        response = _beat(api_client, "{}", f"Bearer {secret_text}")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "authentication_failed"
    assert Node.objects.get(pk=node.pk).last_heartbeat_at is None
