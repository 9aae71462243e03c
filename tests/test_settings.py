"""Settings come from the environment; a malformed value stops start-up naming the variable.

Each case starts a fresh interpreter, since settings are read once at import.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GOOD_SECRET = "k" * 20 + "Q7v!x9#Lm2@pR5$tW8^zB4&nC6*dF1(hJ3)" + "s" * 10
SETUP = "import django; django.setup()"


def run(code_or_args, **env) -> subprocess.CompletedProcess:
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/switchyard_settings_test",
        "REDIS_URL": "redis://127.0.0.1:6379/15",
        "DEBUG": "1",
    }
    base.update(env)
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={k: v for k, v in base.items() if v is not None},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_good_development_environment_starts():
    result = run(SETUP)

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("flag", "expected"),
    [
        (None, "ServerBindingCursor 2"),
        ("1", "ServerBindingCursor 2"),
        ("0", "Cursor None"),
    ],
)
def test_prepared_statements_are_on_unless_turned_off_for_a_pooler(flag, expected):
    code = (
        f"{SETUP}; from django.db import connection; p = connection.get_connection_params(); "
        # The class psycopg is given is django-prometheus's timing wrapper around Django's.
        "print(p['cursor_factory'].__mro__[1].__name__, p['prepare_threshold'])"
    )
    result = run(code, DATABASE_PREPARED_STATEMENTS=flag)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"DEBUG": "maybe"}, "DEBUG"),
        ({"DATABASE_URL": "mysql://root@localhost/switchyard"}, "DATABASE_URL"),
        ({"DATABASE_URL": "postgres://localhost:notaport/x"}, "DATABASE_URL"),
        ({"REDIS_URL": "nonsense"}, "REDIS_URL"),
        ({"DATABASE_PREPARED_STATEMENTS": "sometimes"}, "DATABASE_PREPARED_STATEMENTS"),
        ({"NODE_OFFLINE_AFTER_SECONDS": "abc"}, "NODE_OFFLINE_AFTER_SECONDS"),
        ({"NODE_OFFLINE_AFTER_SECONDS": "5"}, "NODE_OFFLINE_AFTER_SECONDS"),
        ({"AGENT_HEARTBEAT_SECONDS": "0"}, "AGENT_HEARTBEAT_SECONDS"),
        ({"AGENT_HEARTBEAT_SECONDS": "61"}, "AGENT_HEARTBEAT_SECONDS"),  # > 180 s / 3
        # The default 10 s with a shorter offline time: one late heartbeat would be an outage.
        ({"NODE_OFFLINE_AFTER_SECONDS": "29"}, "AGENT_HEARTBEAT_SECONDS"),
        ({"AGENT_HEARTBEATS_PER_SECOND": "-1"}, "AGENT_HEARTBEATS_PER_SECOND"),
        (
            {"AGENT_HEARTBEAT_SECONDS": "301", "NODE_OFFLINE_AFTER_SECONDS": "3600"},
            "AGENT_HEARTBEAT_SECONDS",
        ),
        (
            {"CELERY_TASK_TIME_LIMIT": "60", "CELERY_TASK_SOFT_TIME_LIMIT": "90"},
            "CELERY_TASK_TIME_LIMIT",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"BILLING_USAGE_BOOK_SPREAD_MINUTES": "0"}, "BILLING_USAGE_BOOK_SPREAD_MINUTES"),
        ({"BILLING_USAGE_BOOK_SPREAD_MINUTES": "59"}, "BILLING_USAGE_BOOK_SPREAD_MINUTES"),
        ({"METRICS_TOKEN": "too-short"}, "METRICS_TOKEN"),
        ({"METRICS_ALLOWED_IPS": "10.0.0.0/8,prometheus.internal"}, "METRICS_ALLOWED_IPS"),
        ({"PROMETHEUS_MULTIPROC_DIR": "/nonexistent/metrics"}, "PROMETHEUS_MULTIPROC_DIR"),
        ({"CELERY_METRICS_ADDRESS": "9808"}, "CELERY_METRICS_ADDRESS"),
        ({"CELERY_METRICS_ADDRESS": "0.0.0.0:99999"}, "CELERY_METRICS_ADDRESS"),
        ({"CURRENCY": "kwd"}, "CURRENCY"),  # three decimals: charged a tenth
        ({"CURRENCY": "us dollars"}, "CURRENCY"),
        ({"SITE_URL": "switchyard.example"}, "SITE_URL"),
        ({"SESSION_IDLE_MINUTES": "0"}, "SESSION_IDLE_MINUTES"),
        ({"SESSION_LIFETIME_HOURS": "2 weeks"}, "SESSION_LIFETIME_HOURS"),
        ({"SESSION_IDLE_MINUTES": "180", "SESSION_LIFETIME_HOURS": "2"}, "SESSION_IDLE_MINUTES"),
        ({"BILLING_DEFAULT_RECHARGE_THRESHOLD": "-5"}, "BILLING_DEFAULT_RECHARGE_THRESHOLD"),
        ({"BILLING_DEFAULT_RECHARGE_THRESHOLD": "10.005"}, "BILLING_DEFAULT_RECHARGE_THRESHOLD"),
        ({"BILLING_DEFAULT_RECHARGE_AMOUNT": "4.99"}, "BILLING_DEFAULT_RECHARGE_AMOUNT"),
        # Durations past ten years: a bare OverflowError at start-up, or later a 500 where
        # `now +` the setting passed the calendar's end (a grace starting, an invitation).
        ({"BILLING_LOW_BALANCE_GRACE_SECONDS": "10000000000"}, "BILLING_LOW_BALANCE_GRACE_SECONDS"),
        ({"INVITATION_TTL_DAYS": "1000000000"}, "INVITATION_TTL_DAYS"),
        ({"WEBHOOK_RETRY_HOURS": "99999999"}, "WEBHOOK_RETRY_HOURS"),
        # Decimal() reads these, but they are no number: NaN failed in a comparison with a bare
        # decimal.InvalidOperation, Infinity and NaN passed the bounds checks below.
        ({"BILLING_DEFAULT_RECHARGE_THRESHOLD": "NaN"}, "BILLING_DEFAULT_RECHARGE_THRESHOLD"),
        ({"GRID_PRICE_FLOOR_PER_MWH": "nan"}, "GRID_PRICE_FLOOR_PER_MWH"),
        ({"GRID_PRICE_CAP_PER_MWH": "Infinity"}, "GRID_PRICE_CAP_PER_MWH"),
        ({"SIMULATED_DRIVER_LATENCY_SECONDS": "NaN"}, "SIMULATED_DRIVER_LATENCY_SECONDS"),
        ({"SIMULATED_DRIVER_LATENCY_SECONDS": "inf"}, "SIMULATED_DRIVER_LATENCY_SECONDS"),
        # Under VND's smallest top-up (30,000): Stripe would refuse the recharge.
        (
            {"CURRENCY": "vnd", "BILLING_DEFAULT_RECHARGE_AMOUNT": "10000"},
            "BILLING_DEFAULT_RECHARGE_AMOUNT",
        ),
        ({"CURRENCY": "jpy", "BILLING_DEFAULT_RECHARGE_AMOUNT": "5000.5"}, "RECHARGE_AMOUNT"),
        ({"DEBUG": "0", "SECRET_KEY": None}, "SECRET_KEY"),
        ({"DEBUG": "0", "SECRET_KEY": "short"}, "SECRET_KEY"),
    ],
)
def test_a_malformed_value_stops_start_up_naming_the_variable(env, variable):
    result = run(SETUP, **env)

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: ")
    assert variable in last_line


@pytest.mark.parametrize(
    ("currency", "expected"),
    [
        ("usd", "50.00 100.00"),
        ("eur", "43.00 86.00"),  # about US$50 and US$100, two significant figures
        ("jpy", "7600 15000"),
        ("vnd", "1300000 2600000"),
        ("idr", "830000.00 999999.99"),  # the amount at most Stripe's largest charge
    ],
)
def test_new_accounts_recharge_defaults_are_sized_to_the_currency(currency, expected):
    result = run(
        f"{SETUP}; from django.conf import settings as s; "
        "print(s.BILLING_DEFAULT_RECHARGE_THRESHOLD, s.BILLING_DEFAULT_RECHARGE_AMOUNT)",
        CURRENCY=currency,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "10"),
        ({"AGENT_HEARTBEAT_SECONDS": "60"}, "60"),  # exactly a third of the default 180 s
        ({"AGENT_HEARTBEAT_SECONDS": "300", "NODE_OFFLINE_AFTER_SECONDS": "900"}, "300"),
    ],
)
def test_the_agents_heartbeat_interval_may_be_up_to_a_third_of_the_offline_time(env, expected):
    result = run(
        f"{SETUP}; from django.conf import settings; print(settings.AGENT_HEARTBEAT_SECONDS)", **env
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


PRODUCTION = {
    "DEBUG": "0",
    "SECRET_KEY": GOOD_SECRET,
    "ALLOWED_HOSTS": "switchyard.example.com",
}


def deploy_check(**env) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `check --deploy`; return the result and the ids of the security checks raised.

    Only security.* is asserted here: the other apps' checks (e.g. drf-spectacular's schema
    warnings) are not about deployment settings and are tested where that code lives.
    """
    result = run(["manage.py", "check", "--deploy"], **env)
    ids = re.findall(r"^\?: \((security\.\w+)\)", result.stderr, re.M)
    return result, ids


def test_production_settings_pass_the_deploy_check_apart_from_hsts_preload():
    result, security = deploy_check(**PRODUCTION)

    assert result.returncode == 0, result.stderr
    # HSTS preload is an opt-in commitment to browsers' preload lists, so it stays off unless
    # SECURE_HSTS_PRELOAD=1 (below); that is the one deploy warning left.
    assert security == ["security.W021"]


def test_production_settings_with_hsts_preload_pass_the_deploy_check_clean():
    result, security = deploy_check(**PRODUCTION, SECURE_HSTS_PRELOAD="1")

    assert result.returncode == 0, result.stderr
    assert security == []


def test_the_deploy_check_notices_insecure_production_settings():
    result, security = deploy_check(**PRODUCTION, SECURE_HSTS_SECONDS="0", SECURE_SSL_REDIRECT="0")

    assert result.returncode == 0, result.stderr
    assert security == ["security.W004", "security.W008"]
