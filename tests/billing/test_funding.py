"""The funding gate (balance, spend limit) and the run-out policy: warning, grace, release."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import (
    BillingAccount,
    BillingMode,
    BillingNotice,
    FundingState,
    LedgerKind,
    TopUp,
)
from billing.services.funding import BillingFundingGate, funding_state_update
from billing.services.holds import money_position
from billing.services.ledger import ledger_entry_add
from billing.services.metering import usage_meter_run
from config.errors import PaymentRequired
from marketplace.funding import funding_gate
from marketplace.models import Reservation, ReservationStatus, Tier
from tests.billing.conftest import T0, make_reservation

pytestmark = pytest.mark.django_db


def credit(org, minor: int, key: str):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=minor, currency="usd",
                     idempotency_key=key)  # fmt: skip


def authorize(org, *, tier=Tier.ON_DEMAND, price="2.00", gpus=2, hours=10, total=None):
    """A booked (pending) reservation, as reservation_create has written it, asks the gate."""
    reservation = make_reservation(
        org, tier=tier, gpu_count=gpus, price=Decimal(price), hours=hours,
        total=Decimal(total) if total else None, status=ReservationStatus.PENDING,
    )  # fmt: skip
    funding_gate().reservation_authorize(reservation=reservation)
    return reservation


def test_billing_registers_its_gate_with_the_marketplace():
    assert isinstance(funding_gate(), BillingFundingGate)


def test_on_demand_needs_the_first_hour_covered_by_the_balance(org):
    credit(org, 399, "c1")
    with pytest.raises(PaymentRequired) as error:
        authorize(org)  # 2 GPUs × 2.00 × 1 h = 4.00
    assert error.value.code == "insufficient_funds"

    credit(org, 1, "c2")
    authorize(org)


def test_a_reserved_term_needs_its_whole_total(org):
    credit(org, 10000, "c1")
    with pytest.raises(PaymentRequired):
        authorize(org, tier=Tier.RESERVED, total="100.01")
    authorize(org, tier=Tier.RESERVED, total="100.00")


def test_a_monthly_spend_limit_blocks_new_reservations_even_when_postpaid(org, settings):
    BillingAccount.objects.filter(organization=org).update(
        mode=BillingMode.POSTPAID, monthly_spend_limit_minor=1000
    )
    ledger_entry_add(organization=org, kind=LedgerKind.USAGE, amount_minor=-700, currency="usd",
                     idempotency_key="u1")  # fmt: skip

    authorize(org, price="1.50")  # 3.00 more: exactly 10.00
    with pytest.raises(PaymentRequired) as error:
        authorize(org, price="1.51")
    assert error.value.code == "spend_limit_exceeded"
    assert error.value.status_code == 402


def test_funds_running_out_warn_then_grace_then_release_never_silently(org, settings):
    settings.BILLING_LOW_BALANCE_GRACE = timedelta(minutes=30)
    BillingAccount.objects.filter(organization=org).update(recharge_threshold_minor=1000)
    credit(org, 1500, "c1")
    running = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0,
                               hours=24, starts_at=T0)  # fmt: skip
    reserved = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, activated_at=T0, hours=24,
                                starts_at=T0, total=Decimal("0"))  # fmt: skip

    def state():
        return BillingAccount.objects.get(organization=org).funding_state

    usage_meter_run(now=T0 + timedelta(minutes=10))  # 0.60 used, 14.40 left
    assert state() == FundingState.OK
    usage_meter_run(now=T0 + timedelta(minutes=150))  # 9.00 used: 6.00 < 10.00
    assert state() == FundingState.WARNING
    usage_meter_run(now=T0 + timedelta(minutes=250))  # 15.00 used: 0.00
    account = BillingAccount.objects.get(organization=org)
    assert account.funding_state == FundingState.GRACE
    assert account.grace_until == T0 + timedelta(minutes=280)
    usage_meter_run(now=T0 + timedelta(minutes=279))  # still in grace: still running
    assert Reservation.objects.get(pk=running.pk).status == ReservationStatus.ACTIVE

    usage_meter_run(now=T0 + timedelta(minutes=280))

    assert state() == FundingState.SUSPENDED
    assert Reservation.objects.get(pk=running.pk).status == ReservationStatus.RELEASING
    assert Reservation.objects.get(pk=reserved.pk).status == ReservationStatus.ACTIVE
    kinds = list(
        BillingNotice.objects.filter(organization=org).order_by("id").values_list("kind", flat=True)
    )
    assert kinds == ["low_balance", "grace_started", "suspended"]
    # The figure the portal calls "available", next to the threshold it fell below.
    assert BillingNotice.objects.get(organization=org, kind="low_balance").message.startswith(
        "Your available balance is low: 6.00 USD, below your warning threshold of 10.00 USD "
    )
    with pytest.raises(PaymentRequired) as error:
        authorize(org)
    assert error.value.code == "account_suspended"
    # Grace time was charged, not given away: the release booked the usage up to the moment
    # it was released (the transition's own clock), so the balance is negative by all of it.
    from billing.selectors import balance_minor

    released = Reservation.objects.get(pk=running.pk)
    stopped = min(released.released_at or timezone.now(), released.ends_at)
    used = int((stopped - T0).total_seconds())
    assert balance_minor(organization=org) == 1500 - round(used * 360 / 3600)

    credit(org, 5000 - balance_minor(organization=org), "top-up")  # back to 50.00
    assert funding_state_update(organization=org) == FundingState.OK


def test_a_reserved_term_charged_below_the_threshold_warns_and_recharges_once(org):
    """Nothing runs, so after the run that charges the term nothing is accrued or held: the
    funding pass still sees the balance it took below the threshold (it skipped such an
    account as if it were a new one, empty and never funded, and nobody was told)."""
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, stripe_customer_id="cus_x", default_payment_method_id="pm_x",
        recharge_threshold_minor=5000, recharge_amount_minor=10000,
    )  # fmt: skip
    credit(org, 8000, "c1")
    authorize(org, tier=Tier.RESERVED, total="60.00")

    usage_meter_run(now=T0)  # charged: 80.00 − 60.00 = 20.00 left, below 50.00

    account = BillingAccount.objects.get(organization=org)
    assert money_position(organization_id=org.pk) == (2000, 0, 0)
    assert (account.funding_state, account.recharge_armed) == (FundingState.WARNING, False)
    (top_up,) = TopUp.objects.filter(organization=org)
    assert (top_up.automatic, top_up.amount_minor, top_up.status) == (True, 10000, "pending")
    assert list(
        BillingNotice.objects.filter(organization=org).order_by("id").values_list("kind", flat=True)
    ) == ["low_balance", "automatic_recharge"]

    usage_meter_run(now=T0 + timedelta(minutes=1))  # once per drop

    assert TopUp.objects.filter(organization=org).count() == 1
    assert BillingNotice.objects.filter(organization=org).count() == 2


def test_an_account_never_funded_is_not_warned_by_the_run(org):
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, stripe_customer_id="cus_x", default_payment_method_id="pm_x"
    )

    usage_meter_run(now=T0)

    account = BillingAccount.objects.get(organization=org)
    assert (account.funding_state, account.recharge_armed) == (FundingState.OK, True)
    assert not TopUp.objects.filter(organization=org).exists()
    assert not BillingNotice.objects.filter(organization=org).exists()
