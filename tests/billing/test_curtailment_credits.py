"""A protected reservation that staff forced a grid curtailment onto is credited: the time it
lost back (reserved, charged up front), and the stop as downtime under the SLA."""

from datetime import timedelta
from decimal import Decimal

import pytest

from billing.models import LedgerEntry, LedgerKind
from billing.services.credits import (
    curtailment_forced_credit_issue,
    curtailment_forced_credits_due,
)
from billing.services.ledger import ledger_entry_add
from billing.services.metering import usage_meter_run
from inventory.models import Site
from marketplace.models import Curtailment, CurtailmentVictim, ReservationStatus, Tier
from tests.billing.conftest import T0, make_reservation

pytestmark = pytest.mark.django_db


def _forced_victim(reservation, *, forced=True):
    curtailment = Curtailment.objects.create(
        site=Site.objects.get(pk=reservation.site_id),
        shed_at=reservation.released_at,
        reason="EEA3",
        forced_reason="firm load shed",
    )
    CurtailmentVictim.objects.create(
        curtailment=curtailment, reservation=reservation, tier=reservation.tier,
        draw_kw=Decimal("1.610"), draw_basis="rated", forced=forced,
        outcome=CurtailmentVictim.Outcome.NOTICED, chosen_at=T0,
    )  # fmt: skip


def _credits(reservation) -> dict[str, int]:
    return dict(
        LedgerEntry.objects.filter(
            reservation=reservation, idempotency_key__startswith="curtail:"
        ).values_list("kind", "amount_minor")
    )


def test_a_reserved_term_gets_the_lost_time_back_and_the_sla_credit_on_the_rest(org):
    # 2 GPUs × 10 h at 10.00 = 200.00 up front; stopped after 4 h: 6 h lost.
    reserved = make_reservation(
        org, tier=Tier.RESERVED, price=Decimal("10.00"), hours=10,
        status=ReservationStatus.PREEMPTED, activated_at=T0, released_at=T0 + timedelta(hours=4),
    )  # fmt: skip
    _forced_victim(reserved)

    assert curtailment_forced_credits_due(now=T0 + timedelta(hours=5)) == [reserved.pk]
    curtailment_forced_credit_issue(reservation_id=reserved.pk)

    # 6/10 of 200.00 = 120.00 back; uptime 4/10 = 40 % < 95 %: 100 % of the 80.00 delivered.
    assert _credits(reserved) == {LedgerKind.TERM_REFUND: 12000, LedgerKind.SLA_CREDIT: 8000}
    assert curtailment_forced_credits_due(now=T0 + timedelta(hours=5)) == []
    curtailment_forced_credit_issue(reservation_id=reserved.pk)  # once only
    assert LedgerEntry.objects.filter(idempotency_key__startswith="curtail:").count() == 2


def test_on_demand_gets_the_sla_rate_on_what_it_was_charged(org):
    # 10 h booked, stopped 6 minutes before the end: uptime 99 % → 10 % of the month's usage.
    on_demand = make_reservation(
        org, tier=Tier.ON_DEMAND, price=Decimal("2.00"), hours=10,
        status=ReservationStatus.PREEMPTED, activated_at=T0,
        released_at=T0 + timedelta(hours=9, minutes=54),
    )  # fmt: skip
    ledger_entry_add(
        organization=org, kind=LedgerKind.USAGE, amount_minor=-3960, currency="usd",
        idempotency_key="usage:test", reservation=on_demand, period_start=T0,
        period_end=T0 + timedelta(hours=9, minutes=54), gpu_seconds=2 * 35640,
    )  # fmt: skip
    _forced_victim(on_demand)

    curtailment_forced_credit_issue(reservation_id=on_demand.pk)

    assert _credits(on_demand) == {LedgerKind.SLA_CREDIT: 396}


def test_interruptible_and_unforced_victims_get_nothing(org):
    interruptible = make_reservation(
        org, tier=Tier.INTERRUPTIBLE, status=ReservationStatus.PREEMPTED, activated_at=T0,
        released_at=T0 + timedelta(hours=1),
    )  # fmt: skip
    _forced_victim(interruptible)
    reserved = make_reservation(
        org, tier=Tier.RESERVED, status=ReservationStatus.PREEMPTED, activated_at=T0,
        released_at=T0 + timedelta(hours=1),
    )  # fmt: skip
    _forced_victim(reserved, forced=False)

    assert curtailment_forced_credit_issue(reservation_id=interruptible.pk) == []
    assert curtailment_forced_credit_issue(reservation_id=reserved.pk) == []
    assert not LedgerEntry.objects.filter(idempotency_key__startswith="curtail:").exists()


def test_the_metering_run_credits_them(org):
    reserved = make_reservation(
        org, tier=Tier.RESERVED, price=Decimal("10.00"), hours=10,
        status=ReservationStatus.PREEMPTED, activated_at=T0, released_at=T0 + timedelta(hours=4),
    )  # fmt: skip
    _forced_victim(reserved)

    usage_meter_run(now=T0 + timedelta(hours=5))  # within the week after the preemption

    assert _credits(reserved)[LedgerKind.TERM_REFUND] == 12000


def test_a_victim_chosen_weeks_before_its_preemption_is_still_credited(org):
    """Announced three weeks ahead, preempted an hour ago: due now, whenever it was chosen."""
    reserved = make_reservation(
        org, tier=Tier.RESERVED, price=Decimal("10.00"), hours=10,
        status=ReservationStatus.PREEMPTED, activated_at=T0, released_at=T0 + timedelta(hours=4),
    )  # fmt: skip
    _forced_victim(reserved)
    CurtailmentVictim.objects.filter(reservation=reserved).update(chosen_at=T0 - timedelta(days=21))

    assert curtailment_forced_credits_due(now=T0 + timedelta(hours=5)) == [reserved.pk]
    # A week after the preemption it is no longer looked for (the daily runs credited it).
    assert curtailment_forced_credits_due(now=T0 + timedelta(days=8)) == []
