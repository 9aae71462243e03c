"""A persistent connection is checked (SELECT 1) before a request only after it sat idle."""

import time

import pytest
from django.db import connection, connections


@pytest.fixture
def fresh_connection():
    """A connection of the default database of its own, outside the test's transaction."""
    wrapper = connections.create_connection("default")
    checks = []
    real_is_usable = wrapper.is_usable

    def counted_is_usable():
        checks.append(time.monotonic())
        return real_is_usable()

    wrapper.is_usable = counted_is_usable
    wrapper.checks = checks
    yield wrapper
    wrapper.close()


def _next_request(wrapper) -> int:
    """What Django does between requests, then the next request's first query; its backend."""
    wrapper.close_if_unusable_or_obsolete()  # request_started: health_check_done = False
    with wrapper.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        return cur.fetchone()[0]


@pytest.mark.django_db
def test_a_connection_used_a_moment_ago_is_not_checked(fresh_connection, settings):
    settings.DATABASE_HEALTH_CHECK_AFTER_IDLE_SECONDS = 10
    first = _next_request(fresh_connection)

    assert [_next_request(fresh_connection) for _ in range(3)] == [first] * 3
    assert fresh_connection.checks == []


@pytest.mark.django_db
def test_a_connection_idle_for_longer_is_checked_once_per_request(fresh_connection, settings):
    settings.DATABASE_HEALTH_CHECK_AFTER_IDLE_SECONDS = 10
    first = _next_request(fresh_connection)
    fresh_connection.last_used -= 11

    assert _next_request(fresh_connection) == first
    assert len(fresh_connection.checks) == 1


@pytest.mark.django_db
def test_a_connection_the_server_dropped_while_idle_is_replaced_before_the_query(
    fresh_connection, settings
):
    settings.DATABASE_HEALTH_CHECK_AFTER_IDLE_SECONDS = 10
    first = _next_request(fresh_connection)
    with connection.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", [first])
    fresh_connection.last_used -= 11

    second = _next_request(fresh_connection)  # no error: checked, found dead, reconnected

    assert second != first
    assert len(fresh_connection.checks) == 1
