"""Log lines: JSON with time, level, logger, message and request id; no secret in any of them."""

import io
import json
import logging
from datetime import timedelta

import pytest

from billing.models import BillingAccount
from config.logs import JsonLogFormatter, PlainLogFormatter, redact
from config.request_id import RequestIdLogFilter
from marketplace.models import Role
from tests.billing.conftest import eager_celery, stripe_client  # noqa: F401 (fixture)
from tests.factories import MembershipFactory
from tests.marketplace.api_fixtures import (  # noqa: F401 (fixtures)
    fresh_rate_limits,
    session_client,
)
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow

pytestmark = pytest.mark.django_db


@pytest.fixture
def log_output():
    """Everything every logger writes at DEBUG, formatted as in production."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLogFormatter())
    handler.addFilter(RequestIdLogFilter())
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("", "stripe", "django.db.backends")}
    root.addHandler(handler)
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _lines(stream) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_line_is_one_json_object_with_time_level_logger_message_and_request_id(log_output):
    logging.getLogger("switchyard.test").warning("GPU %s is %s", "gpu7", "hot")

    (line,) = [line for line in _lines(log_output) if line["logger"] == "switchyard.test"]
    assert set(line) == {"time", "level", "logger", "message", "request_id"}
    assert (line["level"], line["message"], line["request_id"]) == (
        "WARNING",
        "GPU gpu7 is hot",
        "-",
    )
    assert line["time"].endswith("+00:00") and "T" in line["time"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Authorization: Bearer sy_live_ab12cd34_Zq9xWv8uT7sR6qP5oN4mL3kJ2",
            "Authorization: Bearer [redacted]",
        ),
        (
            "key sy_live_ab12cd34_Zq9xWv8uT7sR6qP5oN4mL3kJ2 used",
            "key sy_live_ab12cd34_[redacted] used",
        ),
        ("node nt_1a2b3c4d_AbCdEfGhIjKlMnOpQrStUvWx", "node nt_1a2b3c4d_[redacted]"),
        (
            "stripe sk_live_51HxYz and rk_test_9Abc",
            "stripe sk_live_[redacted] and rk_test_[redacted]",
        ),
        ("secret whsec_AbC123", "secret whsec_[redacted]"),
        (
            "seti_1AbC_secret_XyZ987 and pi_9Q_secret_k2",
            "seti_1AbC_secret_[redacted] and pi_9Q_secret_[redacted]",
        ),
        ('{"password": "hunter2", "name": "ok"}', '{"password": "[redacted]", "name": "ok"}'),
        ("token=abc123&next=/x", "token=[redacted]&next=/x"),
        ("Not Found: /invitations/Xy7-abc_def", "Not Found: /invitations/[redacted]"),
        ("GET /password-reset/MQ/c4k9-3f2a1b", "GET /password-reset/MQ/[redacted]"),
        ("card 4242 4242 4242 4242 declined", "card [redacted] declined"),
        ("card 4000-0000-0000-0002", "card [redacted]"),
        ("card 4242424242424242", "card [redacted]"),
    ],
)
def test_secrets_are_redacted(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Our own signing secrets are "whsec_"/"drs_" + token_urlsafe: "-" and "_" inside.
        ("endpoint whsec_a-Zq9xWv8_uT7sR6qP5oN4 rotated", "endpoint whsec_[redacted] rotated"),
        ("zone drs_Q_x-9AbCdEfGhIjKlMnOpQrSt signed", "zone drs_[redacted] signed"),
    ],
)
def test_our_signing_secrets_are_redacted_whole(text, expected):
    assert redact(text) == expected


def test_no_part_of_a_generated_webhook_or_demand_response_secret_reaches_the_logs():
    from marketplace.models.curtailment import _dr_secret
    from marketplace.services.webhooks import _new_secret

    for secret in [_new_secret() for _ in range(50)] + [_dr_secret() for _ in range(50)]:
        prefix, body = secret.split("_", 1)
        line = redact(f"signing with {secret}.")
        assert line == f"signing with {prefix}_[redacted]."
        assert body[-6:] not in line


@pytest.mark.parametrize(
    "text",
    [
        "reservation res_8f3k2 on node 1234567890123 for 117.60 usd",  # not a card (Luhn)
        "at 2026-12-06T10:31:02.118+00:00, 1733480000 s",
        "quote quo_x9 prefix sy_live_ab12cd34",  # the visible prefix alone is not a secret
    ],
)
def test_what_is_not_a_secret_is_left_alone(text):
    assert redact(text) == text


def test_the_plain_format_is_redacted_too():
    formatter = PlainLogFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "key %s", ("whsec_abc",), None)
    assert formatter.format(record) == "INFO key whsec_[redacted]"


def test_an_exceptions_text_is_redacted(log_output):
    try:
        raise ValueError("bad key sy_live_ab12cd34_Zq9xWv8uT7sR6qP5oN4mL3kJ2")
    except ValueError:
        logging.getLogger("switchyard.test").exception("it failed")

    text = log_output.getvalue()
    assert "Zq9xWv8uT7sR6qP5oN4mL3kJ2" not in text
    assert "sy_live_ab12cd34_[redacted]" in text


@pytest.mark.stripe
def test_no_secret_reaches_the_logs_in_a_full_top_up_and_reservation_flow(
    localstripe,
    log_output,
    eager_celery,  # noqa: F811
    django_capture_on_commit_callbacks,
):
    """Everything logged at DEBUG, even Stripe's request and response bodies and every SQL
    statement with its parameters, while an owner saves a card, tops up, mints an API key,
    invites a colleague, and an integrator searches, quotes, reserves, lists, extends and
    cancels with that key."""
    from django.db import connection

    connection.force_debug_cursor = True  # SQL with its parameters, as with DEBUG on
    owner = MembershipFactory(role=Role.OWNER)
    org = owner.organization
    gpu_model = make_rate_card_and_nodes()
    web = session_client(owner)
    try:
        setup = web.post("/api/v1/billing/payment-methods/setup-intent").json()
        confirmed = stripe_client(localstripe).v1.setup_intents.confirm(
            setup["setup_intent_id"], {"payment_method": "pm_card_visa"}
        )
        attached = web.post(
            "/api/v1/billing/payment-methods",
            {"payment_method": confirmed.payment_method, "setup_intent": confirmed.id},
            format="json",
        )
        assert attached.status_code == 201, attached.content
        BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
        with django_capture_on_commit_callbacks(execute=True):
            top_up = web.post("/api/v1/billing/top-ups", {"amount": "500.00"}, format="json")
        assert top_up.status_code == 202, top_up.content
        key = web.post(
            "/api/v1/api-keys", {"name": "ci", "scopes": ["read", "write"]}, format="json"
        ).json()
        invitation = web.post(
            "/api/v1/organization/invitations",
            {"email": "colleague@example.com", "role": "member"},
            format="json",
        ).json()

        api = session_client(owner)
        api.logout()
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {key['secret']}")
        start = tomorrow()
        window = {"start": start.isoformat(), "end": (start + timedelta(hours=2)).isoformat()}
        search = api.get("/api/v1/availability", {"gpu_model": gpu_model.slug, **window})
        quote = api.post(
            "/api/v1/quotes",
            {"gpu_model": gpu_model.slug, "gpu_count": 2, "starts_at": window["start"],
             "ends_at": window["end"]},
            format="json",
        )  # fmt: skip
        assert quote.status_code == 201, quote.content
        created = api.post("/api/v1/reservations", {"quote": quote.json()["id"]}, format="json")
        assert created.status_code == 201, created.content
        reservation = created.json()
        listed = api.get("/api/v1/reservations")
        extended = api.post(
            f"/api/v1/reservations/{reservation['id']}/extend",
            {"ends_at": (start + timedelta(hours=3)).isoformat()},
            format="json",
        )
        cancelled = api.post(f"/api/v1/reservations/{reservation['id']}/cancel")
        api.credentials(HTTP_AUTHORIZATION=f"Bearer {key['secret']}x")  # a wrong key: 401
        refused = api.get("/api/v1/reservations")
    finally:
        connection.force_debug_cursor = False

    statuses = [attached.status_code, top_up.status_code, search.status_code,
                quote.status_code, listed.status_code, extended.status_code,
                cancelled.status_code, refused.status_code]  # fmt: skip
    assert statuses == [201, 202, 200, 201, 200, 200, 200, 401]
    lines = _lines(log_output)
    text = log_output.getvalue()
    # The flow was logged: Stripe's bodies, our SQL, Django's refusal, under request ids.
    assert any(line["logger"] == "stripe" and "API response body" in line["message"]
               for line in lines)  # fmt: skip
    assert any(line["logger"] == "django.db.backends" for line in lines)
    assert any(line["message"] == "Unauthorized: /api/v1/reservations"
               and line["request_id"] == refused["Request-Id"] for line in lines)  # fmt: skip
    secrets = {
        "API key": key["secret"].rsplit("_", 1)[1],
        "SetupIntent client secret": setup["client_secret"].rsplit("_secret_", 1)[1],
        "Stripe secret key": "sk_test_switchyard",
        "webhook secret": "whsec_switchyard_test",
        "invitation token": invitation["token"],
        "card number": "4242424242424242",
    }
    assert [name for name, secret in secrets.items() if secret in text] == []


def make_rate_card_and_nodes():
    from tests.factories import GpuModelFactory, SiteFactory

    gpu_model = GpuModelFactory()
    make_policy()
    make_rate(gpu_model, "2.00")
    make_nodes(SiteFactory(), gpu_model, 1, gpus=8)
    return gpu_model
