"""Resale around a term that is ending and a sale given back: a stopped (releasing) term
neither lists nor sells the time it gave up, and a returned listing withdrawn changes nothing
(it was a 500)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from config.errors import Conflict, NotAvailable
from marketplace.models import (
    Event,
    ListingStatus,
    ResaleListing,
    Reservation,
    ReservationStatus,
)
from marketplace.selectors.resale import resale_offer_rows
from marketplace.services.resale import listing_create
from marketplace.services.reservations import reservation_cancel
from marketplace.services.transitions import reservation_transition
from tests.marketplace.api_fixtures import fresh_rate_limits, key_client  # noqa: F401
from tests.marketplace.resale_helpers import H, buy, listing, live_rows, market
from tests.marketplace.test_resale_return_unused import _running_term

pytestmark = pytest.mark.django_db


def test_a_stopped_term_cannot_list_the_time_it_gave_up():
    m = market()
    term = _running_term(m)
    reservation_cancel(reservation=term, actor_label="seller")  # active → releasing
    term.refresh_from_db()
    assert term.status == ReservationStatus.RELEASING
    rows = live_rows(term)

    with pytest.raises(Conflict) as refused:
        listing_create(
            organization=m.seller,
            reservation=term,
            gpu_count=8,
            starts_at=timezone.now() + 24 * H,
            ends_at=timezone.now() + 48 * H,
            price_per_gpu_hour=Decimal("1.5000"),
        )

    assert (refused.value.code, refused.value.field) == ("reservation_not_live", "reservation")
    assert not ResaleListing.objects.exists()
    assert not Event.objects.filter(type="listing.created").exists()
    assert live_rows(term) == rows
    # Nor does its page offer the form any more.
    from tests.marketplace.market_helpers import member_client

    page = member_client(m.seller, "member").get(f"/reservations/{term.public_id}")
    assert page.status_code == 200 and 'id="resale-form"' not in page.content.decode()


def test_a_listing_of_a_term_that_is_releasing_is_neither_offered_nor_sold():
    m = market()
    term = _running_term(m)
    lst = listing(m, gpus=4, start_h=48, hours=24)
    # The term ends while its listing is still open (as one listed before this was refused).
    reservation_transition(
        reservation=Reservation.objects.get(pk=term.pk),
        to_status=ReservationStatus.RELEASING,
        cause="ending",
        actor_label="test",
    )
    rows = live_rows(term)
    period = {"starts_at": lst.starts_at, "ends_at": lst.ends_at}

    assert resale_offer_rows(gpu_count=4, tier="on_demand", **period) == []
    with pytest.raises(NotAvailable) as refused:
        buy(m, lst, start_h=24 + 48, hours=24)

    assert refused.value.code == "listing_not_available"
    assert ResaleListing.objects.get(pk=lst.pk).status == ListingStatus.OPEN
    assert not Reservation.objects.filter(organization=m.buyer).exists()
    assert live_rows(term) == rows


def test_withdrawing_a_returned_listing_changes_nothing():
    m = market(starts_at=timezone.now() + timedelta(days=2))
    lst = listing(m, gpus=8, start_h=24, hours=24)
    bought = buy(m, lst)
    reservation_cancel(reservation=bought, actor_label="buyer")  # before the window: returned
    lst.refresh_from_db()
    assert lst.status == ListingStatus.RETURNED
    seller = key_client(m.seller)
    listing_events = Event.objects.filter(type__startswith="listing.").order_by("pk")
    events = list(listing_events.values_list("type", flat=True))

    response = seller.post(f"/api/v1/resale/listings/{lst.public_id}/withdraw")

    assert response.status_code == 200, response.content
    assert (response.json()["status"], response.json()["for_sale"]) == ("returned", False)
    after = ResaleListing.objects.get(pk=lst.pk)
    assert (after.status, after.withdrawn_at, after.buyer_reservation_id) == (
        ListingStatus.RETURNED,
        None,
        bought.pk,
    )
    assert list(listing_events.values_list("type", flat=True)) == events
    assert events[-2:] == ["listing.returned", "listing.created"]  # its window, on sale again
