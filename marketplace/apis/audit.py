"""GET audit-log: who changed what, when and from where (owners and admins)."""

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework import serializers

from config.api.filters import BoundedIsoDateTimeFilter
from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.views import FILTERED, ApiView
from config.dates import iso_utc_within
from config.replica import replica_reads
from marketplace.auth import ApiKeyUser
from marketplace.models import AuditEntry
from marketplace.selectors.audit import audit_list_for_org
from marketplace.services.organizations import MANAGER_ROLES

TAGS = ["Audit log"]


def _emails_masked(value):
    """`changes` with every e-mail address masked (a***@example.com), at any depth."""
    if isinstance(value, dict):
        return {
            k: _mask(v) if k == "email" and isinstance(v, str) else _emails_masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_emails_masked(v) for v in value]
    return value


def _mask(email: str) -> str:
    local, at, domain = email.partition("@")
    return f"{local[:1]}***{at}{domain}"


class AuditEntryOutput(Serializer):
    id = serializers.CharField(source="public_id")
    created_at = serializers.DateTimeField()
    actor = serializers.CharField(help_text="user:<username> or api_key:<prefix>.")
    action = serializers.CharField(help_text="e.g. api_key.create, reservation.cancel.")
    object_type = serializers.CharField()
    object_id = serializers.CharField()
    changes = serializers.JSONField(
        help_text="{before, after} of what changed; never secrets. Read with an API key, "
        "e-mail addresses (invitations) are masked: a leaked key does not tell who is invited."
    )
    ip_address = serializers.IPAddressField(allow_null=True)
    user_agent = serializers.CharField()


class AuditFilter(django_filters.FilterSet):
    actor = django_filters.CharFilter(
        max_length=160, help_text="user:<name>, api_key:<prefix> or staff:<name>."
    )
    action = django_filters.CharFilter(
        max_length=64,
        help_text="An action (api_key.create) or, ending in a dot, a family (api_key.).",
    )
    object_id = django_filters.CharFilter(max_length=64)
    created_after = BoundedIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = BoundedIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = AuditEntry
        fields = ["actor", "action", "object_id", "created_after", "created_before"]

    def filter_queryset(self, queryset):
        action = self.form.cleaned_data.pop("action", "") if self.form.is_valid() else ""
        queryset = super().filter_queryset(queryset)
        if action:
            lookup = "action__startswith" if action.endswith(".") else "action"
            queryset = queryset.filter(**{lookup: action})
        return queryset


class AuditLogApi(ApiView):
    read_roles = MANAGER_ROLES
    write_roles = MANAGER_ROLES
    pagination_class = NewestFirstCursorPagination
    filter_backends = FILTERED
    filterset_class = AuditFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return AuditEntry.objects.none()
        return audit_list_for_org(organization=self.organization)

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="audit_log_list",
        summary="The audit log, newest first (owners and admins)",
        responses={200: AuditEntryOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        data = AuditEntryOutput(page, many=True).data
        for entry in data:  # entries kept before their times were written with "Z"
            entry["changes"] = iso_utc_within(entry["changes"])
        if isinstance(request.user, ApiKeyUser):
            for entry in data:
                entry["changes"] = _emails_masked(entry["changes"])
        return self.get_paginated_response(data)
