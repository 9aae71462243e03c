"""Fixtures the heartbeat tests share."""

import pytest

from inventory import heartbeats, telemetry


@pytest.fixture
def empty_buffers():
    """The heartbeat and telemetry buffers in Redis, empty before and after the test (and the
    telemetry rules read afresh); yields the Redis client."""
    client = telemetry.buffer_client()
    keys = [heartbeats.LAST_SEEN_KEY, heartbeats.TOKEN_USED_KEY, telemetry.BUFFER_KEY,
            telemetry.CLAIMS_KEY]  # fmt: skip
    client.delete(*keys)
    telemetry.rules_cache_clear()
    yield client
    client.delete(*keys)
    telemetry.rules_cache_clear()
