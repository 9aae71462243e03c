"""The suite runs with production's settings (scripts/test.py, docs/development.md): what a
deployment behind its TLS proxy does, seen by a client that talks plain HTTP and one that
comes through the proxy (tests/clients.py)."""

import json
import logging

import pytest
from django.conf import settings
from django.test import Client

from config.logs import JsonLogFormatter
from tests.clients import HttpsAPIClient, HttpsClient
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

HSTS = "max-age=31536000; includeSubDomains"


def test_the_suite_has_production_settings():
    assert settings.SECURE_SSL_REDIRECT is True
    assert settings.SESSION_COOKIE_SECURE is True
    assert settings.CSRF_COOKIE_SECURE is True
    assert len(settings.SECRET_KEY) >= 50
    assert not settings.SECRET_KEY.startswith("dev-insecure")
    assert settings.METRICS_ALLOWED_IPS == []


@pytest.mark.parametrize("path", ["/login", "/api/v1/sites", "/admin/", "/api/docs/"])
def test_a_plain_http_request_is_redirected_to_https(path):
    response = Client().get(f"{path}?x=1")

    assert response.status_code == 301
    assert response["Location"] == f"https://testserver{path}?x=1"


def test_the_probes_answer_over_plain_http():
    plain = Client()

    assert plain.get("/healthz").status_code == 200
    assert plain.get("/readyz").status_code == 200
    # Refused, not redirected: no token, and no address is allowed without one.
    assert plain.get("/metrics").status_code == 403


def test_a_response_over_https_tells_browsers_to_stay_on_https():
    response = HttpsClient().get("/login")

    assert response.status_code == 200
    assert response["Strict-Transport-Security"] == HSTS


def test_the_session_and_csrf_cookies_are_secure_http_only_and_same_site_lax():
    UserFactory(username="ada", password="a-long-passphrase-1")
    client = HttpsClient()
    form = client.get("/login")
    csrf = form.cookies["csrftoken"]

    signed_in = client.post(
        "/login",
        {"username": "ada", "password": "a-long-passphrase-1"},
        HTTP_X_CSRFTOKEN=csrf.value,
    )

    assert signed_in.status_code == 302
    session = signed_in.cookies["sessionid"]
    assert csrf["secure"] is True
    assert session["secure"] is True
    assert session["httponly"] is True
    # No script reads the CSRF cookie: forms carry the token, the API docs get it in the page.
    assert csrf["httponly"] is True
    assert (session["samesite"], csrf["samesite"]) == ("Lax", "Lax")
    # A session ends with its lifetime (SESSION_LIFETIME_HOURS), no longer two weeks.
    assert session["max-age"] == settings.SESSION_LIFETIME.total_seconds() == 12 * 3600


def test_the_api_answers_json_only():
    assert settings.REST_FRAMEWORK["DEFAULT_RENDERER_CLASSES"] == [
        "rest_framework.renderers.JSONRenderer"
    ]
    client = HttpsAPIClient()

    as_html = client.get("/api/v1/sites", HTTP_ACCEPT="text/html")

    assert as_html.status_code == 406
    assert as_html["Content-Type"] == "application/json"


def test_logs_are_json_lines():
    (console,) = [h for h in logging.getLogger().handlers if h.get_name() == "console"]
    assert isinstance(console.formatter, JsonLogFormatter)
    record = logging.LogRecord(
        "switchyard.test", logging.WARNING, __file__, 1, "a line for %s", ("operators",), None
    )

    assert console.filter(record)
    line = json.loads(console.format(record))

    assert line["level"] == "WARNING"
    assert line["message"] == "a line for operators"
    assert line["request_id"] == "-"
