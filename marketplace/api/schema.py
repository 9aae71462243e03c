"""OpenAPI pieces shared by every endpoint: the Bearer key scheme and the error object."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, inline_serializer
from rest_framework import serializers

__all__ = [
    "ApiAutoSchema",
    "ApiKeyScheme",
    "ErrorSerializer",
    "errors",
    "IDEMPOTENCY_KEY_PARAMETER",
    "ORGANIZATION_PARAMETER",
]


class ApiKeyScheme(OpenApiAuthenticationExtension):
    target_class = "marketplace.auth.ApiKeyAuthentication"
    name = "ApiKeyAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "sy_live_<prefix>_<secret>",
            "description": "An organisation API key in the Authorization header. Keys in the "
            "URL are refused with 400 api_key_in_url.",
        }


class _ErrorObjectSerializer(serializers.Serializer):
    type = serializers.ChoiceField(
        choices=[
            "invalid_request_error",
            "authentication_error",
            "permission_error",
            "not_found_error",
            "conflict_error",
            "rate_limit_error",
            "payment_error",
            "api_error",
        ]
    )
    code = serializers.CharField(help_text="Machine-readable, e.g. not_available, last_owner.")
    field = serializers.CharField(allow_null=True, help_text="The input at fault, if any.")
    message = serializers.CharField(help_text="For humans; may change.")
    errors = inline_serializer(
        name="FieldError",
        fields={
            "field": serializers.CharField(allow_null=True),
            "code": serializers.CharField(),
            "message": serializers.CharField(),
        },
        many=True,
        required=False,
        help_text="Every failing field, when a validation error names several.",
    )
    retry_after = serializers.IntegerField(required=False, help_text="On 429, in seconds.")


class ErrorSerializer(serializers.Serializer):
    error = _ErrorObjectSerializer()


_DESCRIPTIONS = {
    400: "Invalid request (see error.code and error.field).",
    401: "Missing, unknown or revoked API key.",
    402: "Payment required (balance or spend limit).",
    403: "Authenticated, but the key's scope or the member's role does not allow this.",
    404: "No such object in your organisation.",
    409: "Conflict: the action is not allowed in the object's current state, or the capacity "
    "was taken, or the Idempotency-Key is in use.",
    415: "Only application/json bodies are accepted.",
    422: "Idempotency-Key reused with a different request.",
    429: "Rate limit exceeded; see Retry-After.",
}


def errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """Error responses for extend_schema(responses=…); 401 and 429 apply everywhere."""
    wanted = sorted({401, 429, *statuses})
    return {s: OpenApiResponse(ErrorSerializer, description=_DESCRIPTIONS[s]) for s in wanted}


IDEMPOTENCY_KEY_PARAMETER = OpenApiParameter(
    name="Idempotency-Key",
    type=OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    required=False,
    description="Any unique string up to 255 characters (a UUID is good). Retrying with the "
    "same key and body returns the first response (header Idempotent-Replayed: true) instead "
    "of repeating the action. Keys expire after 24 hours.",
)

ORGANIZATION_PARAMETER = OpenApiParameter(
    name="Sy-Organization",
    type=OpenApiTypes.STR,
    location=OpenApiParameter.HEADER,
    required=False,
    description="Session calls only: the organisation (org_…) to act for. Without it, your "
    "oldest membership. API keys always act for their own organisation.",
)


class ApiAutoSchema(AutoSchema):
    """Documents what the base view does for every endpoint, so views need not repeat it."""

    def get_override_parameters(self):
        parameters = list(super().get_override_parameters())
        if self.method == "POST":
            parameters.append(IDEMPOTENCY_KEY_PARAMETER)
        if getattr(self.view, "requires_organization", False):
            parameters.append(ORGANIZATION_PARAMETER)
        return parameters
