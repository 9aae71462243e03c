"""GET/POST api-keys; POST api-keys/{id}/revoke. Owners and admins, signed in (not by key)."""

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api.filters import StrictBooleanFilter
from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.views import FILTERED, ApiView, validated_input
from marketplace.models import ApiKey, ApiKeyScope
from marketplace.selectors.organizations import api_key_get_for_org, api_key_list_for_org
from marketplace.serializers import ApiKeyOutput
from marketplace.services.api_keys import api_key_create, api_key_revoke
from marketplace.services.organizations import MANAGER_ROLES

TAGS = ["API keys"]


class ApiKeyCreatedOutput(ApiKeyOutput):
    secret = serializers.CharField(
        allow_null=True,
        help_text="The key itself. Shown once: store it now. Null in an idempotent replay, "
        "because secrets are never stored.",
    )


class ApiKeyCreateInput(Serializer):
    name = serializers.CharField(max_length=120)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=ApiKeyScope.choices),
        min_length=1,
        default=[ApiKeyScope.READ, ApiKeyScope.WRITE],
        help_text="read: GET only. write: everything a member can do (includes read), except "
        "moving money. billing: save, remove and choose cards, top up, change billing settings "
        "(not implied by write; only an owner can grant it). grid: push power prices for any "
        "price zone (only staff can grant it). Default: read and write.",
    )


class ApiKeyFilter(django_filters.FilterSet):
    revoked = StrictBooleanFilter(field_name="revoked_at", lookup_expr="isnull", exclude=True)

    class Meta:
        model = ApiKey
        fields = ["revoked"]


class _KeyManagement(ApiView):
    read_roles = MANAGER_ROLES
    write_roles = MANAGER_ROLES
    keys_may_write = False
    keys_allowed = False


class ApiKeyListApi(_KeyManagement):
    pagination_class = NewestFirstCursorPagination
    filter_backends = FILTERED
    filterset_class = ApiKeyFilter
    idempotency_redacted_fields = ("secret",)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ApiKey.objects.none()
        return api_key_list_for_org(organization=self.organization)

    @extend_schema(
        tags=TAGS,
        operation_id="api_keys_list",
        summary="List API keys (secrets are never shown again)",
        responses={200: ApiKeyOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        return self.paginated_response(self.filter_queryset(self.get_queryset()), ApiKeyOutput)

    @extend_schema(
        tags=TAGS,
        operation_id="api_keys_create",
        summary="Create an API key; the response carries its secret, once",
        request=ApiKeyCreateInput,
        responses={201: ApiKeyCreatedOutput, **errors(400, 403, 404, 409, 415, 422)},
    )
    def post(self, request):
        data = validated_input(ApiKeyCreateInput, request.data)
        key, secret = api_key_create(
            organization=self.organization,
            name=data["name"],
            scopes=data["scopes"],
            created_by=self.org_context.user,
        )
        key.secret = secret
        return Response(ApiKeyCreatedOutput(key).data, status=status.HTTP_201_CREATED)


class ApiKeyRevokeApi(_KeyManagement):
    @extend_schema(
        tags=TAGS,
        operation_id="api_keys_revoke",
        summary="Revoke an API key; it stops working at once (revoking twice is harmless)",
        request=None,
        responses={200: ApiKeyOutput, **errors(403, 404, 409, 422)},
    )
    def post(self, request, key_id: str):
        key = api_key_get_for_org(organization=self.organization, public_id=key_id)
        return Response(ApiKeyOutput(api_key_revoke(api_key=key)).data)
