"""Reads for organisations, members, invitations and API keys, always through the organisation."""

from django.db import connection
from django.db.models import QuerySet

from config.db import model_columns, model_from_row
from config.errors import NotFound
from marketplace.models import ApiKey, Invitation, Membership, Organization
from marketplace.services.organizations import invitation_token_hash

__all__ = [
    "member_list_for_org",
    "member_get_for_org",
    "api_key_list_for_org",
    "api_key_get_for_org",
    "api_key_by_secret_hash",
    "invitation_list_for_org",
    "invitation_get_for_org",
    "invitation_get_by_token",
]


def member_list_for_org(*, organization: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(organization=organization).select_related("user")


def member_get_for_org(*, organization: Organization, public_id: str) -> Membership:
    """Another organisation's member is simply not found."""
    membership = _by_public_id(member_list_for_org(organization=organization), public_id, "mem")
    if membership is None:
        raise NotFound(f"No member {public_id!r} in this organisation.", code="member_not_found")
    return membership


def api_key_list_for_org(*, organization: Organization) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(organization=organization).select_related("created_by")


def api_key_get_for_org(*, organization: Organization, public_id: str) -> ApiKey:
    key = _by_public_id(api_key_list_for_org(organization=organization), public_id, "key")
    if key is None:
        raise NotFound(f"No API key {public_id!r} in this organisation.", code="api_key_not_found")
    return key


_KEY_BY_HASH_SQL = f"""
SELECT {model_columns(ApiKey, "k")}, {model_columns(Organization, "o")}
FROM marketplace_apikey k JOIN marketplace_organization o ON o.id = k.organization_id
WHERE k.secret_hash = %s
"""


def api_key_by_secret_hash(secret_hash: str) -> ApiKey | None:
    """The key with this hash and its organisation, from one statement (every API call's first).

    The rows select_related("organization") would read, without its compilation (config.db).
    """
    with connection.cursor() as cur:
        cur.execute(_KEY_BY_HASH_SQL, [secret_hash])
        row = cur.fetchone()
    if row is None:
        return None
    split = len(ApiKey._meta.concrete_fields)
    key = model_from_row(ApiKey, row[:split])
    key.organization = model_from_row(Organization, row[split:])
    return key


def invitation_list_for_org(*, organization: Organization) -> QuerySet[Invitation]:
    """Open invitations (neither accepted nor revoked; expired ones included)."""
    return Invitation.objects.filter(
        organization=organization, accepted_at=None, revoked_at=None
    ).select_related("invited_by")


def invitation_get_for_org(*, organization: Organization, public_id: str) -> Invitation:
    """Any of the organisation's invitations, open or not (so revoking twice is harmless)."""
    invitation = (
        Invitation.objects.filter(organization=organization, public_id=public_id)
        .select_related("invited_by")
        .first()
    )
    if invitation is None:
        raise NotFound(
            f"No invitation {public_id!r} in this organisation.", code="invitation_not_found"
        )
    return invitation


def invitation_get_by_token(*, token: str) -> Invitation:
    """The invitation a link's token belongs to, open or not; unknown tokens are not found."""
    token_hash = invitation_token_hash(token)
    invitation = (
        Invitation.objects.filter(token_hash=token_hash)
        .select_related("organization", "invited_by")
        .first()
    )
    if invitation is None:
        raise NotFound("No such invitation.", code="invitation_not_found")
    return invitation


def _by_public_id(queryset: QuerySet, public_id: str, prefix: str):
    """The row with this public id, or None. Until the next release, also the id the row was
    known by before public ids were random (<prefix>_<primary key>), for clients that kept it."""
    found = queryset.filter(public_id=public_id).first()
    if found is not None:
        return found
    head, _, tail = public_id.partition("_")
    if head != prefix or not tail.isdigit() or len(tail) > 18:
        return None
    return queryset.filter(pk=int(tail)).first()
