"""API keys are cached per process, and a revocation still takes effect at once everywhere."""

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from config.api import throttling
from marketplace.auth import api_keys_changed
from marketplace.models import ApiKey
from marketplace.services.api_keys import api_key_revoke
from tests.marketplace.api_fixtures import (  # noqa: F401 (fixtures)
    fresh_rate_limits,
    key_client,
    org,
)

pytestmark = pytest.mark.django_db

URL = "/api/v1/organization"


def _key_reads(client) -> tuple[int, int]:
    """(status, statements that read the key) of one request."""
    with CaptureQueriesContext(connection) as queries:
        status = client.get(URL).status_code
    return status, sum("marketplace_apikey" in q["sql"] for q in queries.captured_queries)


@pytest.fixture
def warm(org):  # noqa: F811
    """A key whose second request cached it: the third reads no key from the database."""
    client = key_client(org)
    for _ in range(2):
        assert client.get(URL).status_code == 200
    assert _key_reads(client) == (200, 0)
    return client


def _key(org) -> ApiKey:  # noqa: F811
    return ApiKey.objects.get(organization=org)


def test_a_cached_key_reads_nothing_from_the_database(warm):
    assert [_key_reads(warm) for _ in range(3)] == [(200, 0)] * 3


def test_a_key_revoked_here_is_refused_on_its_next_request(warm, org):  # noqa: F811
    api_key_revoke(api_key=_key(org))

    response = warm.get(URL)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_revoked"


def test_a_key_revoked_by_another_process_is_refused_here_at_once(warm, org):  # noqa: F811
    # What another process's revocation leaves behind: the row written (no signal here) and a
    # new generation published.
    ApiKey.objects.filter(organization=org).update(revoked_at=timezone.now())
    api_keys_changed()

    response = warm.get(URL)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_revoked"


def test_a_change_to_any_key_makes_every_cached_key_read_again(warm, org):  # noqa: F811
    other = key_client(org)  # creating a key is a change too

    assert other.get(URL).status_code == 200
    assert _key_reads(warm)[1] == 1


def test_with_redis_unreachable_a_cached_key_is_checked_in_the_database(
    warm,
    org,  # noqa: F811
    monkeypatch,
):
    def unreachable(*_args, **_kwargs):
        raise redis.ConnectionError("Redis is down")

    monkeypatch.setattr(throttling, "_count", unreachable)
    monkeypatch.setattr(throttling, "outage", throttling.LimiterOutage())
    assert _key_reads(warm) == (200, 1)  # read again, not trusted from the cache

    # Revoked without a published generation (Redis is down): refused all the same.
    ApiKey.objects.filter(organization=org).update(revoked_at=timezone.now())
    response = warm.get(URL)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "api_key_revoked"


def test_an_unknown_key_is_refused_and_counted_against_the_address(org):  # noqa: F811
    client = key_client(org)
    client.credentials(HTTP_AUTHORIZATION="Bearer sy_live_" + "x" * 40)

    response = client.get(URL)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response["X-RateLimit-Remaining"] is not None
