"""Reads of an organisation's events."""

from django.db.models import QuerySet

from config.errors import NotFound
from marketplace.models import Event, Organization

__all__ = ["event_list_for_org", "event_get_for_org"]


def event_list_for_org(*, organization: Organization) -> QuerySet[Event]:
    return Event.objects.filter(organization=organization)


def event_get_for_org(*, organization: Organization, public_id: str) -> Event:
    event = event_list_for_org(organization=organization).filter(public_id=public_id).first()
    if event is None:
        raise NotFound(f"No event {public_id!r} in this organisation.", code="event_not_found")
    return event
