"""A buyer of resold time that leaves before its window is over gives the rest back to the
seller's term: the GPUs are the seller's again (no one else can book them), the sale says
what was actually sold, the seller's refund and workload count the returned time as its own."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction
from django.db.models import Sum
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from config.errors import NotAvailable
from marketplace.models import (
    Event,
    ListingStatus,
    ResaleListing,
    Reservation,
    ReservationStatus,
)
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.scheduler import reservations_dispatch_due
from marketplace.provisioning.services import reservation_provision_step, reservation_release_step
from marketplace.selectors.resale import sold_gpu_seconds
from marketplace.services.pricing import period_total
from marketplace.services.resale import resale_return_lock, resale_unused_return
from marketplace.services.reservations import (
    cancellation_terms,
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import make_nodes
from tests.marketplace.resale_helpers import (
    H,
    buy,
    fund,
    listing,
    live_rows,
    market,
    overlapping_live_pairs,
    time_passes,
    time_passes_until,
)

pytestmark = pytest.mark.django_db


def _third_books(m, *, start_h=24, hours=24, gpus=8):
    """A third funded organisation books the term's GPUs for the window from the operator."""
    third = OrganizationFactory()
    fund(third)
    return reservation_create(
        organization=third,
        gpu_model=m.model.slug,
        gpu_count=gpus,
        starts_at=m.start + start_h * H,
        ends_at=m.start + (start_h + hours) * H,
        tier="on_demand",
        site=m.site.slug,
    )


def _term(m) -> Reservation:
    return Reservation.objects.get(pk=m.term.pk)


def _unused_before_start(term: Reservation, *, sold_gpu_hours: int = 0) -> Decimal:
    """What cancelling a term not yet begun counts as unused: all of it but what was sold."""
    hours = int((term.ends_at - term.starts_at).total_seconds()) // 3600
    return period_total(
        price_per_gpu_hour=term.price_per_gpu_hour,
        gpu_count=1,
        seconds=(term.gpu_count * hours - sold_gpu_hours) * 3600,
        currency=term.currency,
    )


def _running_term(m) -> Reservation:
    """The term provisioned now on the simulated driver, a minute after it began."""
    time_passes(timedelta(days=1, minutes=1))
    reservation_provision_step(reservation_id=m.term.pk, driver=SimulatedDriver(), check_window=0)
    term = _term(m)
    assert term.status == ReservationStatus.ACTIVE
    return term


def _dispatch() -> dict:
    counts = reservations_dispatch_due()
    for r in Reservation.objects.filter(status=ReservationStatus.PROVISIONING):
        reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver(), check_window=0)
    return counts


def _running_on(term: Reservation) -> list[int]:
    term.refresh_from_db()
    return sorted(i for n in term.connection.get("nodes", []) for i in n["gpu_indexes"])


def _ledger(org, kind) -> int:
    return (
        LedgerEntry.objects.filter(organization=org, kind=kind).aggregate(s=Sum("amount_minor"))[
            "s"
        ]
        or 0
    )


def test_a_buyer_cancelling_before_the_window_gives_every_gpu_back_to_the_seller():
    m = market()
    lst = listing(m, gpus=8, start_h=24, hours=24)
    bought = buy(m, lst)
    assert cancellation_terms(_term(m)).unused_amount == _unused_before_start(
        _term(m), sold_gpu_hours=8 * 24
    )

    reservation_cancel(reservation=bought, actor_label="buyer", reason="grief")

    lst.refresh_from_db()
    assert (lst.status, lst.buyer_reservation_id) == (ListingStatus.RETURNED, bought.pk)
    assert (lst.starts_at, lst.ends_at) == (m.start + 24 * H, m.start + 48 * H)
    # The seller is told, with the listing as it stands; the buyer hears of its own cancel only.
    (returned,) = Event.objects.filter(type="listing.returned")
    assert returned.organization_id == m.seller.pk and returned.object_id == lst.public_id
    assert returned.data["status"] == "returned"
    assert not Event.objects.filter(organization=m.buyer, type__startswith="listing.").exists()
    # One live row per GPU over the whole term again, as before the sale; no record left.
    term = _term(m)
    assert live_rows(term) == [(i, term.starts_at, term.ends_at) for i in range(8)]
    assert term.allocations.filter(is_live=False).count() == 0
    with pytest.raises(NotAvailable):
        _third_books(m)
    assert sold_gpu_seconds(reservation=term, since=timezone.now()) == 0
    assert cancellation_terms(term).unused_amount == _unused_before_start(term)
    assert _ledger(m.seller, LedgerKind.RESALE_PROCEEDS) == 0
    assert _ledger(m.buyer, LedgerKind.USAGE) == 0
    assert overlapping_live_pairs() == 0
    # Its window has not begun: the time is on sale again as the seller listed it (a buyer
    # booking and cancelling takes nothing off sale), and the seller may withdraw it.
    again = ResaleListing.objects.get(parent=lst)
    assert (again.status, again.gpu_ids, again.starts_at, again.ends_at) == (
        ListingStatus.OPEN,
        lst.gpu_ids,
        lst.starts_at,
        lst.ends_at,
    )
    assert again.price_per_gpu_hour == lst.price_per_gpu_hour and again.tier == lst.tier
    seller_events = Event.objects.filter(organization=m.seller, type__startswith="listing.")
    assert list(seller_events.order_by("pk").values_list("type", "object_id"))[-2:] == [
        ("listing.returned", lst.public_id),
        ("listing.created", again.public_id),
    ]
    second = OrganizationFactory()
    fund(second)
    buy(m, again, org=second)  # and sells
    assert overlapping_live_pairs() == 0


def test_a_buyer_cancelling_part_of_a_listing_gives_back_only_its_gpus_and_window():
    m = market()
    lst = listing(m, gpus=8, start_h=24, hours=24)
    bought = buy(m, lst, gpus=3, start_h=30, hours=6)  # GPUs 0-2, hours 30-36
    rest = list(ResaleListing.objects.filter(parent=lst).values_list("status", flat=True))
    assert rest == [ListingStatus.OPEN] * 3

    reservation_cancel(reservation=bought, actor_label="buyer")

    lst.refresh_from_db()
    assert lst.status == ListingStatus.RETURNED
    # The remainders stay as they were, and the 3 GPUs' hours are listed again beside them.
    again = ResaleListing.objects.filter(parent=lst).order_by("pk")
    assert list(again.values_list("status", flat=True)) == [*rest, ListingStatus.OPEN]
    relisted = again.last()
    assert (relisted.gpu_ids, relisted.starts_at, relisted.ends_at) == (
        lst.gpu_ids,
        lst.starts_at,
        lst.ends_at,
    )
    term = _term(m)
    assert live_rows(term) == [(i, term.starts_at, term.ends_at) for i in range(8)]
    # The open remainders still sell: a second buyer takes hours 30-36 of GPUs 3-7.
    other = OrganizationFactory()
    fund(other)
    remainder = ResaleListing.objects.get(parent=lst, gpu_count=5)
    buy(m, remainder, gpus=5, start_h=30, hours=6, org=other)
    assert overlapping_live_pairs() == 0


def test_a_term_whose_returned_tail_is_extended_keeps_one_row_per_gpu_to_the_new_end():
    m = market()
    lst = listing(m, gpus=2, start_h=7 * 24, hours=24)  # the term's last day
    bought = buy(m, lst, start_h=7 * 24, hours=24)
    reservation_cancel(reservation=bought, actor_label="buyer")
    end = _term(m).ends_at

    reservation_extend(reservation=m.term, new_ends_at=end + 48 * H, actor_label="seller")

    term = _term(m)
    assert term.ends_at == end + 48 * H
    assert live_rows(term) == [(i, term.starts_at, term.ends_at) for i in range(8)]
    assert overlapping_live_pairs() == 0


def test_a_buyer_stopping_mid_window_gives_back_the_rest_and_the_seller_runs_on_it_again():
    m = market()
    lst = listing(m, gpus=3, start_h=26, hours=2)
    bought = buy(m, lst, start_h=26, hours=2)
    term = _running_term(m)
    time_passes_until(ResaleListing.objects.get(pk=lst.pk).starts_at)
    assert _dispatch()["resold"] == 1
    assert _running_on(term) == [3, 4, 5, 6, 7]
    reservation_provision_step(reservation_id=bought.pk, driver=SimulatedDriver(), check_window=0)
    assert Reservation.objects.get(pk=bought.pk).status == ReservationStatus.ACTIVE
    time_passes(timedelta(minutes=30))
    window_end = ResaleListing.objects.get(pk=lst.pk).ends_at

    reservation_cancel(reservation=bought, actor_label="buyer")  # active → releasing
    lst.refresh_from_db()
    assert (lst.status, lst.ends_at) == (ListingStatus.SOLD, window_end)  # still the buyer's
    reservation_release_step(reservation_id=bought.pk, driver=SimulatedDriver(), check_window=0)

    bought.refresh_from_db()
    assert bought.status == ReservationStatus.COMPLETED
    lst.refresh_from_db()
    held_until = max(a.period.upper for a in bought.allocations.all())
    assert lst.status == ListingStatus.SOLD
    assert lst.starts_at < lst.ends_at == held_until < window_end
    term.refresh_from_db()
    for index in (0, 1, 2):  # before the window, and from the buyer's end on: the seller's
        assert [r for r in live_rows(term) if r[0] == index] == [
            (index, term.starts_at, lst.starts_at),
            (index, held_until, term.ends_at),
        ]
    assert sold_gpu_seconds(reservation=term, since=lst.starts_at) == 3 * int(
        (held_until - lst.starts_at).total_seconds()
    )
    # The dispatcher sees the sold window's end and restarts the seller on all its GPUs.
    assert _dispatch()["resold"] == 1
    assert _running_on(term) == list(range(8))
    with pytest.raises(NotAvailable):
        _third_books(m, start_h=27, hours=1, gpus=1)
    # The buyer pays for what it used, and the seller is credited exactly that.
    assert _ledger(m.seller, LedgerKind.RESALE_PROCEEDS) == -_ledger(m.buyer, LedgerKind.USAGE)
    assert overlapping_live_pairs() == 0


def test_a_buyer_whose_window_passes_gives_nothing_back():
    m = market()
    lst = listing(m, gpus=3, start_h=26, hours=2)
    bought = buy(m, lst, start_h=26, hours=2)
    term = _running_term(m)
    time_passes_until(ResaleListing.objects.get(pk=lst.pk).starts_at)
    _dispatch()
    reservation_provision_step(reservation_id=bought.pk, driver=SimulatedDriver(), check_window=0)
    sold = ResaleListing.objects.filter(pk=lst.pk).values_list("status", "starts_at", "ends_at")
    time_passes_until(ResaleListing.objects.get(pk=lst.pk).ends_at)
    before = (list(sold), live_rows(term))

    reservation_release_step(reservation_id=bought.pk, driver=SimulatedDriver(), check_window=0)

    assert Reservation.objects.get(pk=bought.pk).status == ReservationStatus.COMPLETED
    assert (list(sold), live_rows(term)) == before
    assert sold[0][0] == ListingStatus.SOLD
    assert overlapping_live_pairs() == 0


def test_a_term_that_ended_meanwhile_gets_no_gpus_back_but_is_refunded_the_window():
    m = market(starts_at=timezone.now() + timedelta(days=10))
    lst = listing(m, gpus=8, start_h=24, hours=24)
    bought = buy(m, lst)
    reservation_cancel(reservation=m.term, actor_label="seller")  # 10 days' notice: 100 %
    refunds = LedgerEntry.objects.filter(reservation=m.term, kind=LedgerKind.TERM_REFUND)
    assert refunds.aggregate(s=Sum("amount_minor"))["s"] == (
        _unused_before_start(_term(m), sold_gpu_hours=8 * 24) * 100
    )

    reservation_cancel(reservation=bought, actor_label="buyer")

    lst.refresh_from_db()
    assert lst.status == ListingStatus.RETURNED  # no longer sold: nobody pays for it
    assert Event.objects.filter(type="listing.returned", object_id=lst.public_id).exists()
    assert not ResaleListing.objects.filter(parent=lst).exists()  # an ended term lists nothing
    # The window comes back as money, on the terms the term's own refund took: all of it.
    assert refunds.aggregate(s=Sum("amount_minor"))["s"] == _term(m).total_amount * 100
    assert live_rows(_term(m)) == []
    # The GPUs are the operator's again, to sell at its price.
    assert _third_books(m).status == ReservationStatus.PENDING
    assert overlapping_live_pairs() == 0


def test_time_someone_else_holds_meanwhile_is_not_returned_and_nothing_changes():
    m = market()
    make_nodes(m.site, m.model, 1, gpus=8)
    lst = listing(m, gpus=2, start_h=24, hours=24)
    bought = buy(m, lst)
    squatter = _third_books(m, gpus=1)  # on the other node
    gpu = lst.gpu_ids[0]
    with transaction.atomic():
        # As if the buyer had left the GPU and someone else taken it before the buyer ended.
        with connection.cursor() as cur:
            cur.execute(
                "UPDATE marketplace_allocation SET is_live = false WHERE reservation_id = %s",
                [bought.pk],
            )
            cur.execute(
                "INSERT INTO marketplace_allocation (reservation_id, gpu_id, node_id, period,"
                " is_live, created_at) VALUES (%s, %s, %s, tstzrange(%s, %s, '[)'), true, now())",
                [squatter.pk, gpu, m.node.pk, lst.starts_at + H, lst.ends_at],
            )
        rows = sorted(_term(m).allocations.values_list("gpu_id", "period", "is_live"))

        now = timezone.now()
        sale = resale_return_lock(buyer=bought, now=now)
        assert sale is not None
        assert resale_unused_return(listing=sale, now=now) is False

        lst.refresh_from_db()
        assert lst.status == ListingStatus.SOLD
        assert sorted(_term(m).allocations.values_list("gpu_id", "period", "is_live")) == rows
        assert overlapping_live_pairs() == 0
