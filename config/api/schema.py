"""OpenAPI pieces shared by every endpoint: the Bearer key scheme and the error object."""

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse

from config.api.errors import ErrorSerializer

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
            "URL are refused with 400 api_key_in_url. A key carries scopes: read (GET), write "
            "(everything a member can do, including read, except moving money) and billing "
            "(saving, removing and choosing cards, top-ups, billing settings; never implied "
            "by write, granted only by an owner, off by default); grid (pushing power prices "
            "for price zones, granted only by staff). Each operation names the "
            "scope it needs in its description and in x-api-key-scope; managing API keys and "
            "invitations needs a signed-in owner or admin (x-api-key-scope: none). A missing "
            "scope is 403 insufficient_scope.",
        }


_DESCRIPTIONS = {
    400: "Invalid request (see error.code and error.field).",
    401: "Missing, unknown or revoked API key.",
    402: "Payment required (balance or spend limit).",
    403: "Authenticated, but the key's scope or the member's role does not allow this, or the "
    "organisation is suspended by Switchyard staff (organization_suspended: its keys do "
    "nothing, its members only read).",
    404: "No such object in your organisation (or, with Sy-Organization, no such organisation "
    "among yours).",
    409: "Conflict: the action is not allowed in the object's current state, or the capacity "
    "was taken, or the Idempotency-Key is in use.",
    410: "Gone: the quote expired and was deleted a day later (quote_expired).",
    415: "Only application/json bodies are accepted.",
    422: "Idempotency-Key reused with a different request.",
    429: "Rate limit exceeded; see Retry-After.",
    503: "The payment provider is unreachable (retry shortly) or card payments are not set up "
    "on this deployment (payments_not_configured).",
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
    pattern="^[ -~]{1,255}$",  # printable ASCII, as idempotency_claim checks
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

    def get_operation(self, *args, **kwargs):
        operation = super().get_operation(*args, **kwargs)
        required = getattr(self.view, "required_key_scope", None)
        if operation is None or required is None:
            return operation
        scope = required(self.method)
        operation["x-api-key-scope"] = scope or "none"
        if scope:
            note = f"API keys need the `{scope}` scope."
        else:
            safe = self.method in ("GET", "HEAD", "OPTIONS")
            roles = getattr(self.view, "read_roles" if safe else "write_roles", frozenset())
            who = ", ".join(sorted(roles)) if roles else "a member"
            note = f"API keys cannot call this: sign in (roles: {who})."
        description = operation.get("description", "")
        operation["description"] = f"{description}\n\n{note}" if description else note
        return operation

    def _get_response_bodies(self, direction="response"):
        """The view's own responses, plus the errors the base view can answer anywhere.

        400 (an API key in the URL, a malformed Idempotency-Key), 415 for a body that is not
        JSON, and for an organisation's endpoints 403 (scope or role) and 404 (an unknown
        Sy-Organization); a POST there also claims its Idempotency-Key (409 in use, 422 reused
        with another request). (extend_schema replaces get_response_serializers, so the
        additions are made here, where the responses are built.)
        """
        bodies = super()._get_response_bodies(direction)
        implied = {400}
        if self.method in ("POST", "PUT", "PATCH"):
            implied.add(415)
        if getattr(self.view, "requires_organization", False):
            implied |= {403, 404}
            if self.method == "POST":
                implied |= {409, 422}
        # A view without rate limits (the grid price feed) answers 429 only to a client over
        # AUTH_FAILURE_RATE, which any view taking an API key or node token can.
        throttled = bool(getattr(self.view, "throttle_classes", None)) or any(
            getattr(auth, "keyword", None) == "Bearer"
            for auth in getattr(self.view, "authentication_classes", ())
        )
        for code, response in errors(*implied).items():
            if code == 429 and not throttled:
                continue
            if str(code) not in bodies:
                bodies[str(code)] = self._get_response_for_code(
                    response, str(code), direction=direction
                )
        return dict(sorted(bodies.items()))

    def get_override_parameters(self):
        parameters = list(super().get_override_parameters())
        query_serializer = getattr(self.view, "query_serializer", None)
        if self.method == "GET" and query_serializer is not None:
            parameters.insert(0, query_serializer)  # what query_input() reads, and all it takes
        if self.method == "POST" and getattr(self.view, "requires_organization", False):
            # Keys are claimed per organisation; views acting for none do not take them.
            parameters.append(IDEMPOTENCY_KEY_PARAMETER)
        if getattr(self.view, "requires_organization", False):
            parameters.append(ORGANIZATION_PARAMETER)
        return parameters
