"""Rate limits: headers on every response, 429 with Retry-After past the limit."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import time

import pytest

from tests.clients import HttpsAPIClient
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    key_client,
    org,
    owner,
    owner_client,
)

pytestmark = pytest.mark.django_db


def test_every_response_carries_rate_limit_headers(org, owner_client, settings):
    settings.API_THROTTLE_RATE = "50/min"
    client = key_client(org)
    responses = [
        client.get("/api/v1/organization"),  # 200
        client.get("/api/v1/reservations/res_nope"),  # 404
        client.post("/api/v1/quotes", {}, format="json"),  # 400
        client.delete("/api/v1/organization"),  # 405
        owner_client.get("/api/v1/organization"),  # session: counted per user
    ]
    assert [r.status_code for r in responses] == [200, 404, 400, 405, 200]
    for response in responses:
        assert response["X-RateLimit-Limit"] == "50"
        reset = int(response["X-RateLimit-Reset"])
        assert time.time() <= reset <= time.time() + 61
    assert [r["X-RateLimit-Remaining"] for r in responses] == ["49", "48", "47", "46", "49"]


def test_it_answers_429_past_the_limit_per_key(org, settings):
    settings.API_THROTTLE_RATE = "3/min"
    client, other = key_client(org), key_client(org)
    for _ in range(3):
        assert client.get("/api/v1/organization").status_code == 200
    response = client.get("/api/v1/organization")
    error = assert_error(response, 429, "rate_limited")
    assert error["type"] == "rate_limit_error"
    assert response["X-RateLimit-Remaining"] == "0"
    assert 1 <= int(response["Retry-After"]) <= 60
    assert error["retry_after"] == int(response["Retry-After"])
    # Another key of the same organisation has its own budget.
    assert other.get("/api/v1/organization").status_code == 200


def test_failed_authentication_is_counted_per_address(settings):
    settings.API_THROTTLE_RATE = "2/min"
    client = HttpsAPIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer sy_live_guessing_" + "x" * 40)
    assert [client.get("/api/v1/organization").status_code for _ in range(3)] == [401, 401, 429]


@pytest.mark.parametrize("rate", ["bogus", "0/min", "10/week"])
def test_a_malformed_rate_fails_at_start_up(rate):
    import os
    import subprocess
    import sys

    env = {**os.environ, "API_THROTTLE_RATE": rate}
    result = subprocess.run(
        [sys.executable, "-c", "import config.settings"], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "API_THROTTLE_RATE must look like 600/min" in result.stderr


def test_a_redis_that_lost_the_count_script_is_given_it_again(org, settings):
    """Redis restarted or flushed its scripts: the next request loads it and is counted."""
    from config.api import throttling

    settings.API_THROTTLE_RATE = "50/min"
    client = key_client(org)
    assert client.get("/api/v1/organization")["X-RateLimit-Remaining"] == "49"
    throttling._redis.script_flush()
    response = client.get("/api/v1/organization")
    assert response.status_code == 200
    assert response["X-RateLimit-Remaining"] == "48"
    assert throttling._redis.script_exists(throttling._script.sha) == [True]
    assert client.get("/api/v1/organization")["X-RateLimit-Remaining"] == "47"
