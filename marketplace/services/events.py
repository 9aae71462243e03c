"""The event writer: every event is recorded here, in the caller's transaction (an outbox).

Callers pass the object and the API serializer that shows it, so an event's `data` is the
object exactly as the API showed it at that moment (marketplace/serializers.py holds the ones
used here: it imports no services, so this module imports it at its top). The event's webhook deliveries (one per
subscribed endpoint) are written with it, so an event that commits is delivered at least once. Billing records its events through
event_record too (billing may import the marketplace; the marketplace never imports billing).
"""

from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from rest_framework.serializers import BaseSerializer

from config.db import model_insert
from config.retention import delete_in_batches
from marketplace.models import ApiKey, Event, EventType, Membership, ResaleListing, Reservation
from marketplace.serializers import ApiKeyOutput, ListingOutput, MemberOutput, ReservationOutput
from marketplace.services.webhooks import webhook_deliveries_create, webhook_deliveries_create_many

__all__ = [
    "RESERVATION_STATUS_EVENTS",
    "event_build",
    "event_record",
    "reservation_event_build",
    "reservation_event_record",
    "listing_events_record",
    "api_key_event_record",
    "member_event_record",
    "events_prune",
]

# The status a transition reaches → the event it records (releasing is an inner step).
RESERVATION_STATUS_EVENTS = {
    "scheduled": EventType.RESERVATION_SCHEDULED,
    "provisioning": EventType.RESERVATION_PROVISIONING,
    "active": EventType.RESERVATION_ACTIVE,
    "preempted": EventType.RESERVATION_PREEMPTED,
    "cancelled": EventType.RESERVATION_CANCELLED,
    "completed": EventType.RESERVATION_COMPLETED,
    "failed": EventType.RESERVATION_FAILED,
}


_EVENT_TYPES = frozenset(EventType.values)


def event_build(
    *,
    organization_id: int,
    type: str,
    object_type: str,
    object_id: str,
    obj,
    serializer: type[BaseSerializer],
    context: dict | None = None,
) -> Event:
    """The event for `obj`, shown through the API serializer `serializer` (with `context`),
    not yet saved: event_record saves it; the transition service writes a reservation's in
    the statement that moves it."""
    if type not in _EVENT_TYPES:
        raise ValueError(f"unknown event type {type!r}")
    return Event(
        organization_id=organization_id,
        type=type,
        object_type=object_type,
        object_id=object_id,
        data=dict(serializer(obj, context=context or {}).data),
    )


def event_record(
    *,
    organization_id: int,
    type: str,
    object_type: str,
    object_id: str,
    obj,
    serializer: type[BaseSerializer],
) -> Event:
    """Record one event for `obj`, shown through the API serializer `serializer`."""
    event = event_build(
        organization_id=organization_id,
        type=type,
        object_type=object_type,
        object_id=object_id,
        obj=obj,
        serializer=serializer,
    )
    return _event_save(event)


def _event_save(event: Event) -> Event:
    """Save a built event with its webhook deliveries, together (in the caller's transaction,
    or one of their own)."""
    with transaction.atomic(savepoint=False):
        event = model_insert(event)
        webhook_deliveries_create(event=event)
    return event


def reservation_event_build(*, reservation: Reservation, type: str) -> Event:
    """The reservation's event as the API shows it now, not yet saved."""
    return event_build(
        organization_id=reservation.organization_id,
        type=type,
        object_type="reservation",
        object_id=reservation.public_id,
        obj=reservation,
        serializer=ReservationOutput,
    )


def reservation_event_record(*, reservation: Reservation, type: str) -> Event:
    return _event_save(reservation_event_build(reservation=reservation, type=type))


def listing_events_record(*, events: list[tuple[str, ResaleListing]]) -> list[Event]:
    """Record (type, listing) events of one organisation's listings, in order, with their
    webhook deliveries (its endpoints read once): a sale is the sold listing and the new ones
    of what is left. Recorded as the listing changes, so a sold one has nothing credited yet
    (the buyer is charged as it uses the time): its `sale` shows the price and fee, proceeds 0.
    """
    if not events:
        return []
    (organization_id,) = {listing.organization_id for _, listing in events}
    built = [
        event_build(
            organization_id=organization_id,
            type=type,
            object_type="listing",
            object_id=listing.public_id,
            obj=listing,
            serializer=ListingOutput,
            context={"settled": {}},  # no query for what cannot have been credited yet
        )
        for type, listing in events
    ]
    with transaction.atomic(savepoint=False):
        built = Event.objects.bulk_create(built)
        webhook_deliveries_create_many(events=built)
    return built


def api_key_event_record(*, api_key: ApiKey, type: str) -> Event:
    return event_record(
        organization_id=api_key.organization_id,
        type=type,
        object_type="api_key",
        object_id=api_key.public_id,
        obj=api_key,
        serializer=ApiKeyOutput,
    )


def member_event_record(
    *, membership: Membership, type: str, member_id: int | None = None
) -> Event:
    """`member_id`: the membership's id when the row is already deleted (member.removed)."""
    pk = member_id if member_id is not None else membership.pk
    if membership.pk is None:
        membership.pk = pk  # shown as it was
    return event_record(
        organization_id=membership.organization_id,
        type=type,
        object_type="member",
        object_id=membership.public_id,
        obj=membership,
        serializer=MemberOutput,
    )


def events_prune(*, now: datetime | None = None) -> int:
    """Delete events older than EVENT_RETENTION_DAYS (at least 30), with their webhook
    deliveries and attempts, in batches; returns how many events.

    An organisation's newest event stays, however old: it is where a poller of the forward
    feed stands when nothing has happened since (marketplace.selectors.events), and deleting
    it would make its next poll a 404 though it never stopped polling."""
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.EVENT_RETENTION_DAYS)
    newer = Event.objects.filter(organization_id=OuterRef("organization_id")).filter(
        Q(txid__gt=OuterRef("txid")) | Q(txid=OuterRef("txid"), id__gt=OuterRef("id"))
    )
    return delete_in_batches(Event.objects.filter(Exists(newer), created_at__lt=cutoff))
