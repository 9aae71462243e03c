"""Billing migration 0007 on a generated ledger of the old scheme (a usage line per reservation
and minute): every organisation's balance and available money are the same after it, no
ledger line moves, and metering carries on from where the per-minute lines stopped without
charging a second twice or losing one."""

import importlib
import random
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from billing.models import BillingAccount, BillingMode, Hold, LedgerEntry, LedgerKind, UsageAccrual
from billing.money import usage_cost_minor
from billing.services.holds import money_position
from billing.services.metering import usage_meter_run
from billing.services.usage import reservation_delivered_seconds
from inventory.models import Outage, OutageCause
from marketplace.models import ReservationStatus, Tier
from tests.billing.conftest import make_reservation
from tests.factories import GpuModelFactory, NodeFactory, OrganizationFactory

pytestmark = pytest.mark.django_db

migration = importlib.import_module("billing.migrations.0007_usage_accrual")
PRICES = [Decimal("0.3700"), Decimal("1.2345"), Decimal("2.5000"), Decimal("3.9999")]


def old_meter(reservation, *, until) -> list[LedgerEntry]:
    """The lines the old meter wrote: one a minute, each the cumulative cost (rounded once)
    less what was charged before, with the old keys."""
    entries, charged, seconds_done, last = [], 0, 0, reservation.activated_at
    at = reservation.activated_at + timedelta(minutes=1)
    while at <= until:
        gpu_seconds = reservation.gpu_count * reservation_delivered_seconds(
            reservation=reservation, until=at
        )
        cost = usage_cost_minor(gpu_seconds=gpu_seconds, price_per_gpu_hour=reservation.price_per_gpu_hour,
                                currency="usd")  # fmt: skip
        end = min(at, reservation.released_at or at, reservation.ends_at)
        if cost != charged or gpu_seconds != seconds_done:
            entries.append(LedgerEntry(
                organization_id=reservation.organization_id, kind=LedgerKind.USAGE,
                amount_minor=charged - cost, currency="usd", reservation=reservation,
                period_start=last, period_end=max(end, last), gpu_seconds=gpu_seconds - seconds_done,
                idempotency_key=f"usage:{reservation.pk}:{int(at.timestamp())}",
            ))  # fmt: skip
            charged, seconds_done, last = cost, gpu_seconds, max(end, last)
        at += timedelta(minutes=1)
    return entries


def ledger_by_org() -> dict[int, tuple[int, int]]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT organization_id, sum(amount_minor), count(*) FROM billing_ledgerentry "
            "GROUP BY organization_id"
        )
        return {org: (int(total), count) for org, total, count in cur.fetchall()}


def test_the_migration_keeps_every_balance_and_metering_continues_exactly():
    rng = random.Random(19)
    now = timezone.now().replace(second=0, microsecond=0)
    last_minute = now - timedelta(minutes=1)  # the old meter's last run
    node_model = GpuModelFactory()
    orgs, metered = [], []
    for i in range(12):
        org = OrganizationFactory()
        BillingAccount.objects.create(organization=org, currency="usd", mode=(
            BillingMode.POSTPAID if i % 4 == 3 else BillingMode.PREPAID))  # fmt: skip
        LedgerEntry.objects.create(organization=org, kind=LedgerKind.TOP_UP, currency="usd",
                                   amount_minor=rng.randrange(5000, 900000),
                                   idempotency_key=f"top_up:{i}")  # fmt: skip
        orgs.append(org)
        for j in range(rng.randrange(1, 5)):
            node = NodeFactory(gpus=8, gpu_model=node_model)
            activated = now - timedelta(minutes=rng.randrange(70, 200), seconds=rng.randrange(60))
            released = None
            status = ReservationStatus.ACTIVE
            if j == 1:  # ended within the old meter's look-back: kept open for corrections
                released, status = now - timedelta(minutes=rng.randrange(5, 40)), "completed"
            tier = [Tier.ON_DEMAND, Tier.INTERRUPTIBLE][j % 2]
            r = make_reservation(org, tier=tier, gpu_count=rng.randrange(1, 5), node=node,
                                 price=rng.choice(PRICES), starts_at=activated - timedelta(minutes=3),
                                 hours=8, activated_at=activated, released_at=released,
                                 status=status)  # fmt: skip
            if rng.random() < 0.4:
                Outage.objects.create(node=node, cause=OutageCause.HARDWARE_FAILURE,
                                      started_at=activated + timedelta(minutes=20, seconds=7),
                                      ended_at=activated + timedelta(minutes=33))  # fmt: skip
            metered.append(r)
        if i % 3 == 0:  # a reserved term charged up front, and an open hold on another
            term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, hours=24,
                                    activated_at=now - timedelta(hours=1))  # fmt: skip
            LedgerEntry.objects.create(organization=org, kind=LedgerKind.RESERVED_CHARGE,
                                       amount_minor=-4800, currency="usd", reservation=term,
                                       idempotency_key=f"reserved:{term.pk}")  # fmt: skip
            Hold.objects.create(organization=org, reservation=metered[-1], amount_minor=777,
                                currency="usd", idempotency_key=f"hold:{i}")  # fmt: skip
    # Long ended: the old meter no longer looked at it, neither does the migration.
    old = make_reservation(orgs[0], gpu_count=1, activated_at=now - timedelta(days=5),
                           starts_at=now - timedelta(days=5), hours=2, status="completed",
                           released_at=now - timedelta(days=5) + timedelta(hours=2))  # fmt: skip
    lines = [e for r in metered for e in old_meter(r, until=last_minute)]
    lines += old_meter(old, until=old.released_at + timedelta(minutes=1))
    LedgerEntry.objects.bulk_create(lines, batch_size=2000)
    assert len(lines) > 1000

    # Before: the balance was the sum of the ledger; available = balance − open holds.
    before = ledger_by_org()
    before_available = {
        org.pk: before[org.pk][0]
        - sum(h.amount_minor for h in Hold.objects.filter(organization=org, status="open"))
        for org in orgs
    }
    # The tables the migration creates start empty.
    UsageAccrual.objects.all().delete()
    with connection.cursor() as cur:
        cur.execute("DELETE FROM billing_balance")

    with connection.cursor() as cur:
        cur.execute(migration.BALANCE_BACKFILL_SQL)
        cur.execute(migration.ACCRUAL_BACKFILL_SQL)

    assert ledger_by_org() == before  # not a line written, changed or removed
    for org in orgs:
        position = money_position(organization_id=org.pk)
        assert (position.balance, position.accrued) == (before[org.pk][0], 0)
        assert position.available == before_available[org.pk]
    assert UsageAccrual.objects.count() == len(metered)
    assert not UsageAccrual.objects.filter(reservation=old).exists()

    # Metering resumes where the per-minute lines stopped: nothing is due at that instant...
    usage_meter_run(now=last_minute)
    assert ledger_by_org() == before
    # ...and an hour later every reservation's lines add up to its whole usage, rounded once.
    # (at the hour's last booking minute: every reservation's hour is due by then)
    later = (now + timedelta(hours=1)).replace(
        minute=settings.BILLING_USAGE_BOOK_SPREAD_MINUTES - 1, second=0, microsecond=0
    )
    usage_meter_run(now=later)
    hour = later.replace(minute=0, second=0, microsecond=0)
    for r in metered:
        r.refresh_from_db()
        bound = r.released_at or hour
        gpu_seconds = r.gpu_count * reservation_delivered_seconds(reservation=r, until=bound)
        charged = LedgerEntry.objects.filter(reservation=r, kind=LedgerKind.USAGE)
        assert -sum(e.amount_minor for e in charged) == usage_cost_minor(
            gpu_seconds=gpu_seconds, price_per_gpu_hour=r.price_per_gpu_hour, currency="usd"
        ), r
        assert sum(e.gpu_seconds for e in charged) == gpu_seconds
    assert LedgerEntry.objects.filter(kind=LedgerKind.USAGE).count() <= len(lines) + 2 * len(
        metered
    )
