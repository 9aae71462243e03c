"""Webhook endpoints (owners and admins): register, change, rotate the secret, delete; their
deliveries with every attempt, and resend."""

import django_filters
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.views import FILTERED, ApiView, validated_input
from marketplace.apis.events import (
    event_families_hidden,
    event_types_check_asked,
    event_types_hidden,
)
from marketplace.models import (
    ApiKeyScope,
    DeliveryStatus,
    EventType,
    WebhookDelivery,
    WebhookEndpoint,
)
from marketplace.selectors.webhooks import (
    webhook_delivery_get_for_org,
    webhook_delivery_list_for_endpoint,
    webhook_endpoint_get_for_org,
    webhook_endpoint_list_for_org,
)
from marketplace.services.organizations import MANAGER_ROLES
from marketplace.services.webhooks import (
    webhook_delivery_resend,
    webhook_endpoint_create,
    webhook_endpoint_delete,
    webhook_endpoint_rotate_secret,
    webhook_endpoint_update,
)

TAGS = ["Webhooks"]


class WebhookEndpointOutput(Serializer):
    id = serializers.CharField(source="public_id")
    url = serializers.URLField()
    description = serializers.CharField()
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=EventType.choices), help_text="Empty: every type."
    )
    withheld_event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=EventType.choices),
        help_text="Never sent to it, whatever event_types says: its event types, URL or secret "
        "were set by a caller who may not see these (an API key: api_key.*). Setting "
        "event_types signed in as an owner or admin clears it.",
    )
    enabled = serializers.BooleanField()
    disabled_reason = serializers.CharField(help_text="Why it was disabled, if it was.")
    failing_since = serializers.DateTimeField(allow_null=True)
    last_success_at = serializers.DateTimeField(allow_null=True)
    previous_secret_expires_at = serializers.DateTimeField(
        allow_null=True,
        help_text="When the last replaced secret stops signing (after a rotation); null: none "
        "signs. previous_secrets_expire_at gives each.",
    )
    previous_secrets_expire_at = serializers.ListField(
        child=serializers.DateTimeField(),
        source="previous_secret_expiries",
        help_text="When each replaced secret that still signs stops, oldest first: every "
        "rotation keeps its own overlap.",
    )
    created_at = serializers.DateTimeField()


class WebhookEndpointSecretOutput(WebhookEndpointOutput):
    secret = serializers.CharField(
        allow_null=True,
        help_text="The signing secret (whsec_…). Shown once: store it now. Null in an "
        "idempotent replay, because secrets are never stored for replays.",
    )


class WebhookEndpointCreateInput(Serializer):
    url = serializers.URLField(max_length=2000)
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=EventType.choices),
        default=list,
        max_length=len(EventType.values),
        help_text="The event types to send; empty or absent: every type the caller may see "
        "(an API key: all but api_key.*, which it may not name: 403).",
    )
    description = serializers.CharField(max_length=200, required=False, allow_blank=True)
    enabled = serializers.BooleanField(default=True)


class WebhookEndpointUpdateInput(Serializer):
    url = serializers.URLField(max_length=2000, required=False)
    event_types = serializers.ListField(
        child=serializers.ChoiceField(choices=EventType.choices),
        required=False,
        max_length=len(EventType.values),
        help_text="Replaces the list, as on registering (an API key may not name api_key.*).",
    )
    description = serializers.CharField(max_length=200, required=False, allow_blank=True)
    enabled = serializers.BooleanField(
        required=False, help_text="true again after a disable: failures are counted afresh."
    )


class WebhookEndpointRotateInput(Serializer):
    expire_previous = serializers.BooleanField(
        default=False,
        help_text="true (a leaked secret): every replaced secret stops signing now, instead of "
        "at the end of its overlap.",
    )


class WebhookAttemptOutput(Serializer):
    at = serializers.DateTimeField()
    duration_ms = serializers.IntegerField()
    succeeded = serializers.BooleanField()
    response_status = serializers.IntegerField(allow_null=True)
    response_excerpt = serializers.CharField(help_text="At most the first 1000 bytes.")
    error = serializers.CharField()


class WebhookDeliveryOutput(Serializer):
    id = serializers.CharField(source="public_id")
    endpoint = serializers.CharField(source="endpoint.public_id")
    event = serializers.CharField(source="event.public_id")
    event_type = serializers.CharField(source="event.type")
    event_created = serializers.DateTimeField(source="event_created_at")
    status = serializers.ChoiceField(choices=DeliveryStatus.choices)
    attempt_count = serializers.IntegerField(source="attempts")
    next_attempt_at = serializers.DateTimeField(allow_null=True)
    attempts = WebhookAttemptOutput(many=True, source="attempt_set")


class _WebhookManagement(ApiView):
    read_roles = MANAGER_ROLES
    write_roles = MANAGER_ROLES
    # Endpoints and deliveries (with the receivers' answers) are for those who manage them.
    key_read_scope = ApiKeyScope.WRITE

    def endpoint(self) -> WebhookEndpoint:
        return webhook_endpoint_get_for_org(
            organization=self.organization, public_id=self.kwargs["endpoint_id"]
        )

    def withheld_families(self, *, asked: list[str] | None = None) -> list[str]:
        """The event families the caller may not see (as GET events hides them), which an
        endpoint it sets up withholds; subscribing to one of their types by name is refused
        (403), as asking GET events for it is."""
        hidden = event_types_hidden(self.org_context)
        event_types_check_asked(asked or [], hidden=hidden, field="event_types")
        return sorted(event_families_hidden(self.org_context))


class WebhookEndpointListApi(_WebhookManagement):
    pagination_class = NewestFirstCursorPagination
    idempotency_redacted_fields = ("secret",)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return WebhookEndpoint.objects.none()
        return webhook_endpoint_list_for_org(organization=self.organization)

    @extend_schema(
        tags=TAGS,
        operation_id="webhook_endpoints_list",
        summary="List webhook endpoints (secrets are never shown again)",
        responses={200: WebhookEndpointOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        return self.paginated_response(self.get_queryset(), WebhookEndpointOutput)

    @extend_schema(
        tags=TAGS,
        operation_id="webhook_endpoints_create",
        summary="Register a webhook endpoint; the response carries its signing secret, once",
        request=WebhookEndpointCreateInput,
        responses={201: WebhookEndpointSecretOutput, **errors(400, 403, 404, 409, 415, 422)},
    )
    def post(self, request):
        data = validated_input(WebhookEndpointCreateInput, request.data)
        endpoint, secret = webhook_endpoint_create(
            organization=self.organization,
            url=data["url"],
            event_types=data["event_types"],
            description=data.get("description", ""),
            enabled=data["enabled"],
            created_by=self.org_context.user,
            withheld_families=self.withheld_families(asked=data["event_types"]),
        )
        endpoint.secret = secret
        return Response(WebhookEndpointSecretOutput(endpoint).data, status=status.HTTP_201_CREATED)


class WebhookEndpointDetailApi(_WebhookManagement):
    @extend_schema(
        tags=TAGS,
        operation_id="webhook_endpoints_retrieve",
        summary="Retrieve a webhook endpoint",
        responses={200: WebhookEndpointOutput, **errors(403, 404)},
    )
    def get(self, request, endpoint_id: str):
        return Response(WebhookEndpointOutput(self.endpoint()).data)

    @extend_schema(
        tags=TAGS,
        operation_id="webhook_endpoints_update",
        summary="Change the URL, event types, description, or enable/disable",
        request=WebhookEndpointUpdateInput,
        responses={200: WebhookEndpointOutput, **errors(400, 403, 404, 415)},
    )
    def patch(self, request, endpoint_id: str):
        data = validated_input(WebhookEndpointUpdateInput, request.data)
        withheld = self.withheld_families(asked=data.get("event_types"))
        endpoint = webhook_endpoint_update(
            endpoint=self.endpoint(), **data, withheld_families=withheld
        )
        return Response(WebhookEndpointOutput(endpoint).data)

    @extend_schema(
        tags=TAGS,
        operation_id="webhook_endpoints_destroy",
        summary="Delete a webhook endpoint (what was still to be sent to it is dropped)",
        request=None,
        responses={204: OpenApiResponse(description="Deleted."), **errors(403, 404)},
    )
    def delete(self, request, endpoint_id: str):
        webhook_endpoint_delete(endpoint=self.endpoint())
        return Response(status=status.HTTP_204_NO_CONTENT)


class WebhookEndpointRotateApi(_WebhookManagement):
    idempotency_redacted_fields = ("secret",)

    @extend_schema(
        tags=TAGS,
        operation_id="webhook_endpoints_rotate_secret",
        summary="Rotate the signing secret; the old one keeps signing for the overlap period",
        request=WebhookEndpointRotateInput,
        responses={200: WebhookEndpointSecretOutput, **errors(400, 403, 404, 409, 415, 422)},
    )
    def post(self, request, endpoint_id: str):
        data = validated_input(WebhookEndpointRotateInput, request.data)
        endpoint, secret = webhook_endpoint_rotate_secret(
            endpoint=self.endpoint(),
            expire_previous=data["expire_previous"],
            withheld_families=self.withheld_families(),
        )
        endpoint.secret = secret
        return Response(WebhookEndpointSecretOutput(endpoint).data)


class WebhookDeliveryFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=DeliveryStatus.choices)

    class Meta:
        model = WebhookDelivery
        fields = ["status"]


class WebhookDeliveryListApi(_WebhookManagement):
    pagination_class = NewestFirstCursorPagination
    filter_backends = FILTERED
    filterset_class = WebhookDeliveryFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return WebhookDelivery.objects.none()
        # A caller sees no delivery of an event it may not see (one made before a key took the
        # endpoint over), as GET events shows it none.
        return webhook_delivery_list_for_endpoint(
            endpoint=self.endpoint(), hidden_types=event_types_hidden(self.org_context)
        )

    @extend_schema(
        tags=TAGS,
        operation_id="webhook_deliveries_list",
        summary="An endpoint's deliveries, newest first, each with its attempts",
        responses={200: WebhookDeliveryOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request, endpoint_id: str):
        return self.paginated_response(
            self.filter_queryset(self.get_queryset()), WebhookDeliveryOutput
        )


class WebhookDeliveryResendApi(_WebhookManagement):
    @extend_schema(
        tags=TAGS,
        operation_id="webhook_deliveries_resend",
        summary="Send a delivery's event again now (retried as a new delivery would be)",
        request=None,
        responses={202: WebhookDeliveryOutput, **errors(403, 404, 409, 422)},
    )
    def post(self, request, delivery_id: str):
        hidden = event_types_hidden(self.org_context)
        delivery = webhook_delivery_get_for_org(
            organization=self.organization, public_id=delivery_id, hidden_types=hidden
        )
        delivery = webhook_delivery_resend(delivery=delivery)
        fresh = webhook_delivery_get_for_org(
            organization=self.organization, public_id=delivery.public_id, hidden_types=hidden
        )
        return Response(WebhookDeliveryOutput(fresh).data, status=status.HTTP_202_ACCEPTED)
