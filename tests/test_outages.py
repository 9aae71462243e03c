"""Degrade, don't fail: Redis or PostgreSQL going away is a bounded fail-open or a 503, never
a 500. The services are really stopped: a throwaway redis-server of this test's own, and
PostgreSQL through a closed port (the shared servers other tests use are left alone)."""

import signal
import socket
import subprocess
import threading
import time

import pytest
from django.db import connection

from config.api import throttling
from config.celery import task_send
from marketplace.mail import MAIL_RETRY_ERRORS, mail_send
from marketplace.models import ApiKeyScope, Role
from marketplace.provisioning.kicks import PROVISION_TASK
from marketplace.services.api_keys import api_key_create
from tests.clients import HttpsClient
from tests.factories import MembershipFactory
from tests.provisioning_support import broker_url_for_this_process


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThrowawayRedis:
    def __init__(self):
        self.port = _free_port()
        self.process = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the throwaway redis-server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


@pytest.fixture
def own_redis(settings, monkeypatch):
    server = ThrowawayRedis()
    server.start()
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "LOCATION": f"redis://127.0.0.1:{server.port}/0"}
    }
    monkeypatch.setattr(throttling, "_redis", None)
    monkeypatch.setattr(throttling, "outage", throttling.LimiterOutage())
    yield server
    if server.process.poll() is None:
        server.stop()


@pytest.fixture
def key(db):
    membership = MembershipFactory(role=Role.OWNER)
    _, secret = api_key_create(
        organization=membership.organization, name="k", scopes=[ApiKeyScope.READ], created_by=None
    )
    return HttpsClient(HTTP_AUTHORIZATION=f"Bearer {secret}", raise_request_exception=False)


def test_with_redis_down_the_api_serves_uncounted_for_a_bounded_time_then_503(
    own_redis, key, settings, caplog
):
    settings.RATE_LIMIT_FAIL_OPEN_SECONDS = 300
    first = key.get("/api/v1/organization")
    assert first.status_code == 200
    assert first["X-RateLimit-Remaining"] == str(600 - 1)

    own_redis.stop()
    caplog.set_level("WARNING", logger="config.api.throttling")
    reads = [key.get("/api/v1/organization") for _ in range(3)]

    assert [r.status_code for r in reads] == [200, 200, 200]
    assert all("X-RateLimit-Remaining" not in r for r in reads)  # nothing was counted
    assert throttling.outage.uncounted == 3
    logged = [r.getMessage() for r in caplog.records if r.name == "config.api.throttling"]
    assert len(logged) == 1 and "Redis unreachable" in logged[0]  # once, not per request

    settings.RATE_LIMIT_FAIL_OPEN_SECONDS = 0  # the bound has passed
    refused = key.get("/api/v1/organization")
    assert refused.status_code == 503
    assert refused["Retry-After"] == "10"
    assert refused.json()["error"]["code"] == "rate_limiter_unavailable"
    assert refused.json()["error"]["type"] == "api_error"

    own_redis.start()  # back: counted again, and the outage is over
    again = key.get("/api/v1/organization")
    assert again.status_code == 200
    assert "X-RateLimit-Remaining" in again
    assert throttling.outage.since is None


def test_with_redis_down_people_can_still_sign_in(own_redis, db, django_user_model):
    django_user_model.objects.create_user(username="ada", password="a-long-passphrase-1")
    own_redis.stop()
    client = HttpsClient(raise_request_exception=False)

    response = client.post("/login", {"username": "ada", "password": "a-long-passphrase-1"})

    assert response.status_code == 302
    assert throttling.outage.uncounted == 2  # the account's window and the address's


@pytest.fixture
def postgres_down(transactional_db):
    """Every new connection goes to a closed port, as if PostgreSQL had stopped."""
    real_port = connection.settings_dict["PORT"]

    def stop():
        connection.close()
        connection.settings_dict["PORT"] = str(_free_port())

    yield stop
    connection.close()
    connection.settings_dict["PORT"] = real_port


@pytest.mark.parametrize("path", ["/api/v1/organization", "/api/v1/reservations", "/dashboard"])
def test_with_postgresql_down_requests_get_503_with_retry_after(postgres_down, path):
    membership = MembershipFactory(role=Role.OWNER)
    client = HttpsClient(raise_request_exception=False)
    client.force_login(membership.user)
    postgres_down()

    response = client.get(path)

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    if path.startswith("/api/"):
        assert response.json()["error"] == {
            "type": "api_error",
            "code": "service_unavailable",
            "field": None,
            "message": "The service is briefly unavailable; retry after the time in Retry-After.",
        }
    else:
        assert b"Briefly unavailable" in response.content


def test_with_postgresql_down_an_api_key_call_gets_503(postgres_down):
    membership = MembershipFactory(role=Role.OWNER)
    _, secret = api_key_create(
        organization=membership.organization, name="k", scopes=[ApiKeyScope.READ], created_by=None
    )
    postgres_down()

    response = HttpsClient(raise_request_exception=False).get(
        "/api/v1/organization", HTTP_AUTHORIZATION=f"Bearer {secret}"
    )

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"


def test_the_limiter_follows_the_cache_when_its_location_changes(settings, monkeypatch):
    # The limiter's own Redis client was made for one location; when the cache moves (a
    # fixture pointing it at a throwaway server, then back), it must count on the new one, not
    # keep calling a server that is gone (every request would then pass uncounted, then 503).
    monkeypatch.setattr(throttling, "outage", throttling.LimiterOutage())
    now = time.time()
    assert throttling.fixed_window_count("follow", period=60, now=now) is not None
    shared = settings.CACHES["default"]

    server = ThrowawayRedis()
    server.start()
    settings.CACHES = {"default": {**shared, "LOCATION": f"redis://127.0.0.1:{server.port}/0"}}
    assert throttling.fixed_window_count("follow", period=60, now=now)[0] == 1  # its own count
    server.stop()
    settings.CACHES = {"default": shared}

    assert throttling.fixed_window_count("follow", period=60, now=now) is not None
    assert throttling.outage.since is None  # the shared Redis answered: no outage


# --- Redis that hangs: stopped (SIGSTOP), or cut off without a reset -------------------------
# The kernel still completes the TCP handshake and takes what is sent; nothing ever answers.
# A caller must give up within seconds, as with a Redis that refuses connections: the cache
# has redis-py's own socket timeout, the broker (kombu passes None) the one config/celery.py sets.

HUNG_REDIS_BOUND_SECONDS = 10


@pytest.fixture
def hung_redis():
    server = ThrowawayRedis()
    server.start()
    server.process.send_signal(signal.SIGSTOP)
    yield server
    server.process.send_signal(signal.SIGCONT)  # lets a caller still waiting on it finish
    server.stop()


def _finishes_within(seconds: float, call):
    """(True, its result) if `call` returned within `seconds`, else (False, None)."""
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", call()), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), outcome.get("result")


def test_with_redis_hung_sending_a_task_gives_up_within_seconds(hung_redis, caplog):
    caplog.set_level("WARNING", logger="config.celery")
    with broker_url_for_this_process(f"redis://127.0.0.1:{hung_redis.port}/0"):
        finished, sent = _finishes_within(
            HUNG_REDIS_BOUND_SECONDS,
            lambda: task_send(PROVISION_TASK, [1], about="reservation 1", then="(swept)"),
        )

    assert finished, "a publish to a hung broker must not wait for ever"
    assert sent is False
    assert any(m.startswith(f"could not enqueue {PROVISION_TASK}") for m in caplog.messages)


def test_with_the_mail_server_hung_a_send_gives_up_and_is_left_to_the_retries(settings):
    # A mail server that accepts the connection and never greets (hung, or a firewall that
    # swallows the session): the kernel completes the handshake on the listening socket.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", hung.getsockname()[1]
    settings.EMAIL_USE_TLS = False

    def send():
        try:
            mail_send("Hi", "Body", ["a@example.com"])  # one try, as a worker runs it
        except MAIL_RETRY_ERRORS as exc:
            return exc

    try:
        finished, raised = _finishes_within(30, send)
    finally:
        hung.close()  # resets the waiting connection: a send still waiting ends

    assert finished, "a send to a mail server that never answers must not wait for ever"
    assert isinstance(raised, MAIL_RETRY_ERRORS)  # so the outbox tries it again
    assert "timed out" in str(raised)
