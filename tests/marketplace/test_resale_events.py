"""Resale listings as events for the seller: listing.created, listing.sold (with the sale's
price and fee) and listing.withdrawn, each written in the transaction of its change, shown as
the resale API shows the listing, delivered to subscribed webhook endpoints, and listed by
GET /api/v1/events for the seller only."""

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection, transaction

from config.errors import Conflict, NotAvailable, PaymentRequired
from marketplace.models import Event, ListingStatus, ResaleListing, Reservation, WebhookDelivery
from marketplace.services.resale import listing_create, listing_withdraw
from marketplace.services.reservations import reservation_cancel, reservation_create
from marketplace.services.webhooks import webhook_endpoint_create
from tests.factories import OrganizationFactory
from tests.marketplace.api_fixtures import fresh_rate_limits, key_client  # noqa: F401
from tests.marketplace.resale_helpers import H, buy, listing, market
from tests.races import run_together, until_a_backend_waits_for_this_one

pytestmark = pytest.mark.django_db


def listing_events(org=None) -> list[Event]:
    events = Event.objects.filter(type__startswith="listing.").order_by("created_at", "id")
    return list(events.filter(organization=org) if org else events)


def shown(client, lst) -> dict:
    response = client.get(f"/api/v1/resale/listings/{lst.public_id}")
    assert response.status_code == 200, response.json()
    return response.json()


def test_listing_time_records_listing_created_for_the_seller_as_the_api_shows_it():
    m = market()
    seller = key_client(m.seller)

    response = seller.post(
        "/api/v1/resale/listings",
        {"reservation": m.term.public_id, "gpu_count": 2, "price_per_gpu_hour": "1.5000",
         "starts_at": (m.start + 24 * H).isoformat(), "ends_at": (m.start + 48 * H).isoformat()},
        format="json",
    )  # fmt: skip

    assert response.status_code == 201, response.json()
    (event,) = listing_events()
    assert (event.organization_id, event.type, event.object_type, event.object_id) == (
        m.seller.pk,
        "listing.created",
        "listing",
        response.json()["id"],
    )
    assert event.data == response.json()
    assert event.data["status"] == "open" and event.data["sale"] is None


def test_a_sale_records_listing_sold_with_its_price_and_fee_and_the_rest_as_new_listings():
    m = market()
    lst = listing(m, gpus=4, start_h=24, hours=24)

    # Two of the four GPUs for ten hours in the middle: what is left is three new listings.
    bought = buy(m, lst, gpus=2, start_h=30, hours=10)

    created, sold, *rest = listing_events(m.seller)
    assert (created.type, created.object_id) == ("listing.created", lst.public_id)
    assert (sold.type, sold.object_type, sold.object_id) == (
        "listing.sold",
        "listing",
        lst.public_id,
    )
    assert sold.data == shown(key_client(m.seller), lst)  # as the seller's API shows the sale
    assert (sold.data["status"], sold.data["gpu_count"], sold.data["for_sale"]) == (
        "sold",
        2,
        False,
    )
    sale = sold.data["sale"]
    # The sale price 1.5 × 2 GPUs × 10 h, the fee fixed now; nothing credited until it is used.
    assert (sale["total"], sale["fee_pct"]) == ("30.00", "10.00")
    assert (sale["proceeds"], sale["fees"], sale["net"]) == ("0.00", "0.00", "0.00")
    assert sale["sold_at"] is not None
    leftovers = ResaleListing.objects.filter(parent=lst).order_by("id")
    assert len(leftovers) == 3
    assert [(e.type, e.object_id, e.organization_id) for e in rest] == [
        ("listing.created", piece.public_id, m.seller.pk) for piece in leftovers
    ]
    assert {(e.data["parent"], e.data["status"]) for e in rest} == {(lst.public_id, "open")}
    assert sorted((e.data["gpu_count"], e.data["starts_at"]) for e in rest) == sorted(
        (piece.gpu_count, shown(key_client(m.seller), piece)["starts_at"]) for piece in leftovers
    )
    # The buyer gets its reservation's event and nothing of the seller's listing.
    assert listing_events(m.buyer) == []
    assert list(Event.objects.filter(organization=m.buyer).values_list("type", "object_id")) == [
        ("reservation.created", bought.public_id)
    ]


def test_a_whole_sale_records_listing_sold_and_no_new_listing():
    m = market()
    lst = listing(m, gpus=4, start_h=24, hours=24)

    buy(m, lst, gpus=4, start_h=24, hours=24)

    assert [(e.type, e.object_id) for e in listing_events()] == [
        ("listing.created", lst.public_id),
        ("listing.sold", lst.public_id),
    ]


def test_a_sale_refused_or_rolled_back_records_no_event():
    m = market()
    lst = listing(m, gpus=4)
    withdrawn = listing(m, gpus=4)
    listing_withdraw(organization=m.seller, listing=withdrawn)
    before = [(e.type, e.object_id) for e in listing_events()]

    with pytest.raises(NotAvailable):
        buy(m, withdrawn, gpus=4, start_h=24, hours=24)
    # An unfunded buyer is refused by the funding gate after the GPUs moved and the listing
    # was marked sold: all of it, the events too, rolls back.
    with pytest.raises(PaymentRequired):
        buy(m, lst, gpus=2, start_h=30, hours=10, org=OrganizationFactory())

    assert [(e.type, e.object_id) for e in listing_events()] == before
    assert ResaleListing.objects.get(pk=lst.pk).status == ListingStatus.OPEN
    assert not WebhookDelivery.objects.exists()


def test_withdrawing_records_listing_withdrawn_once_and_a_sold_listing_none():
    m = market()
    seller = key_client(m.seller)
    lst, sold = listing(m, gpus=4), listing(m, gpus=4)
    buy(m, sold, gpus=4, start_h=24, hours=24)

    first = seller.post(f"/api/v1/resale/listings/{lst.public_id}/withdraw")
    again = seller.post(f"/api/v1/resale/listings/{lst.public_id}/withdraw")
    with pytest.raises(Conflict):
        listing_withdraw(organization=m.seller, listing=sold)

    assert first.status_code == again.status_code == 200
    withdrawals = [e for e in listing_events() if e.type == "listing.withdrawn"]
    assert [(e.object_id, e.organization_id) for e in withdrawals] == [(lst.public_id, m.seller.pk)]
    assert withdrawals[0].data == first.json()
    assert withdrawals[0].data["status"] == "withdrawn" and withdrawals[0].data["withdrawn_at"]


def test_cancelling_the_term_records_listing_withdrawn_for_each_open_listing():
    m = market()
    one, two, sold = listing(m, gpus=2), listing(m, gpus=2), listing(m, gpus=4)
    buy(m, sold, gpus=4, start_h=24, hours=24)
    listing_withdraw(organization=m.seller, listing=two)  # already withdrawn: no second event

    reservation_cancel(reservation=Reservation.objects.get(pk=m.term.pk), actor_label="test")

    withdrawals = [e for e in listing_events() if e.type == "listing.withdrawn"]
    assert [e.object_id for e in withdrawals] == [two.public_id, one.public_id]
    assert withdrawals[1].organization_id == m.seller.pk
    assert withdrawals[1].data == shown(key_client(m.seller), one)
    assert withdrawals[1].data["status"] == "withdrawn"
    assert ResaleListing.objects.get(pk=sold.pk).status == ListingStatus.SOLD


def test_an_endpoint_subscribed_to_listing_sold_gets_a_delivery_of_the_sale_only(settings):
    settings.WEBHOOK_ALLOW_INSECURE = True
    m = market()
    response = key_client(m.seller).post(
        "/api/v1/webhook-endpoints",
        {"url": "http://127.0.0.1:9/hook", "event_types": ["listing.sold"]},
        format="json",
    )
    assert response.status_code == 201, response.json()
    everything, _ = webhook_endpoint_create(
        organization=m.seller, url="http://127.0.0.1:9/all", event_types=[]
    )
    buyers, _ = webhook_endpoint_create(
        organization=m.buyer, url="http://127.0.0.1:9/buyer", event_types=["listing.sold"]
    )
    lst = listing(m, gpus=4)

    buy(m, lst, gpus=2, start_h=30, hours=10)

    sold = Event.objects.get(type="listing.sold")
    subscribed = WebhookDelivery.objects.filter(endpoint__public_id=response.json()["id"])
    assert list(subscribed.values_list("event_id", flat=True)) == [sold.pk]
    # An endpoint taking every type gets the created ones too; the buyer's gets nothing.
    assert WebhookDelivery.objects.filter(endpoint=everything).count() == 5  # 1 + sold + 3
    assert not WebhookDelivery.objects.filter(endpoint=buyers).exists()


def test_the_events_api_lists_listing_events_for_the_seller_and_not_the_buyer():
    m = market()
    lst = listing(m, gpus=4)
    buy(m, lst, gpus=4, start_h=24, hours=24)
    seller, buyer = key_client(m.seller), key_client(m.buyer)

    mine = seller.get("/api/v1/events?type=listing.sold&type=listing.created").json()["results"]
    theirs = buyer.get("/api/v1/events?type=listing.sold").json()["results"]

    assert [(e["type"], e["object_id"]) for e in mine] == [
        ("listing.sold", lst.public_id),
        ("listing.created", lst.public_id),
    ]
    assert mine[0]["organization"] == m.seller.public_id
    assert mine[0]["data"]["object"]["sale"]["total"] == "144.00"  # 1.5 × 4 GPUs × 24 h
    assert theirs == []


def test_the_schema_offers_the_listing_event_types_to_subscribe_to():
    schema = key_client(OrganizationFactory()).get(
        "/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json"
    )
    assert schema.status_code == 200
    enums = [c["enum"] for c in schema.json()["components"]["schemas"].values() if "enum" in c]
    (event_types,) = [e for e in enums if "reservation.created" in e]
    assert {"listing.created", "listing.sold", "listing.withdrawn"} <= set(event_types)


@pytest.mark.django_db(transaction=True)
def test_a_withdrawal_committing_while_the_term_is_cancelled_is_recorded_once():
    """The seller's withdrawal holds the listing (uncommitted) while the cancellation reaches
    it: the cancellation waits for it and then finds the listing no longer open."""
    m = market()
    lst = listing(m, gpus=4)
    term = Reservation.objects.get(pk=m.term.pk)
    withdrawn, cancel_waited = threading.Event(), []

    def withdraw():
        with transaction.atomic():
            listing_withdraw(organization=m.seller, listing=lst)
            withdrawn.set()
            cancel_waited.append(until_a_backend_waits_for_this_one())  # for the listing

    def cancel():
        assert withdrawn.wait(10)
        reservation_cancel(reservation=term, actor_label="test")

    assert run_together(withdraw, cancel) == ["ok", "ok"]
    assert cancel_waited == [True]
    assert [(e.type, e.object_id) for e in listing_events()] == [
        ("listing.created", lst.public_id),
        ("listing.withdrawn", lst.public_id),
    ]
    assert Reservation.objects.get(pk=term.pk).status == "cancelled"


def test_listings_of_a_term_that_failed_are_withdrawn_by_the_sweep_with_their_events():
    from marketplace.services.resale import listings_withdraw_for_ended_terms
    from marketplace.services.transitions import reservation_transition

    m = market(nodes=2)
    other = reservation_create(organization=m.seller, gpu_model=m.model.slug, gpu_count=8,
                               starts_at=m.start, ends_at=m.term.ends_at, tier="reserved",
                               term="1w", site=m.site.slug)  # fmt: skip
    lost = listing(m)
    kept = listing_create(organization=m.seller, reservation=other, gpu_count=4,
                          starts_at=m.start + 24 * H, ends_at=m.start + 48 * H,
                          price_per_gpu_hour=Decimal("1.5000"))  # fmt: skip
    reservation_transition(reservation=m.term, to_status="failed", cause="node lost",
                           actor_label="test")  # fmt: skip

    assert listings_withdraw_for_ended_terms() == 1
    assert listings_withdraw_for_ended_terms() == 0  # once

    lost.refresh_from_db()
    kept.refresh_from_db()
    assert (lost.status, kept.status) == (ListingStatus.WITHDRAWN, ListingStatus.OPEN)
    withdrawn = [e for e in listing_events(m.seller) if e.type == "listing.withdrawn"]
    assert [(e.object_id, e.data["status"]) for e in withdrawn] == [(lost.public_id, "withdrawn")]


def test_a_listing_whose_window_begins_unsold_expires_once_with_its_event():
    from marketplace.services.resale import listings_expire_begun

    m = market()
    seller = key_client(m.seller)
    begun, later, sold = listing(m, gpus=2), listing(m, gpus=2, start_h=48), listing(m, gpus=4)
    buy(m, sold, gpus=4, start_h=24, hours=24)
    window_begins = begun.starts_at + timedelta(seconds=1)

    assert listings_expire_begun(now=begun.starts_at - timedelta(seconds=1)) == 0  # not yet
    assert listings_expire_begun(now=window_begins) == 1
    assert listings_expire_begun(now=window_begins) == 0  # once

    statuses = dict(ResaleListing.objects.values_list("pk", "status"))
    assert (statuses[begun.pk], statuses[later.pk], statuses[sold.pk]) == (
        "expired", "open", "sold",
    )  # fmt: skip
    (event,) = [e for e in listing_events(m.seller) if e.type == "listing.expired"]
    assert event.object_id == begun.public_id
    assert event.data == shown(seller, begun)
    assert event.data["status"] == "expired" and event.data["expired_at"]
    assert event.data["for_sale"] is False
    filtered = seller.get("/api/v1/resale/listings", {"status": "expired"}).json()["results"]
    assert [row["id"] for row in filtered] == [begun.public_id]

    # Off sale for good: a withdrawal leaves it as it is, with no event; a buyer is refused.
    assert seller.post(f"/api/v1/resale/listings/{begun.public_id}/withdraw").json()["status"] == (
        "expired"
    )
    with pytest.raises(NotAvailable) as refused:
        buy(m, ResaleListing.objects.get(pk=begun.pk), gpus=2)
    assert refused.value.code == "listing_not_available"
    assert [e.type for e in listing_events(m.seller)].count("listing.expired") == 1
    assert not [e for e in listing_events(m.seller) if e.type == "listing.withdrawn"]


@pytest.mark.django_db(transaction=True)
def test_the_expiry_sweep_waits_for_a_sale_holding_the_term_and_leaves_it_sold():
    """A buyer's booking holds the seller's term and the listing (as a sale locks them) when
    the window begins: the sweep waits for it, then finds the listing sold, not open."""
    from marketplace.services.resale import listings_expire_begun

    m = market()
    lst = listing(m, gpus=4)
    holding, done, sweep_waited = threading.Event(), threading.Event(), []

    def sale() -> None:
        try:
            with transaction.atomic():
                Reservation.objects.select_for_update().get(pk=m.term.pk)
                holding.set()
                sweep_waited.append(until_a_backend_waits_for_this_one())  # for the term
                buy(m, ResaleListing.objects.get(pk=lst.pk), gpus=4)
        finally:
            connection.close()
            done.set()

    worker = threading.Thread(target=sale)
    worker.start()
    assert holding.wait(10)
    expired = listings_expire_begun(now=lst.starts_at + timedelta(seconds=1))
    worker.join(20)

    assert sweep_waited == [True]
    assert done.is_set() and expired == 0
    assert ResaleListing.objects.get(pk=lst.pk).status == ListingStatus.SOLD
    assert not [e for e in listing_events(m.seller) if e.type == "listing.expired"]
