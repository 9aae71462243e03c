"""Resold time in the ledger: the seller is credited what the buyer is charged, less the fee,
as the buyer's usage is metered; every sale reconciles to the cent."""

from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.db.models import Sum

from billing.models import LedgerEntry, LedgerKind
from billing.services.resale import resale_settled
from billing.services.usage import reservations_meter
from marketplace.models import ResaleFee, Reservation, ReservationOutage
from marketplace.services.resale import listing_create
from marketplace.services.reservations import reservation_create
from tests.marketplace.resale_helpers import market

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)


def total(**filters) -> int:
    return LedgerEntry.objects.filter(**filters).aggregate(t=Sum("amount_minor"))["t"] or 0


def half_up(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def sold(m, *, price="1.2345", gpus=2, fee=None):
    if fee is not None:
        ResaleFee.objects.create(fee_pct=Decimal(fee))
    lst = listing_create(
        organization=m.seller,
        reservation=m.term,
        gpu_count=gpus,
        starts_at=m.start + 24 * H,
        ends_at=m.start + 48 * H,
        price_per_gpu_hour=Decimal(price),
    )
    bought = reservation_create(
        organization=m.buyer,
        listing=lst,
        gpu_count=gpus,
        starts_at=lst.starts_at,
        ends_at=lst.ends_at,
    )
    lst.refresh_from_db()
    return lst, bought


def test_the_seller_is_credited_as_the_buyer_is_charged_less_the_fee_and_it_reconciles():
    m = market()
    lst, bought = sold(m, fee="12.5")
    s = lst.starts_at
    Reservation.objects.filter(pk=bought.pk).update(activated_at=s)
    term_charge = total(reservation=m.term, kind=LedgerKind.RESERVED_CHARGE)

    for minutes in (17, 61, 95, 240):  # the meter runs every so often while it is used
        reservations_meter(
            reservation_ids=[bought.pk], now=s + timedelta(minutes=minutes, seconds=7)
        )
    # The buyer stops after 4 h 1 min 7 s of 24 h: it pays for that, and the seller gets that.
    Reservation.objects.filter(pk=bought.pk).update(
        released_at=s + timedelta(minutes=241, seconds=7)
    )
    reservations_meter(reservation_ids=[bought.pk], now=s + 10 * H)
    reservations_meter(reservation_ids=[bought.pk], now=s + 11 * H)  # nothing new: no new lines

    buyer_charged = -total(reservation=bought, kind=LedgerKind.USAGE)
    seconds = 241 * 60 + 7
    assert buyer_charged == half_up(Decimal("1.2345") * 2 * seconds / 36)  # in cents
    proceeds = total(organization=m.seller, kind=LedgerKind.RESALE_PROCEEDS)
    fees = -total(organization=m.seller, kind=LedgerKind.RESALE_FEE)
    assert proceeds == buyer_charged
    assert fees == half_up(Decimal(buyer_charged) * Decimal("0.125"))
    # Buyer's charge + seller's credit + fee sum to what the platform keeps: the fee.
    assert -buyer_charged + proceeds - fees == -fees
    # Every mirrored line names a usage line of the buyer's, once.
    usage_ids = set(
        LedgerEntry.objects.filter(reservation=bought, kind=LedgerKind.USAGE).values_list(
            "id", flat=True
        )
    )
    mirrored = LedgerEntry.objects.filter(kind=LedgerKind.RESALE_PROCEEDS)
    assert {
        int(k.split(":")[2]) for k in mirrored.values_list("idempotency_key", flat=True)
    } == usage_ids
    assert mirrored.count() == len(usage_ids)
    # On the seller's term, against its reservation; the term is still charged in full.
    assert set(mirrored.values_list("reservation_id", flat=True)) == {m.term.pk}
    assert total(reservation=m.term, kind=LedgerKind.RESERVED_CHARGE) == term_charge
    assert resale_settled(listing_ids=[lst.pk]) == {
        lst.pk: (Decimal(proceeds) / 100, Decimal(fees) / 100)
    }


def test_a_usage_correction_gives_back_proceeds_and_fee_in_proportion():
    m = market()
    lst, bought = sold(m, price="2.0000", gpus=1)
    s = lst.starts_at
    Reservation.objects.filter(pk=bought.pk).update(activated_at=s)
    reservations_meter(reservation_ids=[bought.pk], now=s + 2 * H)
    assert total(organization=m.seller, kind=LedgerKind.RESALE_PROCEEDS) == 400

    # An outage of the first hour is recorded late: the buyer gets it back, so does the sale.
    ReservationOutage.objects.create(
        reservation=bought, node=m.node, started_at=s, ended_at=s + H, cause="hardware_failure"
    )
    reservations_meter(reservation_ids=[bought.pk], now=s + 2 * H + timedelta(seconds=1))

    charged = -total(reservation=bought, kind=LedgerKind.USAGE)
    assert charged == 200
    assert total(organization=m.seller, kind=LedgerKind.RESALE_PROCEEDS) == 200
    assert total(organization=m.seller, kind=LedgerKind.RESALE_FEE) == -20
