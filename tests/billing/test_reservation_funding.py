"""The marketplace's reservation_create asks billing's gate: no money, no reservation."""

from decimal import Decimal

import pytest
from kombu.exceptions import OperationalError

from billing.models import BillingAccount, LedgerKind, TopUp
from billing.services.ledger import ledger_entry_add
from billing.tasks import auto_recharge_for_reservation_task
from config.celery import app
from config.errors import PaymentRequired
from marketplace.models import Allocation, Reservation
from marketplace.services.reservations import reservation_create
from tests.billing.conftest import save_card
from tests.factories import GpuModelFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow

pytestmark = pytest.mark.django_db


@pytest.fixture
def capacity():
    model = GpuModelFactory()
    make_rate(model, "2.5000")
    make_policy()
    make_nodes(SiteFactory(), model, 1)
    return model


def reserve(org, hours=10):
    return reservation_create(organization=org, gpu_model="h100-sxm-80gb", gpu_count=2,
                              starts_at=tomorrow(), ends_at=tomorrow(hours), tier="on_demand")  # fmt: skip


def test_an_unfunded_organisation_gets_402_and_nothing_is_held(capacity, org):
    with pytest.raises(PaymentRequired) as error:
        reserve(org)

    assert error.value.code == "insufficient_funds"
    assert not Reservation.objects.exists()
    assert not Allocation.objects.exists()


def test_a_funded_organisation_reserves(capacity, org):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=50000, currency="usd",
                     idempotency_key="c")  # fmt: skip

    reservation = reserve(org)

    assert reservation.organization == org
    assert Allocation.objects.filter(reservation=reservation).count() == 2


def test_the_monthly_spend_limit_blocks_a_new_reservation(capacity, org):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=50000, currency="usd",
                     idempotency_key="c")  # fmt: skip
    BillingAccount.objects.filter(organization=org).update(monthly_spend_limit_minor=400)

    with pytest.raises(PaymentRequired) as error:
        reserve(org)  # first hour committed: 2 × 2.50 = 5.00 > 4.00

    assert error.value.code == "spend_limit_exceeded"
    assert not Reservation.objects.exists()
    assert Decimal(BillingAccount.objects.get(organization=org).monthly_spend_limit_minor) == 400


@pytest.fixture
def sent_tasks(monkeypatch):
    """The tasks the gate sends to the broker, recorded instead of sent."""
    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, args=(), **kw: sent.append((name, args)))
    return sent


@pytest.mark.stripe
def test_with_auto_recharge_set_up_a_refusal_starts_a_recharge_and_a_retry_then_reserves(
    capacity, org, localstripe, sent_tasks, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, recharge_amount_minor=2000, recharge_threshold_minor=500
    )

    with pytest.raises(PaymentRequired) as error:
        reserve(org)  # first hour committed: 2 × 2.50 = 5.00 against a balance of 0

    assert error.value.code == "insufficient_funds"
    # Its amount is stated: the shortfall and the threshold (10.00), at least the usual 20.00.
    assert (
        "an automatic recharge of 20.00 USD to your saved card has started" in error.value.message
    )
    assert error.value.recharge == {"amount": "20.00", "currency": "usd", "status": "started"}
    assert sent_tasks == [("billing.tasks.auto_recharge_for_reservation", [org.pk, 500, 2000])]
    assert not Reservation.objects.exists()

    # What the worker does with that task: charge the card off-session, credit the balance.
    with django_capture_on_commit_callbacks(execute=True):
        top_up_id = auto_recharge_for_reservation_task(*sent_tasks[0][1])
    top_up = TopUp.objects.get(pk=top_up_id)
    assert (top_up.status, top_up.amount_minor, top_up.automatic) == ("succeeded", 2000, True)
    assert reserve(org).organization == org
    # Covered now: asking again charges nothing more.
    assert auto_recharge_for_reservation_task(org.pk, 500) is None


def test_without_auto_recharge_the_refusal_says_to_top_up_and_sends_nothing(
    capacity, org, sent_tasks
):
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=True)

    with pytest.raises(PaymentRequired) as error:
        reserve(org)  # auto-recharge is on, but there is no card to charge

    assert "top up and try again" in error.value.message
    assert sent_tasks == []


def test_a_broker_outage_while_asking_for_a_recharge_still_answers_402(capacity, org, monkeypatch):
    def down(*args, **kwargs):
        raise OperationalError("Connection refused")

    monkeypatch.setattr(app, "send_task", down)
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, stripe_customer_id="cus_x", default_payment_method_id="pm_x"
    )

    with pytest.raises(PaymentRequired) as error:
        reserve(org)

    assert error.value.code == "insufficient_funds"
    assert "top up and try again" in error.value.message
