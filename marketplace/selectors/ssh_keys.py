"""Reads for an organisation's saved SSH public keys, always through the organisation."""

from django.db.models import QuerySet

from config.errors import NotFound
from marketplace.models import Organization, SshKey

__all__ = ["ssh_key_list_for_org", "ssh_key_get_for_org"]


def ssh_key_list_for_org(*, organization: Organization) -> QuerySet[SshKey]:
    return SshKey.objects.filter(organization=organization).select_related("created_by")


def ssh_key_get_for_org(*, organization: Organization, public_id: str) -> SshKey:
    """`public_id` is ssh_…; another organisation's key is simply not found."""
    key = ssh_key_list_for_org(organization=organization).filter(public_id=public_id).first()
    if key is None:
        raise NotFound(f"No SSH key {public_id!r} in this organisation.", code="ssh_key_not_found")
    return key
