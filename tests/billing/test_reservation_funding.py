"""The marketplace's reservation_create asks billing's gate: no money, no reservation."""

from decimal import Decimal

import pytest

from billing.models import BillingAccount, LedgerKind
from billing.services.ledger import ledger_entry_add
from config.errors import PaymentRequired
from marketplace.models import Allocation, Reservation
from marketplace.services.reservations import reservation_create
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
