"""API plumbing shared by every app: the one error shape.

Every error response is {"error": {"type", "code", "field", "message"}}; validation failures
that name several fields also carry "errors", one entry per field. A field inside a list is
named with dots and the item's index, e.g. "workload.ports.0" or "gpus.1.index".
"""

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from drf_spectacular.utils import OpenApiResponse, inline_serializer
from rest_framework import exceptions, serializers, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from config.api.serializers import Serializer
from config.errors import ApplicationError

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    406: "invalid_request_error",
    409: "conflict_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(*, type: str, code: str, message: str, field: str | None = None) -> dict:
    return {"error": {"type": type, "code": code, "field": field, "message": message}}


def _flatten(detail, prefix: str = "") -> list[tuple[str | None, str, str]]:
    """Turn DRF's nested ValidationError detail into (field, code, message) triples."""
    if isinstance(detail, dict):
        items = []
        for key, value in detail.items():
            name = (
                None if key == "non_field_errors" else (f"{prefix}.{key}" if prefix else str(key))
            )
            items.extend(_flatten(value, name or prefix))
        return items
    if isinstance(detail, list):
        items = []
        for index, value in enumerate(detail):
            sub = f"{prefix}.{index}" if isinstance(value, dict | list) else prefix
            items.extend(_flatten(value, sub))
        return items
    code = getattr(detail, "code", "invalid") or "invalid"
    return [(prefix or None, str(code), str(detail))]


def exception_handler(exc, context):
    if isinstance(exc, ApplicationError):
        return Response({"error": exc.as_dict()}, status=exc.status_code)
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(
            exc.message_dict if hasattr(exc, "error_dict") else exc.messages
        )
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    if isinstance(exc, DjangoPermissionDenied):
        exc = exceptions.PermissionDenied()

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # an unexpected exception: let Django log it and answer 500

    status_code = response.status_code
    error_type = _TYPE_BY_STATUS.get(status_code, "api_error")
    if isinstance(exc, exceptions.ValidationError):
        errors = _flatten(exc.detail)
        field, code, message = errors[0] if errors else (None, "invalid", "Invalid request.")
        body = error_body(type=error_type, code=code, field=field, message=message)
        if len(errors) > 1:
            body["error"]["errors"] = [{"field": f, "code": c, "message": m} for f, c, m in errors]
    else:
        code = exc.get_codes() if isinstance(exc, exceptions.APIException) else "error"
        if not isinstance(code, str):
            code = "error"
        detail = exc.detail if isinstance(exc, exceptions.APIException) else str(exc)
        body = error_body(type=error_type, code=code, message=str(detail))
    response.data = body
    if status_code == status.HTTP_429_TOO_MANY_REQUESTS and isinstance(exc, exceptions.Throttled):
        response.data["error"]["retry_after"] = exc.wait
    return response


# --- the error shape in the OpenAPI schema ------------------------------------------------


class _ErrorObjectSerializer(Serializer):
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


class ErrorSerializer(Serializer):
    error = _ErrorObjectSerializer()


_AGENT_DESCRIPTIONS = {
    400: "Invalid request body (see error.code and error.field).",
    401: "Missing, unknown or revoked node token.",
    404: "No such job for this node.",
    409: "The job is finished, or this lease is no longer the job's lease.",
    415: "Only application/json bodies are accepted.",
    429: "The node's agent is over AGENT_THROTTLE_RATE (rate_limited), or its address over "
    "AUTH_FAILURE_RATE (too_many_failed_authentications): wait the Retry-After seconds.",
}


def agent_errors(*statuses: int) -> dict[int, OpenApiResponse]:
    """Error responses of the site-agent endpoints (node token); 400, 401, 415 and 429 apply
    to all."""
    wanted = sorted({400, 401, 415, 429, *statuses})
    return {s: OpenApiResponse(ErrorSerializer, description=_AGENT_DESCRIPTIONS[s]) for s in wanted}
