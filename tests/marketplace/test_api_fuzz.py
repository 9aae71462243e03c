"""The whole public API, fuzzed from its own OpenAPI schema (schemathesis, in process).

For requests generated from the schema, valid and invalid, every operation must answer
without a server error, with a status code and content type the schema documents, and with
a body that matches the documented schema. Card operations go to a real localstripe. Rules the schema cannot state (an end after the
start, a known GPU model) make many schema-valid requests a 400 by design, so the checks that
expect every schema-valid request to succeed and every invalid one to fail are not run; the
per-endpoint bad-input tests cover those rules one by one.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from config.wsgi import application
from marketplace.models import ApiKeyScope
from marketplace.services.api_keys import api_key_create
from tests.clients import BehindTlsProxy
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    fresh_rate_limits,
    market,
    org,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture
def fuzz_api(db, market, localstripe, settings):
    settings.API_THROTTLE_RATE = "1000000/min"  # the fuzz is many calls from one key
    # The calls go straight into the WSGI application inside the test's transaction; as with
    # Django's test client, the end of a request must not close that connection.
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def fuzz_key(org):
    _, secret = api_key_create(
        organization=org,
        name="fuzz",
        scopes=[ApiKeyScope.READ, ApiKeyScope.WRITE],
        created_by=None,
    )
    return secret


# Loaded once at collection: the schema view needs no database. Calls come as through the TLS
# proxy (tests/clients.py).
schema = schemathesis.openapi.from_wsgi("/api/schema/", BehindTlsProxy(application))


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_generated_input_as_its_schema_says(case, fuzz_api, fuzz_key):
    case.call_and_validate(headers={"Authorization": f"Bearer {fuzz_key}"}, checks=CHECKS)
