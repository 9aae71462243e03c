"""Every response carries a Request-Id, and the log lines of that request carry it too."""

import logging

import pytest

from config.request_id import RequestIdLogFilter, current_request_id
from tests.clients import HttpsAPIClient

pytestmark = pytest.mark.django_db


def test_every_response_has_its_own_request_id():
    client = HttpsAPIClient()
    first = client.get("/api/schema/")
    second = client.get("/api/v1/no-such-endpoint")
    denied = client.get("/api/v1/reservations")

    ids = [r["Request-Id"] for r in (first, second, denied)]
    assert [r.status_code for r in (first, second, denied)] == [200, 404, 401]
    assert all(i.startswith("req_") and len(i) == 28 for i in ids)
    assert len(set(ids)) == 3


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("edge-7f3a9c1d2b", True),
        ("short", False),  # under 8 characters
        ("x" * 65, False),
        ("abc def ghi", False),  # a space
        ("abcdefgh\r\nSet-Cookie: x=1", False),
    ],
)
def test_a_callers_own_x_request_id_is_kept_only_when_it_is_a_plain_token(sent, kept):
    response = HttpsAPIClient().get("/api/schema/", HTTP_X_REQUEST_ID=sent)

    assert (response["Request-Id"] == sent) is kept
    assert response["Request-Id"].startswith("req_") is not kept


def test_log_lines_written_during_a_request_carry_its_id(caplog):
    seen = []

    class Spy(logging.Handler):
        def emit(self, record):
            seen.append(record.request_id)

    handler = Spy()
    handler.addFilter(RequestIdLogFilter())
    logger = logging.getLogger("django.request")
    logger.addHandler(handler)
    try:
        response = HttpsAPIClient().get("/api/v1/no-such-endpoint")  # Django logs the 404
    finally:
        logger.removeHandler(handler)

    assert seen and set(seen) == {response["Request-Id"]}
    assert current_request_id() == "-"  # outside a request
