"""Cancellation refunds round half-up to the cent, as every other amount (docs/money.md)."""

from datetime import timedelta
from decimal import Decimal

import pytest

from marketplace.models import ReservationStatus, Tier
from marketplace.services.reservations import cancellation_terms
from tests.billing.conftest import T0, make_reservation

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("price", "refund"),
    [
        ("0.2500", "0.13"),  # half of 0.25 is 0.125: half-even would give 0.12
        ("0.0500", "0.03"),  # 0.025: half-even 0.02
        ("0.3500", "0.18"),  # 0.175: both rules agree
    ],
)
def test_a_half_refund_of_a_reserved_term_rounds_half_up_to_the_cent(org, price, refund):
    # One GPU for one hour, cancelled two days before it starts: 50 % back.
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, price=Decimal(price), hours=1,
                            status=ReservationStatus.SCHEDULED)  # fmt: skip

    terms = cancellation_terms(term, at=T0 - timedelta(days=2))

    assert terms.refund_fraction == Decimal("0.5")
    assert terms.unused_amount == Decimal(price).quantize(Decimal("0.01"))
    assert terms.refund_amount == Decimal(refund)
    assert terms.fee_amount == terms.unused_amount - Decimal(refund)
