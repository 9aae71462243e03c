"""Throttles and the sign-in limit count per client, read through trusted proxies only."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from tests.clients import HttpsAPIClient, HttpsClient
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_rate_limits")]

PROXY = "127.0.0.1"
TOO_MANY = "Too many sign-in attempts"


def _sign_in(client: HttpsClient, forwarded: str | None, password="wrong-password"):
    extra = {"REMOTE_ADDR": PROXY}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return client.post("/login", {"username": "ada", "password": password}, **extra)


def _api_call(client: HttpsAPIClient, forwarded: str) -> int:
    """An unauthenticated API call from `forwarded`, through the proxy."""
    return client.get(
        "/api/v1/organization", REMOTE_ADDR=PROXY, HTTP_X_FORWARDED_FOR=forwarded
    ).status_code


@pytest.fixture
def ada(django_user_model):
    return django_user_model.objects.create_user(username="ada", password="a-long-passphrase-1")


def test_behind_a_trusted_proxy_one_persons_failed_sign_ins_do_not_lock_out_another(ada, settings):
    settings.TRUSTED_PROXIES = 1
    settings.PORTAL_SIGN_IN_RATE = "2/hour"
    attacker, colleague = HttpsClient(), HttpsClient()
    for _ in range(2):
        assert TOO_MANY not in _sign_in(attacker, "203.0.113.66").content.decode()
    assert TOO_MANY in _sign_in(attacker, "203.0.113.66").content.decode()

    # Same proxy, another client: her own budget, and her right password works.
    response = _sign_in(colleague, "198.51.100.7", password="a-long-passphrase-1")
    assert response.status_code == 302
    # Writing someone else's address into the header does not reach past the proxy.
    assert TOO_MANY in _sign_in(attacker, "198.51.100.7, 203.0.113.66").content.decode()


def test_without_trusted_proxies_a_spoofed_forwarded_for_does_not_escape_the_limit(ada, settings):
    settings.TRUSTED_PROXIES = 0
    settings.PORTAL_SIGN_IN_RATE = "2/hour"
    client = HttpsClient()
    for n in range(2):
        assert TOO_MANY not in _sign_in(client, f"203.0.113.{n}").content.decode()
    response = _sign_in(client, "203.0.113.99", password="a-long-passphrase-1")
    assert TOO_MANY in response.content.decode()
    assert response.status_code == 200  # refused: still on the form


def test_the_api_counts_unauthenticated_callers_per_forwarded_client(settings):
    settings.TRUSTED_PROXIES = 1
    settings.API_THROTTLE_RATE = "2/min"
    client = HttpsAPIClient()
    call = lambda forwarded: _api_call(client, forwarded)  # noqa: E731

    assert [call("203.0.113.66") for _ in range(3)] == [401, 401, 429]
    assert call("198.51.100.7") == 401  # another client behind the same proxy

    settings.TRUSTED_PROXIES = 0  # the header is ignored: everyone is the proxy
    assert [call("192.0.2.1"), call("192.0.2.2"), call("192.0.2.3")] == [401, 401, 429]


def test_the_api_counts_an_unauthenticated_ipv6_caller_by_its_64(settings):
    """One subscriber holds a whole /64: a new address of it for each call is the same client."""
    settings.TRUSTED_PROXIES = 1
    settings.API_THROTTLE_RATE = "2/min"
    client = HttpsAPIClient()

    calls = [_api_call(client, f"2001:db8:1:2::{n}") for n in (1, 2, 3)]
    assert calls == [401, 401, 429]
    assert _api_call(client, "2001:db8:1:3::1") == 401  # the next /64: another client
