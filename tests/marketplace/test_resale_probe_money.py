"""Money of a sale whose seller's term ended before the buyer's window: a term refunded for
what it will not run is never refunded the window a buyer holds (the buyer pays the seller
for it), and a window a buyer gives back unused after the term ended is refunded to it on
the terms its own refund took."""

from datetime import timedelta

import pytest
from django.db.models import Sum
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.services.credits import cancellation_settle
from marketplace.models import Reservation, ReservationStatus
from marketplace.services.reservations import cancellation_terms, reservation_cancel
from marketplace.services.transitions import reservation_transition
from tests.marketplace.resale_helpers import buy, listing, live_rows, market

pytestmark = pytest.mark.django_db


def _given_back_minor(org) -> int:
    """What the seller got back on its term: refunds and credits, proceeds less fees."""
    kinds = [LedgerKind.TERM_REFUND, LedgerKind.RESALE_PROCEEDS, LedgerKind.RESALE_FEE]
    entries = LedgerEntry.objects.filter(organization=org, kind__in=kinds).exclude(
        idempotency_key__startswith="fund:"
    )
    return entries.aggregate(s=Sum("amount_minor"))["s"] or 0


def test_a_cancelled_term_whose_sold_window_is_given_back_unused_is_refunded_for_it():
    m = market(starts_at=timezone.now() + timedelta(days=10))
    lst = listing(m, gpus=8, start_h=24, hours=24)
    bought = buy(m, lst)
    term = Reservation.objects.get(pk=m.term.pk)
    # 7 days' notice or more: 100 % of the term, less the window sold.
    assert cancellation_terms(term).refund_amount < term.total_amount
    reservation_cancel(reservation=term, actor_label="seller")

    reservation_cancel(reservation=bought, actor_label="buyer")  # before the window
    cancellation_settle(reservation_id=term.pk)

    # The buyer paid nothing; the seller paid for the whole term and gave it all up with
    # full notice: the sold window, never used, must come back too (today 364.80 is lost).
    assert live_rows(bought) == []
    assert _given_back_minor(m.seller) == int(term.total_amount * 100)


def test_a_term_that_failed_before_it_began_is_not_refunded_the_window_a_buyer_holds():
    m = market(starts_at=timezone.now() + timedelta(days=10))
    lst = listing(m, gpus=8, start_h=24, hours=24)
    bought = buy(m, lst)
    term = Reservation.objects.get(pk=m.term.pk)
    sold_share = term.price_per_gpu_hour * 8 * 24
    reservation_transition(
        reservation=term, to_status=ReservationStatus.FAILED, cause="probe", actor_label="test"
    )

    cancellation_settle(reservation_id=term.pk)

    assert len(live_rows(bought)) == 8  # the buyer keeps its window, and will pay for it
    assert _given_back_minor(m.seller) == int((term.total_amount - sold_share) * 100)


def test_a_failed_terms_undelivered_rest_leaves_out_the_window_a_buyer_holds():
    """A term ended by a failure gets back what it will not run, not the window it resold
    (its buyer keeps it and pays the seller for it): the rule cancelling uses too."""
    from marketplace.services.gpu_failures import undelivered_refund

    m = market(starts_at=timezone.now() + timedelta(days=10))
    term = Reservation.objects.get(pk=m.term.pk)
    whole = undelivered_refund(term, since=term.starts_at)
    assert whole == term.total_amount
    buy(m, listing(m, gpus=8, start_h=24, hours=24))

    sold_share = term.price_per_gpu_hour * 8 * 24
    assert undelivered_refund(term, since=term.starts_at) == whole - sold_share
    assert cancellation_terms(term).unused_amount == whole - sold_share
