"""The load test's checks (bench/loadtest/run.py) hold on a consistent database and catch what
they look for: a reservation stuck in a transient state, allocations out of step with status."""

import importlib.util
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.utils import timezone

from billing.services.accounts import billing_account_get_or_create
from billing.services.credits import credit_issue
from marketplace.models import Reservation
from marketplace.services.organizations import organization_create
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create

RUN = Path(__file__).resolve().parent.parent / "bench" / "loadtest" / "run.py"
pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]


def _run_module():
    spec = importlib.util.spec_from_file_location("loadtest_run", RUN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _failed(results) -> dict[str, str]:
    return {name: detail for name, ok, detail in results if not ok}


@pytest.fixture
def booked():
    owner = get_user_model().objects.create_user("load0", password=None)
    org = organization_create(name="Load 0", owner=owner)
    billing_account_get_or_create(organization=org)
    credit_issue(organization=org, amount=Decimal("1000.00"), reason="load test", created_by=None)
    market = market_create(nodes=1, gpus=8)
    later = timezone.now() + timedelta(days=1)
    return [market.book(gpu_count=2, organization=org, starts_at=later) for _ in range(2)]


def test_every_check_holds_on_a_consistent_database(booked):
    results = _run_module()._checks()

    assert _failed(results) == {}
    detail = {name: detail for name, _, detail in results}
    assert detail["every organisation's ledger sums to its balance"] == (
        "1 ledgers, mismatched: none"
    )


def test_a_reservation_left_provisioning_is_stuck(booked):
    Reservation.objects.filter(pk=booked[0].pk).update(status="provisioning")

    assert _failed(_run_module()._checks()) == {
        "no reservation stuck in a transient state": "1 stuck"
    }


def test_a_finished_reservation_that_still_holds_gpus_is_caught(booked):
    Reservation.objects.filter(pk=booked[1].pk).update(status="cancelled")

    assert _failed(_run_module()._checks()) == {
        "live allocations match every reservation's status": "1 reservations disagree"
    }
