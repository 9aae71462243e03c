"""The check every service that writes for an organisation makes against a suspension by staff
(services.organizations suspends and lifts it). Its own module, importing no other service, so
the services organizations imports (API keys, SSH keys, webhooks) can make it too."""

from django.db import connection

from config.errors import PermissionDenied
from marketplace.models import Organization

__all__ = [
    "organization_active_check",
    "organization_share_lock",
    "organization_suspended_error",
    "organization_unsuspended_lock",
]


def organization_suspended_error(organization: Organization) -> PermissionDenied:
    return PermissionDenied(
        f"This organisation is suspended by Switchyard staff: {organization.suspension_reason} "
        "Nothing can be booked, extended, topped up or changed until the suspension is lifted; "
        "contact support.",
        code="organization_suspended",
    )


_ORGANIZATION_SHARE_SQL = """
SELECT id, name, suspended_at, suspension_reason FROM marketplace_organization
WHERE id = %s FOR SHARE
"""


def organization_share_lock(*, organization_id: int) -> Organization | None:
    """The organisation's row (name and suspension only) read FOR SHARE until the caller's
    transaction ends: a suspension being written waits for that transaction to commit, and one
    that committed first is seen. None if there is no such organisation."""
    with connection.cursor() as cur:
        cur.execute(_ORGANIZATION_SHARE_SQL, [organization_id])
        row = cur.fetchone()
    if row is None:
        return None
    return Organization(pk=row[0], name=row[1], suspended_at=row[2], suspension_reason=row[3])


def organization_active_check(*, organization_id: int) -> None:
    """Refuse (403 organization_suspended) what a suspended organisation may not do, under its
    row read FOR SHARE (organization_share_lock): a suspension being written waits for the
    booking (or top-up) to commit, and one that committed first is seen."""
    organization = organization_share_lock(organization_id=organization_id)
    if organization is not None and organization.suspended_at is not None:
        raise organization_suspended_error(organization)


def organization_unsuspended_lock(*, organization_id: int) -> None:
    """Lock the organisation's row FOR NO KEY UPDATE (the rows that reference it, a booking's
    among them, still take their key share), so what is counted under it (keys, endpoints) is
    counted one request after the other; and refuse (403 organization_suspended) if staff
    suspended it: a suspension committed first is seen, one being written waits for this."""
    organization = (
        Organization.objects.select_for_update(no_key=True)
        .only("name", "suspended_at", "suspension_reason")
        .filter(pk=organization_id)
        .first()
    )
    if organization is not None and organization.suspended_at is not None:
        raise organization_suspended_error(organization)
