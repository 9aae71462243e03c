"""No input gives a 500: every route in the URL conf, with values PostgreSQL refuses.

The routes are generated from the URL conf, so a new route is covered without editing this
test. Each gets a NUL in its path parameters, in its query string, in a form body and in a JSON
body, an unpaired surrogate in JSON, and JSON nested 50,000 deep, as a signed-in superuser who
owns an organisation (so the portal, the admin and the API all let the request through to the
view) and, on the site agent's routes, with a valid node token.
"""

import json
import re

import pytest
from django.test import RequestFactory
from django.urls import URLResolver, get_resolver

from inventory.services import node_token_issue
from marketplace.models import Role
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, NodeFactory, UserFactory
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_rate_limits")]

NUL = "x\x00y"
_PARAM = re.compile(r"<(?:(?P<converter>\w+):)?(?P<name>\w+)>")
_GROUP = re.compile(r"\(\?P<\w+>[^)]*\)")
QUERY_NAMES = [
    "cursor",
    "limit",
    "status",
    "tier",
    "site",
    "gpu_model",
    "updated_after",
    "page",
    "q",
]
# Plausible field names, so a JSON body reaches what views read, not only unknown keys.
FIELDS = [
    "name", "label", "email", "role", "scopes", "public_key", "payment_method", "gpu_model",
    "site", "quote", "quote_id", "starts_at", "ends_at", "detail", "message", "error",
    "reason", "amount", "hostname", "lease", "lease_id", "status", "connection", "username",
    "password", "organization",
]  # fmt: skip


def _route_templates(patterns=None, prefix=""):
    for p in get_resolver().url_patterns if patterns is None else patterns:
        pattern = str(p.pattern).lstrip("^").replace("$", "")
        if isinstance(p, URLResolver):
            yield from _route_templates(p.url_patterns, prefix + pattern)
        else:
            yield prefix + pattern


ROUTES = sorted(set(_route_templates()))


def _path(template: str, value: str) -> str:
    def fill(match):
        return "1" if match.group("converter") == "int" else value

    path = "/" + _GROUP.sub(value, _PARAM.sub(fill, template))
    if value == NUL and NUL not in path:
        path += NUL  # a route without parameters: the NUL goes at its end
    return path


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.fixture
def clients():
    user = UserFactory(is_staff=True, is_superuser=True)
    MembershipFactory(user=user, role=Role.OWNER)
    session = HttpsClient(raise_request_exception=False)
    session.force_login(user)
    _token, secret = node_token_issue(node=NodeFactory(), label="walker")
    agent = HttpsClient(raise_request_exception=False, HTTP_AUTHORIZATION=f"Bearer {secret}")
    return session, agent


def _requests(template: str):
    """(method, path, query, content type, body) for every bad input on this route."""
    plain = _path(template, "abc")
    body = {name: NUL for name in FIELDS}
    yield "GET", _path(template, NUL), {}, None, None
    yield "POST", _path(template, NUL), {}, None, None
    yield "GET", plain, {name: NUL for name in QUERY_NAMES}, None, None
    yield "POST", plain, {}, "application/x-www-form-urlencoded", body
    yield "POST", plain, {}, "multipart/form-data", body
    for method in ("POST", "PATCH", "PUT"):
        yield method, plain, {}, "application/json", json.dumps(body)
    yield "POST", plain, {}, "application/json", json.dumps({"name": "\ud800", "workload": {}})
    yield "POST", plain, {}, "application/json", _nested(50_000)
    yield "POST", plain, {}, "application/json", '{"workload": ' + _nested(40) + "}"


@pytest.mark.parametrize("template", ROUTES)
def test_no_route_answers_500_to_input_postgresql_refuses(template, clients):
    session, agent = clients
    client = agent if template.startswith("api/v1/agent/") else session
    for method, path, query, content_type, body in _requests(template):
        if content_type == "multipart/form-data":
            response = client.post(path, body)
        elif content_type == "application/x-www-form-urlencoded":
            response = client.generic(method, path, _encode(body), content_type=content_type)
        elif body is not None:
            response = client.generic(method, path, body, content_type=content_type)
        else:
            response = client.generic(method, path, QUERY_STRING=_encode(query))
        what = f"{method} {path!r} ?{_encode(query)} {str(body)[:80]!r}"
        assert response.status_code in (400, 404), f"{what}: {response.status_code}"
        if path.startswith("/api/"):
            error = response.json()["error"]
            assert set(error) >= {"type", "code", "field", "message"}, what
            assert error["type"] in ("invalid_request_error", "not_found_error"), what


def _encode(query: dict) -> str:
    from urllib.parse import urlencode

    return urlencode(query)


def test_every_kind_of_route_is_walked():
    # The walk reads the URL conf; these stand for the API, agent, portal, billing and admin.
    for expected in (
        "api/v1/reservations/<str:reservation_id>",
        "api/v1/agent/jobs/<int:job_id>/progress",
        "reservations/<str:public_id>",
        "billing/payment-methods/<str:payment_method_id>/default",
        "admin/(?P<url>.*)",
    ):
        assert expected in ROUTES
    assert len(ROUTES) > 100


def test_the_refusals_name_what_was_wrong(clients):
    session, _agent = clients

    def error(response):
        assert response.status_code == 400
        return response.json()["error"]

    assert error(session.get("/api/v1/reservations/%00")) == {
        "type": "invalid_request_error",
        "code": "invalid_characters",
        "field": None,
        "message": "The URL contains a NUL or an invalid character.",
    }
    assert error(session.get("/api/v1/reservations?cursor=%00"))["code"] == "invalid_cursor"
    assert error(session.get("/api/v1/reservations?cursor=%00"))["field"] == "cursor"
    assert error(session.get("/api/v1/reservations?cursor=garbage"))["code"] == "invalid_cursor"
    nested = error(session.post("/api/v1/quotes", _nested(50_000), content_type="application/json"))
    assert nested["code"] == "too_deeply_nested"
    bad = error(
        session.post(
            "/api/v1/ssh-keys",
            {"name": "laptop", "public_key": "ssh-ed25519 AAAA\x00"},
            content_type="application/json",
        )
    )
    assert (bad["code"], bad["field"]) == ("invalid_characters", "public_key")
    page = session.get("/reservations/%00")
    assert page.status_code == 400
    assert b"<h1>Bad request</h1>" in page.content


@pytest.mark.parametrize("content_type", ["*/*", "application/*", "*/json"])
def test_a_body_typed_by_a_pattern_is_refused_not_read_as_json_past_the_checks(
    clients, content_type
):
    """DRF reads */* as JSON: such a body would skip the guard (NUL, depth) and reach a 500."""
    session, agent = clients
    nested = session.generic("POST", "/api/v1/quotes", _nested(50_000), content_type=content_type)
    nul = agent.generic(
        "POST", "/api/v1/agent/heartbeat", '{"agent_version": "x\u0000y"}',
        content_type=content_type,
    )  # fmt: skip
    for response in (nested, nul):
        assert response.status_code == 415
        assert response.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        ('{"name": "ok", "n": [1, 2, {"a": "\\u00e9"}]}', None),
        ('{"name": "x\\u0000y"}', "invalid_characters"),
        ('{"name": "x\\uD800"}', "invalid_characters"),
        ('{"name": "x\\udfff"}', "invalid_characters"),
        ('{"name": "\\ud83d\\ude00"}', None),  # a surrogate pair: one emoji, storable
        ('{"name": "a\\\\u0000"}', None),  # an escaped backslash, then the text u0000
        ('{"w": ' + "[" * 33 + "]" * 33 + "}", "too_deeply_nested"),
        ('{"w": "' + "[" * 40 + '"}', None),  # brackets inside a string nest nothing
    ],
)
def test_json_bodies_are_refused_exactly_when_postgresql_would_refuse_them(body, refused):
    from config.input_guard import _check_json, _Refused

    for encoding in ("utf-8", "utf-16", "utf-32"):  # json.loads reads all three
        raw = body.encode(encoding)
        if refused is None:
            _check_json(raw)
        else:
            with pytest.raises(_Refused) as caught:
                _check_json(raw)
            assert caught.value.code == refused, (body, encoding)


def test_a_plain_body_is_let_through_without_parsing():
    from config.input_guard import MAX_JSON_DEPTH, _plainly_fine

    heartbeat = json.dumps({"gpus": [{"index": i, "temp_c": 61.5} for i in range(8)]})
    assert _plainly_fine(heartbeat.encode())
    assert not _plainly_fine(heartbeat.encode("utf-16"))  # NUL bytes: parsed and walked
    assert not _plainly_fine(b'{"a": "\\u0000"}')
    assert not _plainly_fine(("[" * (MAX_JSON_DEPTH + 1)).encode())


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", ""])
def test_a_body_over_the_size_limit_is_413_on_every_route_whatever_its_type(
    clients, settings, content_type
):
    """Said from its Content-Length before any view reads it: the Stripe webhook, which reads
    its body for the signature, answered a text/plain one with Django's bare 400 page."""
    session, agent = clients
    raw = b"x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)
    for template in ROUTES:
        client = agent if template.startswith("api/v1/agent/") else session
        path = _path(template, "abc")
        response = client.generic("POST", path, raw, content_type=content_type)
        assert response.status_code == 413, f"POST {path}: {response.status_code}"
        if path.startswith("/api/"):
            assert response.json()["error"]["code"] == "request_too_large", path
    webhook = session.generic("POST", "/api/v1/webhooks/stripe", raw, content_type=content_type)
    assert webhook.json()["error"] == {
        "type": "invalid_request_error",
        "code": "request_too_large",
        "field": None,
        "message": f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.",
    }


def test_a_body_at_the_size_limit_still_reaches_the_view(clients, settings):
    session, _agent = clients
    raw = b"x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    response = session.generic("POST", "/api/v1/webhooks/stripe", raw, content_type="text/plain")
    assert response.json()["error"]["code"] == "invalid_signature"


def test_a_forged_admin_action_selection_is_a_bad_request_on_every_list(clients):
    """Django's admin filters an action's selection by pk without checking it: "abc" or
    "1.5" was a 500 on every changelist with an action (a browser never sends them)."""
    from django.contrib import admin

    session, _agent = clients
    walked = 0
    for model, model_admin in admin.site._registry.items():
        request = RequestFactory().get("/")
        request.user = _user(session)
        actions = list(model_admin.get_actions(request))
        if not actions:
            continue
        url = f"/admin/{model._meta.app_label}/{model._meta.model_name}/"
        for forged in ("abc", "1.5"):
            response = session.post(
                url, {"action": actions[0], "_selected_action": [forged], "index": 0}
            )
            assert response.status_code in (302, 400), f"{url} {forged}: {response.status_code}"
            if response.status_code == 400:
                assert b"<h1>Bad request</h1>" in response.content
        walked += 1
    assert walked > 10


def _user(session):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.get(pk=session.session["_auth_user_id"])
