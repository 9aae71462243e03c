"""A read replica that goes away costs the primary some reads, not a 503 on every search and
list (config/replica.py). The replica here is a second connection to the test database, as
DATABASE_REPLICA_URL makes one; "unreachable" is that connection pointed at a closed port."""

import logging
import socket

import pytest
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.postgresql.base import DatabaseWrapper

from config import replica
from config.replica import REPLICA
from marketplace.models import ApiKeyScope, Role
from marketplace.services.api_keys import api_key_create
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, SiteFactory


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def replica_alias(monkeypatch):
    """The "replica" alias as DATABASE_REPLICA_URL makes it (the plain PostgreSQL backend);
    yields a function that points it at a port, the test database's own by default."""
    primary = connections[DEFAULT_DB_ALIAS].settings_dict
    monkeypatch.setattr(replica, "replica_configured", lambda: True)
    monkeypatch.setattr(replica, "_replica_down_until", 0.0, raising=False)

    def configure(port: str = primary["PORT"]) -> None:
        connections[REPLICA] = DatabaseWrapper({**primary, "PORT": port}, REPLICA)

    yield configure
    connections[REPLICA].close()
    del connections[REPLICA]


@pytest.fixture
def member_key(transactional_db):
    membership = MembershipFactory(role=Role.OWNER)
    SiteFactory()
    _, secret = api_key_create(
        organization=membership.organization, name="k", scopes=[ApiKeyScope.READ], created_by=None
    )
    return HttpsClient(HTTP_AUTHORIZATION=f"Bearer {secret}", raise_request_exception=False)


def test_with_the_replica_unreachable_lists_are_read_from_the_primary(
    replica_alias, member_key, caplog
):
    replica_alias(port=str(_free_port()))  # nothing listens there

    with caplog.at_level(logging.WARNING, logger="config.replica"):
        first = member_key.get("/api/v1/sites")
        second = member_key.get("/api/v1/sites")

    assert [first.status_code, second.status_code] == [200, 200]
    assert len(first.json()["results"]) == 1
    assert second.json() == first.json()
    # Found unreachable once, then passed over without another attempt.
    warnings = [r.getMessage() for r in caplog.records if r.name == "config.replica"]
    assert len(warnings) == 1
    assert warnings[0].startswith("read replica unreachable, its reads go to the primary for 30 s")


def test_a_replica_lost_during_the_reads_is_left_and_the_reads_run_on_the_primary(
    replica_alias, member_key
):
    replica_alias()  # reachable: the probe passes and the reads start on it
    severed = []

    def sever_the_connection(execute, sql, params, many, context):
        # As if the replica were restarted mid-request: its server side is gone.
        if not severed:
            severed.append(sql)
            context["connection"].connection.close()
        return execute(sql, params, many, context)

    with connections[REPLICA].execute_wrapper(sever_the_connection):
        response = member_key.get("/api/v1/sites")

    assert severed, "no read reached the replica"
    assert response.status_code == 200
    assert len(response.json()["results"]) == 1
    assert replica._replica_down_until > 0


def test_a_reachable_replica_serves_the_reads(replica_alias, member_key):
    replica_alias()
    statements = []

    def count(execute, sql, params, many, context):
        statements.append(sql)
        return execute(sql, params, many, context)

    with connections[REPLICA].execute_wrapper(count):
        response = member_key.get("/api/v1/sites")

    assert response.status_code == 200
    assert len(response.json()["results"]) == 1
    assert any("inventory_site" in sql for sql in statements)
    assert replica._replica_down_until == 0.0
