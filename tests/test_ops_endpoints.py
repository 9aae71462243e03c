"""/healthz, /readyz and /metrics: what a load balancer, an orchestrator and Prometheus see."""

import re
import socket
import time
import uuid
from datetime import timedelta

import psycopg
import pytest
import redis
import yaml
from django.db import connection, transaction
from django.test import Client
from django.utils import timezone

from billing.models import BillingAccount, FundingState, OutboxMessage
from config import health
from config.celery import QUEUES
from config.env import env_database, env_int
from config.metrics import business
from marketplace.models import MailMessage
from tests.clients import HttpsClient
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create

pytestmark = pytest.mark.django_db

TOKEN = "t" * 40


@pytest.fixture
def production(settings):
    # A deployment's front: only the public name is allowed (plain HTTP is redirected anyway).
    settings.ALLOWED_HOSTS = ["switchyard.example.com"]
    settings.METRICS_TOKEN = TOKEN
    settings.METRICS_ALLOWED_IPS = []
    return settings


def _probe(path, **extra):
    # A load balancer probes a backend by address, over plain HTTP (not through the TLS
    # proxy), without credentials.
    return Client().get(path, HTTP_HOST="10.0.3.7:8000", REMOTE_ADDR="10.0.0.2", **extra)


def test_healthz_answers_200_behind_a_load_balancer(production):
    response = _probe("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert response["Cache-Control"] == "no-store"
    assert response["Request-Id"].startswith("req_")


def test_the_same_request_to_an_ordinary_page_is_refused_or_redirected(production):
    # What the probes are exempt from: the address is not an allowed host.
    assert _probe("/api/v1/sites").status_code == 400
    production.ALLOWED_HOSTS = ["10.0.3.7"]
    assert _probe("/api/v1/sites").status_code == 301  # plain HTTP → HTTPS


def test_readyz_answers_200_naming_each_part_when_all_answer(production):
    response = _probe("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"database": "ok", "redis": "ok", "migrations": "ok"}


def test_readyz_answers_503_naming_redis_when_it_does_not_answer(production):
    production.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1

    response = _probe("/readyz")

    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["checks"] == {
        "database": "ok",
        "redis": "unavailable (ConnectionError)",
        "migrations": "ok",
    }


def test_readyz_answers_503_naming_the_migrations_that_are_not_applied(production):
    with connection.cursor() as cursor:  # rolled back with the test
        cursor.execute(
            "DELETE FROM django_migrations WHERE app = 'billing' AND name = '0001_initial'"
        )

    response = _probe("/readyz")

    assert response.status_code == 503
    assert response.json()["checks"] == {
        "database": "ok",
        "redis": "ok",
        "migrations": "1 unapplied: billing.0001_initial",
    }
    assert _probe("/healthz").status_code == 200  # liveness does not depend on it


@pytest.mark.django_db(transaction=True)
def test_readyz_answers_503_naming_the_database_when_it_does_not_answer(production):
    real_port = connection.settings_dict["PORT"]
    connection.close()
    connection.settings_dict["PORT"] = "1"
    try:
        response = _probe("/readyz")
    finally:
        connection.close()
        connection.settings_dict["PORT"] = real_port

    assert response.status_code == 503
    assert response.json()["checks"] == {
        "database": "unavailable (OperationalError)",
        "redis": "ok",
        "migrations": "unknown",
    }


@pytest.mark.django_db(transaction=True)
def test_readyz_fails_fast_when_the_database_accepts_connections_and_then_hangs(production):
    # A listener that accepts TCP and never answers, as a wedged server or a dead NAT path does:
    # without a connect timeout the probe (and every request) would wait for ever.
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    real = {key: connection.settings_dict[key] for key in ("HOST", "PORT")}
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=str(hung.getsockname()[1]))
    connection.settings_dict["OPTIONS"]["connect_timeout"] = 1
    try:
        started = time.monotonic()
        response = _probe("/readyz")
        elapsed = time.monotonic() - started
    finally:
        connection.close()
        connection.settings_dict.update(real)
        connection.settings_dict["OPTIONS"]["connect_timeout"] = 5
        hung.close()

    assert response.status_code == 503
    assert response.json()["checks"]["database"] == "unavailable (OperationalError)"
    assert elapsed < 4


@pytest.fixture
def table_locked():
    """Lock a table from another session, as a migration's ALTER TABLE does while it runs:
    every read of it waits until the lock goes."""
    sessions = []

    def lock(table: str) -> None:
        session = psycopg.connect(
            **{k: v for k, v in connection.get_connection_params().items() if k != "context"}
        )
        session.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        sessions.append(session)

    yield lock
    for session in sessions:
        session.rollback()
        session.close()


def test_readyz_fails_in_time_when_a_query_waits_for_a_lock(production, table_locked):
    table_locked("django_migrations")

    started = time.monotonic()
    response = _probe("/readyz")
    elapsed = time.monotonic() - started

    assert response.status_code == 503
    assert response.json()["checks"] == {
        "database": "ok",
        "redis": "ok",
        "migrations": "unknown (OperationalError)",
    }
    assert 1.5 < elapsed < 4  # the probe's 2 s, not the lock's holder's time


def test_the_probes_timeout_does_not_outlive_its_reads():
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = '7s'")
        with health.bounded_cursor(2) as bounded:
            bounded.execute("SHOW statement_timeout")
            assert bounded.fetchone() == ("2s",)
        cursor.execute("SHOW statement_timeout")
        assert cursor.fetchone() == ("7s",)


def test_the_database_connect_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("DATABASE_CONNECT_TIMEOUT", "7")
    assert env_database("DATABASE_URL", "postgres://u@h:5432/d", connect_timeout=env_int(
        "DATABASE_CONNECT_TIMEOUT", 5, minimum=1))["OPTIONS"]["connect_timeout"] == 7  # fmt: skip
    assert connection.settings_dict["OPTIONS"]["connect_timeout"] == 5  # the default


def test_the_probes_are_only_for_get_and_head(production):
    production.ALLOWED_HOSTS = ["10.0.3.7"]
    production.SECURE_SSL_REDIRECT = False
    assert Client().head("/healthz", HTTP_HOST="10.0.3.7").status_code == 200
    assert Client().post("/healthz", HTTP_HOST="10.0.3.7").status_code != 200


def test_readiness_reads_the_migration_graph_once_per_process(
    production, django_assert_num_queries
):
    health.readiness()
    # The timeout, the applied migrations; inside the test's transaction also its savepoint,
    # the caller's timeout put back and the release.
    with django_assert_num_queries(5):
        assert health.readiness()[0] is True


# --- /metrics --------------------------------------------------------------------------------


def _metrics(**extra):
    # Prometheus scrapes each backend directly, over plain HTTP.
    return Client().get("/metrics", HTTP_HOST="10.0.3.7:8000", **extra)


def _samples(text: str, name: str) -> dict[str, float]:
    """{'label="value",…': value} for every sample of `name`."""
    found = {}
    for labels, value in re.findall(rf"^{name}(?:{{(.*)}})? (\S+)$", text, re.M):
        found[labels] = float(value)
    return found


def test_metrics_are_refused_without_the_token_or_an_allowed_address(production):
    assert _metrics(REMOTE_ADDR="10.0.0.2").status_code == 403
    wrong = _metrics(REMOTE_ADDR="10.0.0.2", HTTP_AUTHORIZATION="Bearer " + "x" * 40)
    assert wrong.status_code == 403
    assert b"switchyard_" not in wrong.content


def test_metrics_answer_the_token_or_an_allowed_network(production):
    by_token = _metrics(REMOTE_ADDR="10.0.0.2", HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    production.METRICS_ALLOWED_IPS = ["10.0.0.0/24"]
    by_address = _metrics(REMOTE_ADDR="10.0.0.2")

    for response in (by_token, by_address):
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/plain; version=")
        assert b"switchyard_business_metrics_up 1.0" in response.content
    assert _metrics(REMOTE_ADDR="10.0.1.2").status_code == 403


@pytest.mark.parametrize(
    "forwarded",
    [
        {"HTTP_X_FORWARDED_FOR": "203.0.113.9"},
        {"HTTP_FORWARDED": "for=203.0.113.9;proto=https"},
        {"HTTP_X_REAL_IP": "203.0.113.9"},
    ],
)
def test_metrics_are_refused_to_a_client_behind_an_untrusted_proxy_in_the_allowed_network(
    production, forwarded
):
    # The public proxy (10.0.0.2) is inside the network Prometheus scrapes from, and
    # TRUSTED_PROXIES is not set: the connection's address is the proxy's, not the client's.
    production.METRICS_ALLOWED_IPS = ["10.0.0.0/24"]
    production.TRUSTED_PROXIES = 0

    refused = _metrics(REMOTE_ADDR="10.0.0.2", **forwarded)
    by_token = _metrics(REMOTE_ADDR="10.0.0.2", HTTP_AUTHORIZATION=f"Bearer {TOKEN}", **forwarded)

    assert refused.status_code == 403
    assert b"switchyard_" not in refused.content
    assert by_token.status_code == 200
    assert _metrics(REMOTE_ADDR="10.0.0.2").status_code == 200  # Prometheus, scraping directly


def test_metrics_read_the_client_through_trusted_proxies(production):
    production.METRICS_ALLOWED_IPS = ["10.0.0.0/24"]
    production.TRUSTED_PROXIES = 1

    public = _metrics(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="10.0.0.9, 203.0.113.9")
    internal = _metrics(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="10.0.0.7")

    assert [public.status_code, internal.status_code] == [403, 200]


def test_metrics_count_requests_by_view_and_status(production):
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]
    name = "django_http_responses_total_by_status_view_method_total"
    before = _samples(_metrics(REMOTE_ADDR="10.0.0.2").content.decode(), name)
    HttpsClient().get("/api/v1/sites", HTTP_HOST="switchyard.example.com")
    HttpsClient().get("/api/v1/sites", HTTP_HOST="switchyard.example.com")

    after = _samples(_metrics(REMOTE_ADDR="10.0.0.2").content.decode(), name)

    key = next(k for k in after if 'status="401"' in k and "sites" in k)
    assert after[key] - before.get(key, 0) == 2
    text = _metrics(REMOTE_ADDR="10.0.0.2").content.decode()
    assert "django_http_requests_latency_seconds_by_view_method_bucket" in text
    assert re.search(
        r'^django_db_execute_total\{alias="default",vendor="postgresql"\} ', text, re.M
    )


def test_metrics_time_each_view_and_bound_the_method_label(production):
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]
    latency = "django_http_requests_latency_seconds_by_view_method_count"
    responses = "django_http_responses_total_by_status_view_method_total"
    before = _metrics(REMOTE_ADDR="10.0.0.2").content.decode()
    client = HttpsClient()
    for _ in range(3):
        client.get("/api/v1/gpu-models", HTTP_HOST="switchyard.example.com")
    client.generic("BREW", "/api/v1/gpu-models", HTTP_HOST="switchyard.example.com")

    after = _metrics(REMOTE_ADDR="10.0.0.2").content.decode()
    timed_before, answered_before = _samples(before, latency), _samples(before, responses)
    counted = {
        k: v - timed_before.get(k, 0)
        for k, v in _samples(after, latency).items()
        if v != timed_before.get(k, 0)
    }
    assert counted == {
        'method="GET",view="gpu-models"': 3,
        'method="<invalid method>",view="gpu-models"': 1,
    }
    brewed = {
        k: v - answered_before.get(k, 0)
        for k, v in _samples(after, responses).items()
        if "invalid" in k and v != answered_before.get(k, 0)
    }
    # A method no endpoint takes is 405 before anything else is asked of the caller.
    assert brewed == {'method="<invalid method>",status="405",view="gpu-models"': 1}
    # The library's other per-request series are not recorded (config/metrics/http.py).
    assert "django_http_requests_total_by_method_total{" not in after
    body_sizes = "django_http_responses_body_total_bytes_count"
    assert _samples(after, body_sizes) == _samples(before, body_sizes)


def test_business_metrics_report_reservations_gpus_funding_and_the_outbox(
    production,
    allow_all_funding,  # noqa: F811
):
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]
    market = market_create(nodes=1, gpus=4)
    market.book(gpu_count=3)  # starts now: due, not started yet
    market.book(gpu_count=1, starts_at=timezone.now() + timedelta(days=1))
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, funding_state=FundingState.GRACE)
    OutboxMessage.objects.create(
        kind="meter_event",
        payload={},
        idempotency_key="k1",
        next_attempt_at=timezone.now(),
    )
    OutboxMessage.objects.filter(idempotency_key="k1").update(
        created_at=timezone.now() - timedelta(minutes=10)
    )
    MailMessage.objects.create(
        task="marketplace.mail.mail_send", args=[], next_attempt_at=timezone.now(), status="failed"
    )

    text = _metrics(REMOTE_ADDR="10.0.0.2").content.decode()

    assert _samples(text, "switchyard_reservations") == {
        'status="pending"': 1.0,
        'status="scheduled"': 1.0,
    }
    assert _samples(text, "switchyard_reservations_due_not_started") == {"": 1.0}
    site = market.site.slug
    assert _samples(text, "switchyard_gpus") == {
        f'health="ok",node_status="available",site="{site}"': 4.0
    }
    assert _samples(text, "switchyard_gpus_allocated") == {f'site="{site}"': 3.0}
    assert (
        _samples(text, "switchyard_billing_accounts_by_funding_state")['funding_state="grace"'] == 1
    )
    assert _samples(text, "switchyard_billing_outbox_messages") == {'status="pending"': 1.0}
    assert _samples(text, "switchyard_mail_messages") == {'status="failed"': 1.0}
    assert _samples(text, "switchyard_mail_oldest_pending_age_seconds") == {"": 0.0}
    age = _samples(text, "switchyard_billing_outbox_oldest_pending_age_seconds")[""]
    assert 600 <= age < 660
    assert _samples(text, "switchyard_curtailments_active") == {}
    assert _samples(text, "switchyard_webhook_deliveries_oldest_pending_age_seconds") == {"": 0.0}


def test_business_metrics_report_the_heartbeat_interval_the_fleet_is_told(production):
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]
    production.AGENT_HEARTBEAT_SECONDS = 2
    production.AGENT_HEARTBEATS_PER_SECOND = 1
    market_create(nodes=5, gpus=1)  # 5 nodes at one heartbeat a second: every 5 s

    text = _metrics(REMOTE_ADDR="10.0.0.2").content.decode()

    assert _samples(text, "switchyard_agent_heartbeat_interval_seconds") == {"": 5.0}


def test_business_metrics_report_the_length_of_each_celery_queue(production):
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]
    queue = f"metrics-test-{uuid.uuid4().hex[:8]}"
    production.CELERY_TASK_DEFAULT_QUEUE = queue
    broker = redis.Redis.from_url(production.CELERY_BROKER_URL)
    broker.rpush(queue, "m1", "m2", "m3")
    try:
        text = _metrics(REMOTE_ADDR="10.0.0.2").content.decode()
    finally:
        broker.delete(queue)

    lengths = _samples(text, "switchyard_celery_queue_length")
    assert lengths[f'queue="{queue}"'] == 3.0
    # The queues tasks are routed to are reported too.
    assert set(lengths) == {f'queue="{q}"' for q in {*QUEUES, queue}}


def test_business_metrics_say_so_when_redis_is_down(production, monkeypatch):
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]
    production.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    monkeypatch.setattr(business, "_broker", None)

    response = _metrics(REMOTE_ADDR="10.0.0.2")

    assert response.status_code == 200
    assert b"switchyard_business_metrics_up 0.0" in response.content
    assert b"switchyard_reservations" in response.content  # the database part still answers
    monkeypatch.setattr(business, "_broker", None)


def test_business_metrics_answer_in_time_when_a_table_is_locked(production, table_locked):
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]
    table_locked("marketplace_reservation")

    started = time.monotonic()
    response = _metrics(REMOTE_ADDR="10.0.0.2")
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert b"switchyard_business_metrics_up 0.0" in response.content
    assert b'switchyard_ready{part="database"} 1.0' in response.content
    assert elapsed < 6  # inside Prometheus' default scrape_timeout of 10 s


def test_every_metric_the_example_alert_rules_use_is_exported(production):
    rules_file = settings_root() / "docs" / "prometheus-alerts.yml"
    rules = yaml.safe_load(rules_file.read_text())["groups"][0]["rules"]
    used = set()
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "annotations"}
        used |= set(re.findall(r"\b((?:switchyard|celery|django)_[a-z_]+)", rule["expr"]))
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]

    text = _metrics(REMOTE_ADDR="10.0.0.2").content.decode()

    exported = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    # Counters are exported as <name> with samples <name>_total.
    exported |= {f"{name}_total" for name in exported}
    assert used and used - exported == set()


def settings_root():
    from django.conf import settings

    return settings.BASE_DIR


def test_a_forwarded_address_is_allowed_only_through_a_trusted_proxy(production):
    production.METRICS_ALLOWED_IPS = ["10.0.0.2"]
    spoofed = _metrics(REMOTE_ADDR="203.0.113.9", HTTP_X_FORWARDED_FOR="10.0.0.2")
    production.TRUSTED_PROXIES = 1
    forwarded = _metrics(REMOTE_ADDR="192.168.1.1", HTTP_X_FORWARDED_FOR="10.0.0.2")

    assert (spoofed.status_code, forwarded.status_code) == (403, 200)
