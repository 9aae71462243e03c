"""Money never meets a float; rounding is ROUND_HALF_UP once, at the line."""

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing.money import from_minor_units, to_minor_units, usage_cost_minor
from billing.services.funding import committed_amount
from billing.services.ledger import ledger_entry_add
from billing.services.topups import top_up_create
from billing.stripe_gateway import StripeGateway, build_client


@pytest.mark.parametrize(
    "call",
    [
        lambda: to_minor_units(1.5, "usd"),
        lambda: usage_cost_minor(gpu_seconds=3600, price_per_gpu_hour=2.5, currency="usd"),
        lambda: usage_cost_minor(gpu_seconds=3600.0, price_per_gpu_hour=Decimal("2"), currency="usd"),
        lambda: from_minor_units(150.0, "usd"),
        lambda: committed_amount(
            tier="reserved", gpu_count=1, price_per_gpu_hour=Decimal("1"), total_amount=10.0,
            starts_at=datetime(2026, 1, 1, tzinfo=UTC), ends_at=datetime(2026, 1, 2, tzinfo=UTC),
        ),
    ],
)  # fmt: skip
def test_a_float_reaching_money_code_raises_type_error(call):
    with pytest.raises(TypeError):
        call()


@pytest.mark.django_db
def test_services_refuse_float_amounts(org):
    with pytest.raises(TypeError):
        top_up_create(organization=org, amount=25.0)
    with pytest.raises(TypeError):
        ledger_entry_add(
            organization=org, kind="credit", amount_minor=10.0, currency="usd", idempotency_key="f"
        )


def test_the_stripe_boundary_refuses_floats(settings):
    settings.STRIPE_SECRET_KEY = "sk_test_x"
    gateway = StripeGateway(build_client())
    with pytest.raises(TypeError):
        gateway.payment_intent_create_off_session(
            customer_id="cus_x", payment_method_id="pm_x", amount=10.5, currency="usd",
            metadata={}, idempotency_key="k",
        )  # fmt: skip


def test_it_rounds_half_up_to_the_minor_unit():
    assert to_minor_units(Decimal("0.005"), "usd") == 1
    assert to_minor_units(Decimal("0.0049"), "usd") == 0
    assert to_minor_units(Decimal("12.345"), "usd") == 1235
    assert to_minor_units(Decimal("500.4"), "jpy") == 500
    assert from_minor_units(1235, "usd") == Decimal("12.35")


def test_usage_is_priced_by_the_second():
    # 2 GPUs × 1 s at 2.00/GPU-hour = 0.00111…; a full hour of 2 GPUs = 4.00.
    assert usage_cost_minor(gpu_seconds=2, price_per_gpu_hour=Decimal("2"), currency="usd") == 0
    assert (
        usage_cost_minor(gpu_seconds=7200, price_per_gpu_hour=Decimal("2"), currency="usd") == 400
    )
    assert (
        usage_cost_minor(gpu_seconds=8991, price_per_gpu_hour=Decimal("2"), currency="usd") == 500
    )
