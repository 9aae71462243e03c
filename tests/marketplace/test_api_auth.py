"""API keys in the Authorization header only; scopes; revocation; last_used_at."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import ApiKey, ApiKeyScope, Reservation
from marketplace.services.api_keys import api_key_create, api_key_hash, api_key_revoke
from tests.clients import HttpsAPIClient
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    client_key,
    fresh_rate_limits,
    key_client,
    org,
    owner,
    owner_client,
    session_client,
)

pytestmark = pytest.mark.django_db

URL = "/api/v1/organization"


def test_it_accepts_a_good_key_in_the_authorization_header(client_key, org):
    response = client_key.get(URL)
    assert response.status_code == 200
    assert response.json() == {
        "id": org.public_id,
        "name": org.name,
        "slug": org.slug,
        "created_at": org.created_at.isoformat().replace("+00:00", "Z"),
        "suspended_at": None,
        "suspension_reason": "",
        "role": None,
    }


def test_it_stores_only_the_hash_and_a_visible_prefix(org):
    key, secret = api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)
    prefix8, random_part = secret.removeprefix("sy_live_").split("_")
    assert len(prefix8) == 8 and len(random_part) == 40
    assert key.prefix == f"sy_live_{prefix8}"
    assert key.secret_hash == api_key_hash(secret)
    assert secret not in str(ApiKey.objects.filter(pk=key.pk).values().get())


def test_it_answers_401_without_credentials():
    response = HttpsAPIClient().get(URL)
    assert_error(response, 401, "not_authenticated")
    assert response["WWW-Authenticate"] == 'Bearer realm="switchyard"'


@pytest.mark.parametrize(
    "header,code",
    [
        ("Bearer sy_live_abcdefgh_" + "x" * 40, "invalid_api_key"),  # well-formed, unknown
        ("Bearer not-a-key", "invalid_api_key"),
        ("Bearer", "invalid_authorization_header"),
        ("Bearer two parts", "invalid_authorization_header"),
    ],
)
def test_it_answers_401_to_a_bad_key(header, code, org):
    client = HttpsAPIClient()
    client.credentials(HTTP_AUTHORIZATION=header)
    error = assert_error(client.get(URL), 401)
    assert (error["type"], error["code"]) == ("authentication_error", code)


def test_it_answers_401_to_a_revoked_key(org):
    client = key_client(org)
    key = ApiKey.objects.get(organization=org)
    api_key_revoke(api_key=key)
    assert_error(client.get(URL), 401, "api_key_revoked")


@pytest.mark.parametrize(
    "param", ["api_key", "key", "token", "access_token", "Authorization", "bearer"]
)
def test_it_refuses_a_key_in_the_query_string(param, org):
    client = key_client(org)  # also has a valid header: the URL key is refused regardless
    anonymous = HttpsAPIClient()
    for c in (client, anonymous):
        error = assert_error(c.get(f"{URL}?{param}={client.secret}"), 400, "api_key_in_url")
        assert "Authorization header" in error["message"]


def test_it_refuses_a_key_value_under_any_query_parameter_name(org):
    client = key_client(org)
    assert_error(HttpsAPIClient().get(f"{URL}?q={client.secret}"), 400, "api_key_in_url")


def test_it_refuses_a_key_inside_a_query_value_or_in_the_path(org):
    # Not only a value that starts with the key: a whole header pasted into the URL, or a
    # key where an id goes, has leaked into the URL as surely.
    client = key_client(org)  # a valid header too: the leak is refused regardless
    for url in (
        f"{URL}?Authorization=Bearer%20{client.secret}",
        f"{URL}?note=mine-is-{client.secret}",
        f"/api/v1/reservations/{client.secret}",
    ):
        assert_error(client.get(url), 400, "api_key_in_url")


def test_a_read_only_key_can_read_but_not_post(org):
    client = key_client(org, scopes=[ApiKeyScope.READ])
    assert client.get("/api/v1/reservations").status_code == 200
    response = client.post(
        "/api/v1/reservations",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1},
        format="json",
    )
    assert_error(response, 403, "insufficient_scope")
    assert Reservation.objects.count() == 0


def test_a_key_cannot_create_keys_or_invite_members(client_key, org):
    before = ApiKey.objects.count()
    response = client_key.post("/api/v1/api-keys", {"name": "x"}, format="json")
    assert_error(response, 403, "session_required")
    response = client_key.post(
        "/api/v1/organization/invitations", {"email": "a@example.com"}, format="json"
    )
    assert_error(response, 403, "session_required")
    assert ApiKey.objects.count() == before


def test_it_records_last_used_at_at_most_once_a_minute(org, monkeypatch):
    client = key_client(org)
    key = ApiKey.objects.get(organization=org)
    assert key.last_used_at is None
    client.get(URL)
    key.refresh_from_db()
    first = key.last_used_at
    assert first is not None
    client.get(URL)
    key.refresh_from_db()
    assert key.last_used_at == first  # within the minute: not written again
    later = first + timedelta(minutes=2)  # the key may be cached: the clock moves instead
    monkeypatch.setattr(timezone, "now", lambda: later)
    client.get(URL)
    key.refresh_from_db()
    assert key.last_used_at == later


def test_unknown_api_paths_answer_in_the_error_shape(client_key):
    assert_error(client_key.get("/api/v1/no-such-thing"), 404, "not_found")


def test_requests_django_refuses_before_any_view_answer_in_the_error_shape(client_key, settings):
    # A query string over DATA_UPLOAD_MAX_NUMBER_FIELDS, or an unknown Host, was Django's HTML
    # "Bad Request (400)" page.
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 5
    many = "&".join(f"p{i}=1" for i in range(6))
    response = client_key.get(f"{URL}?{many}")
    assert assert_error(response, 400, "too_many_fields")["type"] == "invalid_request_error"
    assert response["Content-Type"] == "application/json"
    assert_error(client_key.get(URL, HTTP_HOST="evil.example"), 400, "invalid_host")
    # Outside the API, Django's own page as before.
    assert client_key.get(f"/dashboard?{many}").status_code == 400
    assert client_key.get(f"/dashboard?{many}")["Content-Type"].startswith("text/html")


def test_a_wrong_method_answers_405_in_the_error_shape(client_key):
    error = assert_error(client_key.delete(URL), 405, "method_not_allowed")
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("scopes", "method", "path", "allow"),
    [
        # A read-only key was told it needed the write scope, which would not have helped.
        (["read"], "put", "/api/v1/reservations", "GET, POST, HEAD, OPTIONS"),
        # A key where only people may act was told to sign in, which would not have helped.
        (["read", "write"], "put", "/api/v1/api-keys", "GET, POST, HEAD, OPTIONS"),
        (
            ["read", "write"],
            "get",
            "/api/v1/organization/invitations/inv_x/revoke",
            "POST, OPTIONS",
        ),
        (["read", "write"], "post", "/api/v1/billing/settings", "PATCH, OPTIONS"),
    ],
)
def test_a_method_the_endpoint_does_not_take_is_405_before_scope_and_role(
    org, scopes, method, path, allow
):
    client = key_client(org, scopes=scopes)
    response = getattr(client, method)(path, {}, format="json")
    assert_error(response, 405, "method_not_allowed")
    assert response["Allow"] == allow
    assert response["X-RateLimit-Remaining"]  # counted like any other request
    assert Reservation.objects.count() == 0


def test_a_method_the_endpoint_takes_is_still_refused_by_scope_and_role(org, owner):
    read_only = key_client(org, scopes=[ApiKeyScope.READ])
    assert_error(read_only.post("/api/v1/quotes", {}, format="json"), 403, "insufficient_scope")
    key = key_client(org)
    assert_error(
        key.post("/api/v1/api-keys", {"name": "x"}, format="json"), 403, "session_required"
    )
    assert ApiKey.objects.count() == 2  # the two test keys, no other


def test_a_form_encoded_body_answers_415_in_the_error_shape(owner):
    client = session_client(owner)
    response = client.post(
        "/api/v1/api-keys", "name=x", content_type="application/x-www-form-urlencoded"
    )
    assert_error(response, 415, "unsupported_media_type")
    assert ApiKey.objects.count() == 0


def test_options_and_the_browsable_api_do_not_break(owner_client):
    assert owner_client.options("/api/v1/reservations").status_code == 200
    response = owner_client.get("/api/v1/reservations", HTTP_ACCEPT="text/html")
    # The browsable renderer is on with DEBUG only: in production HTML is not acceptable.
    assert response.status_code == 406
    assert response["Content-Type"] == "application/json"


@pytest.mark.parametrize(
    "path", ["/api/v1/nope", "/api/v1/agent/jobs/-1/result", "/api/v1/reservations/x/y/z"]
)
def test_an_unknown_api_url_answers_in_the_error_shape_even_with_debug_on(
    api_client, settings, path
):
    settings.DEBUG = True  # handler404 is not used then; the catch-all route answers
    response = api_client.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"]["code"] == "not_found"
    assert path in response.json()["error"]["message"]


def test_a_post_to_an_unknown_api_url_is_a_json_404_not_a_csrf_refusal(settings):
    """As integrators call it: no session, no CSRF token (the test client skips the check)."""
    settings.DEBUG = True
    client = HttpsAPIClient(enforce_csrf_checks=True)
    response = client.post("/api/v1/agent/jobs/null,null/complete", {}, format="json")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
