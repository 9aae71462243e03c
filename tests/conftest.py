import os
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connections

from config.env import env_bool
from tests.clients import BehindTlsProxy, HttpsAPIClient, HttpsClient
from tests.status_writes import status_write_guard


def pytest_configure(config):
    """The suite runs with production settings, in the environment scripts/test.py gives it
    (docs/development.md); a test that needs another setting overrides it itself."""
    how = "run the suite with `make test` or `python scripts/test.py [pytest args]`"
    if env_bool("DEBUG", False):
        pytest.exit(f"The test suite runs with production settings, not DEBUG: {how}.", 4)
    if not (Path(settings.STATIC_ROOT) / "staticfiles.json").exists():
        pytest.exit(f"No collected static files in STATIC_ROOT ({settings.STATIC_ROOT}): {how}.", 4)


@pytest.fixture(autouse=True, scope="session")
def _static_root_scanned_once():
    """whitenoise's middleware lists STATIC_ROOT (1,700 files with their compressed copies,
    0.1–0.4 s) when it is built: once per process in production, but once per test client
    here, since each client builds its own middleware. The session lists it once and gives
    each new middleware the same files."""
    from whitenoise.middleware import WhiteNoiseMiddleware

    scan = WhiteNoiseMiddleware.update_files_dictionary
    scanned = {}

    def update_files_dictionary(self, root, prefix):
        if (root, prefix) not in scanned:
            before = set(self.files)
            scan(self, root, prefix)
            scanned[root, prefix] = {url: self.files[url] for url in self.files.keys() - before}
        self.files.update(scanned[root, prefix])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(WhiteNoiseMiddleware, "update_files_dictionary", update_files_dictionary)
        yield


@pytest.fixture
def client() -> HttpsClient:
    """pytest-django's client, through the TLS proxy (tests/clients.py)."""
    return HttpsClient()


@pytest.fixture
def admin_client(db, admin_user) -> HttpsClient:
    """pytest-django's admin_client, through the TLS proxy."""
    client = HttpsClient()
    client.force_login(admin_user)
    return client


@pytest.fixture
def api_client() -> HttpsAPIClient:
    return HttpsAPIClient()


@pytest.fixture(scope="session")
def live_server(request):
    """pytest-django's live server, behind the TLS proxy (tests/clients.py), with static files
    served by whitenoise from STATIC_ROOT as in production (not by Django's finders)."""
    from pytest_django.live_server_helper import LiveServer

    address = (
        request.config.getvalue("liveserver")
        or os.getenv("DJANGO_LIVE_TEST_SERVER_ADDRESS")
        or "localhost"
    )
    server = LiveServer(address, start=False)
    server.thread.static_handler = BehindTlsProxy
    server.start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _one_writer_of_reservation_status():
    # See tests/status_writes.py: a status written outside the transition service fails.
    with connections["default"].execute_wrapper(status_write_guard):
        yield


@pytest.fixture(autouse=True)
def mail_task_runs_eagerly(monkeypatch):
    """E-mail is recorded in the mail outbox and sent by a Celery task after commit
    (marketplace.mail); here that task runs eagerly in the process that queues it (one
    attempt; a retry waits for the sweeper), so tests read mail.outbox.
    tests/marketplace/test_mail.py checks the queueing itself."""
    from marketplace.mail import mail_outbox_send

    monkeypatch.setattr(
        mail_outbox_send,
        "apply_async",
        lambda args=None, kwargs=None, **options: mail_outbox_send.apply(args, kwargs),
    )


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    # Factories and the demo seed hash passwords; PBKDF2's cost (~0.5 s a user here) is not
    # what any test tests.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


# --- localstripe (billing) -----------------------------------------------------------------
# A real localstripe server for the session, bound to 127.0.0.1 on a free port, started the
# one way localstripe is started everywhere (scripts/localstripe_server.py, as make run does):
# its store in a private file so parallel runs do not collide, and a restart (stop() then
# start()) reloads it, which is what the outbox-replay test needs.
_LOCALSTRIPE_SERVER = Path(__file__).resolve().parent.parent / "scripts" / "localstripe_server.py"


class LocalStripe:
    def __init__(self, directory):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.store_path = str(directory / "localstripe.pickle")
        self.directory = directory
        self.process = None

    def start(self) -> None:
        import os
        import subprocess
        import sys
        import time

        import requests

        env = {**os.environ, "TMPDIR": str(self.directory)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(_LOCALSTRIPE_SERVER),
                "--port",
                str(self.port),
                "--state",
                self.store_path,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.url}/js.stripe.com/v3/", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("localstripe did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def clear(self) -> None:
        import requests

        requests.delete(f"{self.url}/_config/data", timeout=5).raise_for_status()

    def register_webhook(self, *, url: str, secret: str, events: list[str] | None = None) -> None:
        import requests

        data = {"url": url, "secret": secret}
        if events:
            data["events[]"] = events
        requests.post(f"{self.url}/_config/webhooks/sy", data=data, timeout=5).raise_for_status()


@pytest.fixture(scope="session")
def localstripe_server(tmp_path_factory):
    server = LocalStripe(tmp_path_factory.mktemp("localstripe"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def localstripe(localstripe_server, settings):
    """An empty localstripe with the Stripe settings pointing at it."""
    if localstripe_server.process is None:
        localstripe_server.start()
    localstripe_server.clear()
    settings.STRIPE_SECRET_KEY = "sk_test_switchyard"
    settings.STRIPE_PUBLISHABLE_KEY = "pk_test_switchyard"
    settings.STRIPE_API_BASE = localstripe_server.url
    settings.STRIPE_WEBHOOK_SECRET = "whsec_switchyard_test"
    return localstripe_server


@pytest.fixture(autouse=True)
def _empty_reference_cache():
    """GPU models, sites, rate cards and the pricing policy are cached per process for a few
    seconds (marketplace.selectors.reference), the fleet's heartbeat interval for a minute
    (inventory.selectors); each test starts without rows from another."""
    from inventory.selectors import agent_heartbeat_seconds_clear
    from marketplace.selectors.reference import reference_cache_clear

    reference_cache_clear()
    agent_heartbeat_seconds_clear()
    yield
    reference_cache_clear()
    agent_heartbeat_seconds_clear()


@pytest.fixture(autouse=True)
def _no_failed_authentications():
    """Failed authentications are limited per client address (AUTH_FAILURE_RATE), and every
    test client is 127.0.0.1: each test starts with none counted, nor remembered by the
    process (config.api.throttling.AuthFailureLimit)."""
    import redis

    from config.api import throttling

    throttling.auth_failures.forget()
    try:
        client = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
        with client:
            # And the sign-up mails counted per e-mail address: tests sign up the same few.
            keys = [
                key
                for pattern in ("*ratelimit:authfail:*", "*ratelimit:signin:signup-mail:*")
                for key in client.scan_iter(match=pattern, count=1000)
            ]
            if keys:
                client.delete(*keys)
    except (redis.RedisError, OSError):
        pass  # no Redis here: the tests that need it say so
    yield


@pytest.fixture(autouse=True, scope="session")
def _empty_heartbeat_buffers():
    """Heartbeats and telemetry wait in Redis for a flush (inventory.heartbeats); entries an
    earlier session left name node ids this session's fresh database may reuse."""
    import redis

    from inventory import heartbeats, telemetry
    from inventory.auth import AGENT_INSTANCE_KEY
    from marketplace.provisioning.agent_reports import REPORTED_KEY

    keys = [
        heartbeats.LAST_SEEN_KEY,
        heartbeats.TOKEN_USED_KEY,
        telemetry.BUFFER_KEY,
        REPORTED_KEY,
    ]
    try:
        client = telemetry.buffer_client()
        client.delete(*keys)
        # The agent ids holding nodes (inventory.auth): an earlier session's agent for node 1
        # refused this session's (409 agent_conflict) for 90 s.
        held = list(client.scan_iter(match=AGENT_INSTANCE_KEY.format(node_id="*"), count=1000))
        if held:
            client.delete(*held)
    except (redis.RedisError, OSError):
        pass  # no Redis here: the tests that need it say so
    yield
