"""Probes of the failed-authentication limit (AUTH_FAILURE_RATE) from outside: can an attacker
lock out someone else through X-Forwarded-For, can the limit be side-stepped with header
variants, other schemes or the query string, and what does the 429 look like."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import base64
import json
from ipaddress import ip_network

import pytest

from config.api import throttling
from tests.clients import HttpsAPIClient
from tests.inventory.test_heartbeat_plain import heard
from tests.marketplace.api_fixtures import assert_error, fresh_rate_limits, key_client, org  # noqa: F401

pytestmark = pytest.mark.django_db

ATTACKER = "203.0.113.66"
VICTIM = "198.51.100.7"
PROXY = "10.0.0.5"
WRONG = "sy_live_guessing_" + "x" * 40


@pytest.fixture(autouse=True)
def fresh_failures(settings):
    settings.AUTH_FAILURE_RATE = "3/min"
    settings.API_THROTTLE_RATE = "1000/min"
    settings.TRUSTED_PROXIES = 0
    throttling.auth_failures.forget()
    yield
    throttling.auth_failures.forget()


def get(authorization: str | None, address: str, path="/api/v1/organization", **extra):
    if authorization is not None:
        extra["HTTP_AUTHORIZATION"] = authorization
    return HttpsAPIClient().get(path, REMOTE_ADDR=address, **extra)


def agent_post(authorization: str, address: str):
    return HttpsAPIClient().generic(
        "POST", "/api/v1/agent/heartbeat", json.dumps({"agent_version": "2.0"}),
        content_type="application/json", HTTP_AUTHORIZATION=authorization, REMOTE_ADDR=address,
    )  # fmt: skip


def spend_budget(address: str, **extra) -> None:
    assert [get(f"Bearer {WRONG}", address, **extra).status_code for _ in range(3)] == [401] * 3


def assert_locked(response) -> None:
    assert_error(response, 429, "too_many_failed_authentications")


# --- X-Forwarded-For: nobody locks out someone else -------------------------------------------


def test_without_trusted_proxies_a_forged_forwarded_for_locks_out_only_the_sender(org):
    good = key_client(org).secret
    spend_budget(ATTACKER, HTTP_X_FORWARDED_FOR=VICTIM)

    assert get(f"Bearer {good}", VICTIM).status_code == 200
    unseen = key_client(org).secret  # valid, but never used here: not vouched for
    assert_locked(get(f"Bearer {unseen}", ATTACKER, HTTP_X_FORWARDED_FOR=VICTIM))


def test_behind_one_proxy_the_forged_part_of_the_header_is_not_read(org, settings):
    settings.TRUSTED_PROXIES = 1
    good = key_client(org).secret
    # The attacker writes the victim's address; the proxy appends the attacker's own.
    spend_budget(PROXY, HTTP_X_FORWARDED_FOR=f"{VICTIM}, {ATTACKER}")

    assert get(f"Bearer {good}", PROXY, HTTP_X_FORWARDED_FOR=VICTIM).status_code == 200
    unseen = key_client(org).secret
    assert_locked(get(f"Bearer {unseen}", PROXY, HTTP_X_FORWARDED_FOR=ATTACKER))


def test_with_proxy_networks_a_direct_caller_cannot_speak_for_another(org, settings):
    settings.TRUSTED_PROXIES = (ip_network("10.0.0.0/8"),)
    good = key_client(org).secret
    spend_budget(ATTACKER, HTTP_X_FORWARDED_FOR=VICTIM)  # not through the proxy: ignored

    assert get(f"Bearer {good}", PROXY, HTTP_X_FORWARDED_FOR=VICTIM).status_code == 200
    unseen = key_client(org).secret
    assert_locked(get(f"Bearer {unseen}", ATTACKER))


# --- header variants: counted, or refused without a lookup ------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [f"bearer {WRONG}", f"BEARER {WRONG}", f"Bearer   {WRONG}", f"Bearer\t{WRONG}",
     f"Bearer {WRONG} extra", "Bearer", "Bearer nt_not_a_customer_key"],
    ids=["lowercase", "uppercase", "spaces", "tab", "extra word", "no key", "node token"],
)  # fmt: skip
def test_every_bearer_variant_counts_and_is_refused_once_over(org, authorization):
    statuses = [get(authorization, ATTACKER).status_code for _ in range(3)]

    assert statuses == [401] * 3
    assert_locked(get(f"Bearer {key_client(org).secret}", ATTACKER))


@pytest.mark.parametrize(
    "extra",
    [
        {"HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{WRONG}:".encode()).decode()},
        {"HTTP_AUTHORIZATION": f"Token {WRONG}"},
        {"HTTP_X_API_KEY": WRONG},
        {"HTTP_COOKIE": "sessionid=forgedforgedforgedforgedforged00"},
    ],
    ids=["basic", "token scheme", "x-api-key", "forged session"],
)
def test_other_places_for_a_key_are_never_looked_up(org, extra, django_assert_max_num_queries):
    spend_budget(ATTACKER)
    # Over the limit: these carry no Bearer credential, so they are not refused with 429,
    # and not one of them reads an API key: they cannot be used to guess one.
    with django_assert_max_num_queries(1):  # at most the session table, for the cookie
        response = HttpsAPIClient().get("/api/v1/organization", REMOTE_ADDR=ATTACKER, **extra)
    assert_error(response, 401, "not_authenticated")


def test_a_key_in_the_query_string_is_refused_before_any_lookup(org, django_assert_num_queries):
    spend_budget(ATTACKER)
    with django_assert_num_queries(0):
        response = get(None, ATTACKER, path=f"/api/v1/organization?api_key={WRONG}")
    assert_error(response, 400, "api_key_in_url")


@pytest.mark.parametrize(
    "authorization", ["bearer nt_{}", "Bearer\tnt_{}", "Token nt_{}"], ids=["lower", "tab", "token"]
)
def test_node_token_variants_over_the_limit_are_never_looked_up(
    authorization, django_assert_num_queries
):
    node, secret = heard()
    for _ in range(3):
        assert agent_post("Bearer nt_guessing_" + "x" * 40, ATTACKER).status_code == 401
    variant = authorization.format(secret.removeprefix("nt_"))
    with django_assert_num_queries(0):
        response = agent_post(variant, ATTACKER)
    assert_error(response, 401)


# --- the 429 as documented --------------------------------------------------------------------


def test_the_429_has_the_documented_shape_and_headers(org):
    spend_budget(ATTACKER)

    response = get(f"Bearer {WRONG}", ATTACKER)

    error = assert_error(response, 429, "too_many_failed_authentications")
    wait = int(response["Retry-After"])
    assert 1 <= wait <= 60
    message = error.pop("message")
    assert error == {
        "type": "rate_limit_error",
        "code": "too_many_failed_authentications",
        "field": None,
        "retry_after": wait,
    }
    assert message.startswith(throttling.AUTH_FAILURES_THROTTLED)  # DRF adds the wait in words
    for header in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"):
        assert response[header].isdigit()
    assert response["X-RateLimit-Limit"] == "1000"


def test_the_agents_429_has_the_same_shape(org):
    node, secret = heard()
    for _ in range(3):
        assert agent_post("Bearer nt_guessing_" + "x" * 40, ATTACKER).status_code == 401

    response = agent_post(f"Bearer {secret}", ATTACKER)

    error = assert_error(response, 429, "too_many_failed_authentications")
    assert error["retry_after"] == int(response["Retry-After"])
    assert response["Content-Type"] == "application/json"


def test_a_session_from_a_locked_address_is_served(org):
    from marketplace.models import Membership, Role
    from tests.factories import MembershipFactory
    from tests.marketplace.api_fixtures import session_client

    member = MembershipFactory(organization=org, role=Role.OWNER)
    spend_budget(ATTACKER)

    client = session_client(Membership.objects.get(pk=member.pk))
    assert client.get("/api/v1/organization", REMOTE_ADDR=ATTACKER).status_code == 200
