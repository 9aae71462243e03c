"""Reads of an organisation's events.

Two orders. Newest first by `created_at`, for browsing. And the forward feed a poller follows
(`event_feed_for_org`): by the writing transaction's id, and only the events whose transaction
is older than every transaction still in flight. An event becomes visible at its transaction's
COMMIT, not when it was stamped, so a poll by `created_at` can return a later event while an
earlier-stamped one is still uncommitted, and move past it for good. In the feed, any event
not visible yet has a txid at or above the snapshot's xmin, so it sorts after everything the
feed has already returned: a poller continuing from the last event it got misses nothing.
"""

from django.db import DEFAULT_DB_ALIAS
from django.db.models import Q, QuerySet

from config.errors import NotFound
from config.replica import primary_reads, read_alias
from marketplace.models import Event, Organization
from marketplace.models.events import SnapshotXmin

__all__ = ["event_list_for_org", "event_get_for_org", "event_feed_for_org", "event_feed_position"]


def event_list_for_org(*, organization: Organization) -> QuerySet[Event]:
    return Event.objects.filter(organization=organization)


def event_get_for_org(*, organization: Organization, public_id: str) -> Event:
    event = event_list_for_org(organization=organization).filter(public_id=public_id).first()
    if event is None:
        raise NotFound(f"No event {public_id!r} in this organisation.", code="event_not_found")
    return event


def event_feed_position(*, organization: Organization, public_id: str) -> Event:
    """The event a forward poll continues after. A poller may have been given it by the
    primary while this request reads a replica that has not replayed it yet: then it is
    looked up on the primary (the feed itself still reads the replica, by value, and returns
    nothing the replica cannot yet show)."""
    try:
        return event_get_for_org(organization=organization, public_id=public_id)
    except NotFound:
        if read_alias(Event) == DEFAULT_DB_ALIAS:
            raise
    with primary_reads():
        return event_get_for_org(organization=organization, public_id=public_id)


def event_feed_for_org(
    *, organization: Organization, after: Event | None = None
) -> QuerySet[Event]:
    """The organisation's settled events, by (txid, id), strictly after `after` (None: from
    the oldest kept).

    The xmin check is part of the statement that reads the rows, so it is the snapshot of
    that statement, on that connection (primary or replica), that decides what is settled."""
    events = event_list_for_org(organization=organization).filter(txid__lt=SnapshotXmin())
    if after is not None:
        # (txid, id) > (after.txid, after.id); the txid bound lets the index range-scan.
        events = events.filter(Q(txid__gt=after.txid) | Q(id__gt=after.pk), txid__gte=after.txid)
    return events.order_by("txid", "id")
