"""Resold reserved time bought at the interruptible tier is flexible load like any other
interruptible reservation: a curtailment sheds it; the seller's reserved term stays protected."""

from datetime import timedelta
from decimal import Decimal

import pytest

from marketplace.models import CurtailmentVictim, Reservation, ReservationStatus
from marketplace.services.curtailment import curtailment_announce
from marketplace.services.resale import listing_create
from marketplace.services.reservations import reservation_create
from tests.marketplace.resale_helpers import market

pytestmark = pytest.mark.django_db
H = timedelta(hours=1)


def test_a_resold_interruptible_reservation_is_shed_and_the_sellers_term_is_not():
    m = market()
    listing = listing_create(
        organization=m.seller, reservation=m.term, gpu_count=2,
        starts_at=m.start + 24 * H, ends_at=m.start + 48 * H,
        price_per_gpu_hour=Decimal("0.9000"), tier="interruptible",
    )  # fmt: skip
    bought = reservation_create(
        organization=m.buyer, listing=listing, gpu_count=2,
        starts_at=m.start + 24 * H, ends_at=m.start + 48 * H, tier=None,
    )  # fmt: skip
    assert bought.tier == "interruptible"

    # 1 kW asked over the resold window: the bought reservation's 2 GPUs (1.61 kW) cover it.
    curtailment = curtailment_announce(
        site=m.site, shed_at=m.start + 20 * H, until=m.start + 30 * H,
        target_mw=Decimal("0.001"), reason="ERCOT EEA 1",
    )  # fmt: skip

    (victim,) = CurtailmentVictim.objects.filter(curtailment=curtailment)
    assert (victim.reservation_id, victim.draw_kw) == (bought.pk, Decimal("1.610"))
    assert Reservation.objects.get(pk=bought.pk).status == ReservationStatus.PREEMPTED
    term = Reservation.objects.get(pk=m.term.pk)
    assert term.status == m.term.status and term.preempt_at is None
    assert curtailment.short_kw == 0
