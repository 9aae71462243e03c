"""Reads of an organisation's audit log."""

from django.db.models import QuerySet

from marketplace.models import AuditEntry, Organization

__all__ = ["audit_list_for_org"]


def audit_list_for_org(*, organization: Organization) -> QuerySet[AuditEntry]:
    return AuditEntry.objects.filter(organization=organization)
