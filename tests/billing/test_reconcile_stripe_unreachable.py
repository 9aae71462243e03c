"""reconcile_billing with Stripe unreachable: one line on stderr, a non-zero exit."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.django_db(transaction=True)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the socket is


def test_it_says_stripe_is_unreachable_in_one_line_and_exits_non_zero():
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "STRIPE_SECRET_KEY": "sk_test_unreachable",
        "STRIPE_API_BASE": f"http://127.0.0.1:{_closed_port()}",
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "reconcile_billing"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 1
    # The stripe library's own log lines (its retry) aside, the command says one thing.
    lines = [
        line
        for line in done.stderr.splitlines()
        if line.strip() and '"logger": "stripe"' not in line
    ]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("CommandError: Stripe is unreachable, nothing was compared:")
    assert "Connection refused" in lines[0]
    assert "Traceback" not in done.stderr + done.stdout


def test_a_read_stripe_refuses_is_one_line_too_not_a_traceback(monkeypatch):
    """A key without a permission, or a Stripe double without an endpoint (localstripe has no
    /v1/disputes), answers 4xx: the command's own words, not the exception's traceback."""
    from django.core.management import CommandError, call_command

    from billing.stripe_gateway import PermanentStripeError

    def refused():
        raise PermanentStripeError("Unrecognized request URL (GET: /v1/disputes)\n", code="")

    monkeypatch.setattr("billing.management.commands.reconcile_billing.billing_reconcile", refused)
    with pytest.raises(CommandError) as failed:
        call_command("reconcile_billing")
    assert str(failed.value) == (
        "Stripe refused a request, nothing was compared: "
        "Unrecognized request URL (GET: /v1/disputes)"
    )
