"""Accrual under concurrency, on real PostgreSQL with a thread (and connection) per actor:
metering runs racing each other and state changes book every second exactly once, and the
funding gate counts usage accrued and not yet booked."""

import threading
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connections
from django.utils import timezone

from billing.models import BillingAccount, LedgerEntry, LedgerKind, UsageAccrual
from billing.money import usage_cost_minor
from billing.selectors import balance_minor
from billing.services.holds import money_position
from billing.services.ledger import ledger_entry_add
from billing.services.metering import usage_meter_run
from config.errors import PaymentRequired
from marketplace.models import Reservation, ReservationStatus
from marketplace.services.transitions import reservation_transition
from tests.billing.conftest import make_reservation
from tests.billing.test_holds import reserve_on_demand
from tests.factories import GpuModelFactory, MembershipFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate

FUNDS = 10_000_000
PRICE = Decimal("3.6000")


def run_all(actions) -> list[str]:
    """Start every action in its own thread at once; what each raised, if anything."""
    barrier = threading.Barrier(len(actions))
    errors: list[str] = []

    def wrap(action):
        try:
            barrier.wait()
            action()
        except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
            errors.append(repr(exc))
        finally:
            connections.close_all()

    threads = [threading.Thread(target=wrap, args=(a,)) for a in actions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return errors


@pytest.fixture
def funded_org(db):
    org = MembershipFactory(user__password="!").organization
    BillingAccount.objects.create(organization=org, currency="usd")
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=FUNDS,
                     currency="usd", idempotency_key="funds")  # fmt: skip
    return org


@pytest.mark.django_db(transaction=True)
def test_runs_racing_each_other_and_stops_book_every_second_once(funded_org):
    now = timezone.now()
    start = now - timedelta(hours=2, minutes=30)
    reservations = [
        make_reservation(funded_org, gpu_count=2, price=PRICE, starts_at=start, activated_at=start)
        for _ in range(8)
    ]

    def stop(reservation):
        def action():
            moved = reservation_transition(reservation=reservation, to_status="releasing",
                                           cause="stopped", actor_label="test")  # fmt: skip
            reservation_transition(reservation=moved, to_status="completed", cause="released",
                                   actor_label="test")  # fmt: skip

        return action

    errors = run_all([lambda: usage_meter_run(now=now)] * 3 + [stop(r) for r in reservations[:4]])
    assert errors == []
    final = timezone.now()
    usage_meter_run(now=final)

    hour = final.replace(minute=0, second=0, microsecond=0)
    total = 0
    for reservation in reservations:
        reservation.refresh_from_db()
        end = reservation.released_at or hour
        gpu_seconds = 2 * int((end - start).total_seconds())
        lines = LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.USAGE)
        assert sum(e.gpu_seconds for e in lines) == gpu_seconds, reservation.status
        charged = -sum(e.amount_minor for e in lines)
        assert charged == usage_cost_minor(gpu_seconds=gpu_seconds, price_per_gpu_hour=PRICE,
                                           currency="usd")  # fmt: skip
        accrual = UsageAccrual.objects.get(reservation=reservation)
        assert (accrual.booked_minor, accrual.booked_gpu_seconds) == (charged, gpu_seconds)
        total += charged
    stopped = Reservation.objects.filter(status=ReservationStatus.COMPLETED).count()
    assert stopped == 4
    assert balance_minor(organization=funded_org) == FUNDS - total


@pytest.mark.django_db(transaction=True)
def test_concurrent_bookings_count_usage_accrued_and_not_yet_booked(db):
    org = MembershipFactory(user__password="!").organization
    BillingAccount.objects.create(organization=org, currency="usd")
    model = GpuModelFactory()
    make_rate(model, "1.5400")  # on-demand: a first hour of one GPU holds 1.54
    make_policy()
    make_nodes(SiteFactory(), model, 3, gpus=8)
    now = timezone.now().replace(microsecond=0)
    running = make_reservation(org, gpu_count=1, price=PRICE, starts_at=now - timedelta(hours=3),
                               activated_at=now - timedelta(minutes=50))  # fmt: skip
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=300 + 3 * 154 + 100,
                     currency="usd", idempotency_key="c")  # fmt: skip
    usage_meter_run(now=now)  # 3,000 GPU-seconds: 3.00 used, booked or accrued
    position = money_position(organization_id=org.pk)
    assert position.balance - position.accrued == 3 * 154 + 100

    outcomes: Counter = Counter()
    lock = threading.Lock()

    def book():
        try:
            reserve_on_demand(org, model)
            result = "ok"
        except PaymentRequired as exc:
            result = exc.code
        with lock:
            outcomes[result] += 1

    errors = run_all([book] * 12)

    assert errors == []
    # 862 − 300 used leaves 5.62: three first hours (4.62), not five as the balance alone says.
    assert outcomes == Counter({"ok": 3, "insufficient_funds": 9})
    assert Reservation.objects.filter(organization=org).exclude(pk=running.pk).count() == 3
    position = money_position(organization_id=org.pk)
    assert position.available == 100
