"""Reads for organisations, members and API keys, always through the organisation."""

from django.db.models import QuerySet

from config.errors import NotFound
from marketplace.models import ApiKey, Membership, Organization

__all__ = [
    "member_list_for_org",
    "member_get_for_org",
    "api_key_list_for_org",
    "api_key_get_for_org",
]


def member_list_for_org(*, organization: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(organization=organization).select_related("user")


def member_get_for_org(*, organization: Organization, public_id: str) -> Membership:
    """`public_id` is mem_<n>; another organisation's member is simply not found."""
    pk = _pk_from_public_id(public_id, "mem")
    membership = member_list_for_org(organization=organization).filter(pk=pk).first()
    if membership is None:
        raise NotFound(f"No member {public_id!r} in this organisation.", code="member_not_found")
    return membership


def api_key_list_for_org(*, organization: Organization) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(organization=organization).select_related("created_by")


def api_key_get_for_org(*, organization: Organization, public_id: str) -> ApiKey:
    pk = _pk_from_public_id(public_id, "key")
    key = api_key_list_for_org(organization=organization).filter(pk=pk).first()
    if key is None:
        raise NotFound(f"No API key {public_id!r} in this organisation.", code="api_key_not_found")
    return key


def _pk_from_public_id(public_id: str, prefix: str) -> int | None:
    head, _, tail = public_id.partition("_")
    if head != prefix or not tail.isdigit() or len(tail) > 18:
        return None
    return int(tail)
