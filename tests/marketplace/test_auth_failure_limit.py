"""Failed authentications are limited per client address (AUTH_FAILURE_RATE,
config.api.throttling.AuthFailureLimit): past the limit a client's requests with credentials
are answered 429 with Retry-After before the key or token is looked up; other clients are
unaffected; with Redis unreachable a wrong credential is still a plain 401."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from django.utils import timezone

from config.api import throttling
from inventory.models import NodeToken
from marketplace.models import ApiKey
from marketplace.services.api_keys import api_key_revoke
from tests.clients import HttpsAPIClient
from tests.inventory.test_heartbeat_plain import heard
from tests.marketplace.api_fixtures import assert_error, fresh_rate_limits, key_client, org  # noqa: F401

pytestmark = pytest.mark.django_db

GUESSER = "203.0.113.66"
NEIGHBOUR = "198.51.100.7"
WRONG_KEY = "Bearer sy_live_guessing_" + "x" * 40
WRONG_TOKEN = "Bearer nt_guessing_" + "x" * 40


@pytest.fixture(autouse=True)
def fresh_failures(settings):
    settings.AUTH_FAILURE_RATE = "3/min"
    settings.API_THROTTLE_RATE = "1000/min"  # out of the way: this is the failure limit's test
    throttling.auth_failures.forget()
    yield
    throttling.auth_failures.forget()


def api_get(authorization: str, address: str):
    client = HttpsAPIClient()
    return client.get("/api/v1/organization", HTTP_AUTHORIZATION=authorization,
                      REMOTE_ADDR=address)  # fmt: skip


def agent_post(authorization: str, address: str, path: str = "heartbeat"):
    return HttpsAPIClient().generic(
        "POST", f"/api/v1/agent/{path}", json.dumps({"agent_version": "2.0"}),
        content_type="application/json", HTTP_AUTHORIZATION=authorization, REMOTE_ADDR=address,
    )  # fmt: skip


def assert_refused_for_failures(response) -> int:
    error = assert_error(response, 429, "too_many_failed_authentications")
    wait = int(response["Retry-After"])
    assert 1 <= wait <= 60
    assert (error["type"], error["retry_after"]) == ("rate_limit_error", wait)
    assert "Too many failed authentications from your address" in error["message"]
    return wait


def test_wrong_api_keys_past_the_limit_get_429_without_a_lookup(org, django_assert_num_queries):
    good = key_client(org).secret

    assert [api_get(WRONG_KEY, GUESSER).status_code for _ in range(3)] == [401, 401, 401]
    with django_assert_num_queries(0):  # neither the key nor anything else is read
        assert_refused_for_failures(api_get(WRONG_KEY, GUESSER))
    # Every request with credentials from that client waits, a right key too...
    assert_refused_for_failures(api_get(f"Bearer {good}", GUESSER))
    # ...but another client's right key is served, and its wrong one is its own first failure.
    assert api_get(f"Bearer {good}", NEIGHBOUR).status_code == 200
    assert api_get(WRONG_KEY, NEIGHBOUR).status_code == 401


def test_a_revoked_key_counts_as_a_failure(org):
    client = key_client(org)
    api_key_revoke(api_key=ApiKey.objects.get(organization=org))

    responses = [api_get(f"Bearer {client.secret}", GUESSER) for _ in range(4)]

    assert [r.status_code for r in responses] == [401, 401, 401, 429]
    assert responses[0].json()["error"]["code"] == "api_key_revoked"


def test_an_ipv6_client_is_counted_by_its_64(org):
    good = key_client(org).secret
    for address in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"):
        assert api_get(WRONG_KEY, address).status_code == 401

    assert_refused_for_failures(api_get(WRONG_KEY, "2001:db8:1:2::abcd"))
    assert api_get(f"Bearer {good}", "2001:db8:1:3::1").status_code == 200  # another /64


def test_the_client_may_try_again_once_the_window_ends(settings):
    settings.AUTH_FAILURE_RATE = "2/s"
    time.sleep(1 - time.time() % 1)  # the start of a second: both failures in one window
    assert [api_get(WRONG_KEY, GUESSER).status_code for _ in range(3)] == [401, 401, 429]

    time.sleep(1 - time.time() % 1 + 0.05)

    assert api_get(WRONG_KEY, GUESSER).status_code == 401


@pytest.mark.parametrize("plain", [True, False], ids=["plain heartbeat", "drf"])
def test_wrong_node_tokens_past_the_limit_get_429_without_a_lookup(
    plain, monkeypatch, django_assert_num_queries
):
    if not plain:  # the heartbeat's fast path off: DRF authenticates it
        monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)
    node, secret = heard()

    assert [agent_post(WRONG_TOKEN, GUESSER).status_code for _ in range(3)] == [401] * 3
    with django_assert_num_queries(0):
        assert_refused_for_failures(agent_post(WRONG_TOKEN, GUESSER))
    assert_refused_for_failures(agent_post(f"Bearer {secret}", GUESSER))
    # The node's own agent, from its own address, is served.
    assert agent_post(f"Bearer {secret}", NEIGHBOUR).status_code == 200


def test_node_token_and_api_key_failures_share_the_clients_budget(org):
    assert agent_post(WRONG_TOKEN, GUESSER, path="workloads").status_code == 401
    assert api_get(WRONG_KEY, GUESSER).status_code == 401
    assert agent_post(WRONG_TOKEN, GUESSER, path="jobs/lease").status_code == 401

    assert_refused_for_failures(api_get(WRONG_KEY, GUESSER))


# --- Redis unreachable ------------------------------------------------------------------------


@pytest.fixture
def redis_gone(settings, monkeypatch):
    """The cache (and so the limiter) points at a port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "LOCATION": f"redis://127.0.0.1:{port}/0"}
    }
    monkeypatch.setattr(throttling, "_redis", None)
    monkeypatch.setattr(throttling, "outage", throttling.LimiterOutage())


def test_with_redis_unreachable_a_wrong_key_is_still_401(redis_gone, settings):
    settings.RATE_LIMIT_FAIL_OPEN_SECONDS = 300

    responses = [api_get(WRONG_KEY, GUESSER) for _ in range(6)]

    assert [r.status_code for r in responses] == [401] * 6
    assert responses[-1].json()["error"]["code"] == "invalid_api_key"


def test_with_redis_unreachable_for_long_a_wrong_node_token_is_still_401(redis_gone, settings):
    settings.RATE_LIMIT_FAIL_OPEN_SECONDS = 0  # past the fail-open bound: never a 503 here

    responses = [agent_post(WRONG_TOKEN, GUESSER) for _ in range(6)]

    assert [r.status_code for r in responses] == [401] * 6


# --- the setting ------------------------------------------------------------------------------


def _start(**env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import config.settings"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("rate", ["bogus", "0/min", "30/week"])
def test_a_malformed_rate_fails_at_start_up(rate):
    result = _start(AUTH_FAILURE_RATE=rate)

    assert result.returncode != 0
    assert "AUTH_FAILURE_RATE must look like 600/min" in result.stderr


def test_a_window_agents_could_not_wait_out_fails_at_start_up():
    refused = _start(AUTH_FAILURE_RATE="100/hour", NODE_OFFLINE_AFTER_SECONDS="180")
    accepted = _start(AUTH_FAILURE_RATE="100/min", NODE_OFFLINE_AFTER_SECONDS="180")

    assert refused.returncode != 0
    assert "AUTH_FAILURE_RATE's window must be shorter than NODE_OFFLINE_AFTER_SECONDS" in (
        refused.stderr
    )
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("plain", [True, False], ids=["fast path", "DRF"])
def test_one_agent_with_a_revoked_token_does_not_silence_its_sites_other_agents(plain, monkeypatch):
    """A site's agents share its address: a retired node's agent, still running with its
    revoked token, spends the address's budget; the agents whose tokens this process accepted
    keep heartbeating, and a token it never saw waits like a guess."""
    if not plain:
        monkeypatch.setattr("inventory.apis._heartbeat_plain", lambda request: None)
    site_address = "192.0.2.10"
    _, working = heard()
    assert agent_post(f"Bearer {working}", site_address).status_code == 200
    retired_node, retired = heard()
    NodeToken.objects.filter(node=retired_node).update(revoked_at=timezone.now())

    assert [agent_post(f"Bearer {retired}", site_address).status_code for _ in range(3)] == [
        401
    ] * 3
    assert_refused_for_failures(agent_post(f"Bearer {retired}", site_address))
    for _ in range(3):
        assert agent_post(f"Bearer {working}", site_address).status_code == 200
    _, unseen = heard()
    assert_refused_for_failures(agent_post(f"Bearer {unseen}", site_address))


def test_a_key_this_process_accepted_still_works_from_a_locked_address_for_a_while(
    org, monkeypatch
):
    used, unused = key_client(org).secret, key_client(org).secret
    assert api_get(f"Bearer {used}", GUESSER).status_code == 200
    assert [api_get(WRONG_KEY, GUESSER).status_code for _ in range(3)] == [401] * 3

    assert api_get(f"Bearer {used}", GUESSER).status_code == 200
    assert_refused_for_failures(api_get(f"Bearer {unused}", GUESSER))
    # Vouched for VOUCHED_SECONDS after it was last accepted, then a credential like any other.
    later = time.monotonic() + throttling.VOUCHED_SECONDS + 1
    monkeypatch.setattr(throttling.time, "monotonic", lambda: later)
    assert_refused_for_failures(api_get(f"Bearer {used}", GUESSER))
