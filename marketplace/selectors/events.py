"""Reads of an organisation's events.

Two orders. Newest first by `created_at`, for browsing. And the forward feed a poller follows
(`event_feed_for_org`): by the writing transaction's id, and only the events whose transaction
is older than every transaction still in flight. An event becomes visible at its transaction's
COMMIT, not when it was stamped, so a poll by `created_at` can return a later event while an
earlier-stamped one is still uncommitted, and move past it for good. In the feed, any event
not visible yet has a txid at or above the snapshot's xmin, so it sorts after everything the
feed has already returned: a poller continuing from the last event it got misses nothing.
"""

from collections.abc import Collection, Iterator
from contextlib import contextmanager

from django.db import DEFAULT_DB_ALIAS, connections, transaction
from django.db.models import Q, QuerySet

from config.errors import NotFound
from config.replica import primary_reads, read_alias
from marketplace.models import Event, Organization
from marketplace.models.events import SnapshotXmin

__all__ = [
    "event_list_for_org",
    "event_get_for_org",
    "event_feed_for_org",
    "event_feed_head",
    "event_feed_position",
    "event_feed_snapshot",
]


def event_list_for_org(
    *, organization: Organization, hidden_types: Collection[str] = ()
) -> QuerySet[Event]:
    """`hidden_types`: the types the caller may not see (events about objects it may not list)."""
    events = Event.objects.filter(organization=organization)
    return events.exclude(type__in=hidden_types) if hidden_types else events


def event_get_for_org(
    *, organization: Organization, public_id: str, hidden_types: Collection[str] = ()
) -> Event:
    events = event_list_for_org(organization=organization, hidden_types=hidden_types)
    event = events.filter(public_id=public_id).first()
    if event is None:
        raise NotFound(f"No event {public_id!r} in this organisation.", code="event_not_found")
    return event


def event_feed_position(*, organization: Organization, public_id: str) -> Event:
    """The event a forward poll continues after. A poller may have been given it by the
    primary while this request reads a replica that has not replayed it yet: then it is
    looked up on the primary (the feed itself still reads the replica, by value, and returns
    nothing the replica cannot yet show). Any event of the organisation, including one of a
    type the caller may not see: the head a caught-up poller is moved on to can be one."""
    try:
        return event_get_for_org(organization=organization, public_id=public_id)
    except NotFound:
        if read_alias(Event) == DEFAULT_DB_ALIAS:
            raise
    with primary_reads():
        return event_get_for_org(organization=organization, public_id=public_id)


def event_feed_for_org(
    *,
    organization: Organization,
    after: Event | None = None,
    upto: Event | None = None,
    hidden_types: Collection[str] = (),
) -> QuerySet[Event]:
    """The organisation's settled events, by (txid, id), strictly after `after` (None: from
    the oldest kept) and, with `upto` (the feed's head, event_feed_head), not past it.

    The xmin check is part of the statement that reads the rows, so it is the snapshot of
    that statement, on that connection (primary or replica), that decides what is settled."""
    events = event_list_for_org(organization=organization, hidden_types=hidden_types)
    events = events.filter(txid__lt=SnapshotXmin())
    if after is not None:
        # (txid, id) > (after.txid, after.id); the txid bound lets the index range-scan.
        events = events.filter(Q(txid__gt=after.txid) | Q(id__gt=after.pk), txid__gte=after.txid)
    if upto is not None:
        events = events.filter(Q(txid__lt=upto.txid) | Q(id__lte=upto.pk), txid__lte=upto.txid)
    return events.order_by("txid", "id")


def event_feed_head(*, organization: Organization, using: str) -> Event | None:
    """The organisation's last settled event, whatever a poller's filters match: where a
    caught-up poller stands. Everything not settled yet sorts after it (its txid is at or
    above the snapshot's xmin, which this event's is below), so a poller moved on to it past
    events its filters skipped misses nothing, and its position is an event that stays kept
    (an organisation's newest event is never pruned: events_prune). Also one of a type the
    poller may not see, for that reason: its id is a position, the event is never shown."""
    return (
        event_list_for_org(organization=organization)
        .using(using)
        .filter(txid__lt=SnapshotXmin())
        .order_by("-txid", "-id")
        .first()
    )


@contextmanager
def event_feed_snapshot() -> Iterator[str]:
    """The database alias a feed page reads, inside one REPEATABLE READ transaction there, so
    its head and its page see one snapshot (read apart, events settling in between could pass
    the page and the head alike: skipped). Inside a transaction already open on that
    connection, that transaction's own isolation decides."""
    alias = read_alias(Event)
    connection = connections[alias]
    if connection.in_atomic_block:
        yield alias
        return
    with transaction.atomic(using=alias):
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield alias
