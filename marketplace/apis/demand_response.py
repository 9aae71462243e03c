"""Demand-response calls from grid operators and aggregators: POST /api/v1/grid/demand-response.

Authenticated by a per-source HMAC signature, not an API key (marketplace.services.
demand_response); a call becomes curtailments with no person (docs/grid.md).
"""

from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.utils import timezone
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema
from rest_framework import authentication, exceptions, permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from config.api.parsers import JSONParser
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.throttling import ApiRateThrottle
from config.api.views import method_allowed_check
from config.db import retried_on_deadlock
from config.errors import ApplicationError
from marketplace.models import Curtailment, DemandResponseEvent, DemandResponseSource
from marketplace.rules import MAX_LEAD
from marketplace.services.demand_response import (
    DemandResponseCall,
    SignatureRefused,
    demand_response_apply,
    demand_response_verify,
)

__all__ = ["DemandResponseApi", "DemandResponseSignatureAuthentication"]

TAGS = ["Grid"]
_MAX_DAYS = 7
_ATTEMPTS = 3


class BodyTooLarge(ApplicationError):
    status_code = 413
    default_code = "request_too_large"


@dataclass(frozen=True)
class DemandResponseCaller:
    """The request's user when a demand-response source calls."""

    source: DemandResponseSource
    digest: str
    is_authenticated: bool = True
    is_anonymous: bool = False
    is_staff: bool = False

    @property
    def pk(self) -> str:  # the rate limit counts per source
        return f"dr-{self.source.pk}"

    def __str__(self) -> str:
        return f"demand-response source {self.source.name}"


class DemandResponseSignatureAuthentication(authentication.BaseAuthentication):
    """X-DR-Source, X-DR-Timestamp (Unix seconds) and X-DR-Signature ("sha256=<hex>" of
    HMAC-SHA256 over "<timestamp>.<raw body>" with the source's secret)."""

    def authenticate(self, request):
        meta = request.META
        try:
            source, digest = demand_response_verify(
                source_name=meta.get("HTTP_X_DR_SOURCE", ""),
                timestamp=meta.get("HTTP_X_DR_TIMESTAMP", ""),
                signature=meta.get("HTTP_X_DR_SIGNATURE", ""),
                body=request._request.body,  # the raw bytes, as signed (HttpRequest.body)
            )
        except SignatureRefused as refused:
            raise exceptions.AuthenticationFailed(refused.message, code=refused.code) from None
        return DemandResponseCaller(source=source, digest=digest), source

    def authenticate_header(self, request) -> str:
        return 'HMAC-SHA256 realm="switchyard-demand-response"'


class DemandResponseSignatureScheme(OpenApiAuthenticationExtension):
    target_class = DemandResponseSignatureAuthentication
    name = "demandResponseSignature"

    def get_security_definition(self, auto_schema) -> dict:
        return {
            "type": "apiKey",
            "in": "header",
            "name": "X-DR-Signature",
            "description": "sha256=<hex HMAC-SHA256 of '<X-DR-Timestamp>.<raw body>' with the "
            "source's secret>, with X-DR-Source (the source's name) and X-DR-Timestamp (Unix "
            "seconds, within DEMAND_RESPONSE_SIGNATURE_TOLERANCE_SECONDS of our clock). Each "
            "signed request is accepted once. Sources are set up by staff in the admin.",
        }


class IsDemandResponseSource(permissions.BasePermission):
    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, DemandResponseSource)


class DemandResponseCallInput(Serializer):
    event_id = serializers.CharField(max_length=200, help_text="Yours; unique per source.")
    modification_number = serializers.IntegerField(
        min_value=0,
        max_value=2**31 - 1,  # the column's range
        default=0,
        help_text="Raise it to change or cancel the call.",
    )
    status = serializers.ChoiceField(
        choices=DemandResponseEvent.Status.choices, default=DemandResponseEvent.Status.ACTIVE
    )
    site = serializers.SlugField(required=False, help_text="A site's slug; or zone.")
    zone = serializers.SlugField(required=False, help_text="A price zone's code; or site.")
    start = serializers.DateTimeField(help_text="When the load must be shed (ISO 8601, with zone).")
    end = serializers.DateTimeField(help_text="When the load may come back.")
    target_mw = serializers.DecimalField(
        max_digits=9,
        decimal_places=3,
        min_value=Decimal("0.001"),
        allow_null=True,
        default=None,
        coerce_to_string=True,
        help_text="Megawatts to shed; null: all flexible load.",
    )
    reason = serializers.CharField(max_length=500, required=False, default="", allow_blank=True)

    def validate(self, data):
        if bool(data.get("site")) == bool(data.get("zone")):
            raise serializers.ValidationError(
                {"site": "Name a site or a zone, one of them."}, code="site_or_zone"
            )
        if data["end"] <= data["start"]:
            raise serializers.ValidationError({"end": "end must be after start."})
        if (data["end"] - data["start"]).days >= _MAX_DAYS:
            raise serializers.ValidationError(
                {"end": f"A call lasts less than {_MAX_DAYS} days."}, code="period_too_long"
            )
        if data["start"] > timezone.now() + MAX_LEAD:
            # As far ahead as a reservation may start: a call beyond it would hold back a
            # window nobody can book yet (a mistyped year, say) until it came within reach.
            raise serializers.ValidationError(
                {"start": f"A call starts at most {MAX_LEAD.days} days ahead."},
                code="starts_too_far_ahead",
            )
        return data


class CurtailmentOutput(Serializer):
    site = serializers.CharField(source="site.slug")
    shed_at = serializers.DateTimeField()
    until = serializers.DateTimeField(allow_null=True)
    preempt_at = serializers.DateTimeField(allow_null=True)
    short_notice = serializers.BooleanField()
    target_mw = serializers.DecimalField(max_digits=9, decimal_places=3, allow_null=True)
    shed_mw = serializers.DecimalField(max_digits=12, decimal_places=6)
    short_mw = serializers.DecimalField(max_digits=12, decimal_places=6)
    reservations_notified = serializers.IntegerField()
    reservations_preempted = serializers.IntegerField()
    called_off = serializers.SerializerMethodField()

    def get_called_off(self, obj: Curtailment) -> bool:
        return obj.called_off_at is not None


class DemandResponseOutput(Serializer):
    event_id = serializers.CharField()
    modification_number = serializers.IntegerField()
    status = serializers.CharField()
    result = serializers.ChoiceField(
        choices=["created", "updated", "cancelled", "unchanged"],
        help_text="What this request did.",
    )
    target_mw = serializers.DecimalField(max_digits=9, decimal_places=3, allow_null=True)
    shed_mw = serializers.DecimalField(max_digits=12, decimal_places=6)
    short_mw = serializers.DecimalField(
        max_digits=12, decimal_places=6, help_text="What the flexible load could not cover."
    )
    curtailments = CurtailmentOutput(many=True)


_HEADERS = [
    OpenApiParameter("X-DR-Source", str, OpenApiParameter.HEADER, required=True),
    OpenApiParameter(
        "X-DR-Timestamp", str, OpenApiParameter.HEADER, required=True, description="Unix seconds"
    ),
]


class DemandResponseApi(APIView):
    """Take a demand-response call (see the operation's description)."""

    authentication_classes = [DemandResponseSignatureAuthentication]
    permission_classes = [IsDemandResponseSource]
    throttle_classes = [ApiRateThrottle]
    parser_classes = [JSONParser]

    def initial(self, request: Request, *args, **kwargs) -> None:
        # A GET here is 405, not 401 for its missing signature: no signature makes it right.
        method_allowed_check(self, request)
        # The signature is over the raw body, so it is read whatever its type. Too large is
        # 413 as for a JSON body (the input guard reads only those), not Django's bare 400.
        try:
            request._request.body  # noqa: B018 - read (and kept) here, or refused
        except RequestDataTooBig:
            raise BodyTooLarge(
                f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes."
            ) from None
        super().initial(request, *args, **kwargs)

    @extend_schema(
        operation_id="grid_demand_response",
        tags=TAGS,
        summary="Take a demand-response call (grid operators and aggregators)",
        description="A signed call to shed load at a site or a price zone for a window: "
        "`target_mw` megawatts, or all flexible (interruptible) load when null. Idempotent by "
        "(source, `event_id`): the same call again answers 200 `unchanged`; a higher "
        "`modification_number` changes the megawatts or the window (planned again) or, with "
        '`"status": "cancelled"`, cancels it (before its start the window is sold again; '
        "during it, it ends now). A zone's call is spread over its sites in proportion to "
        "their flexible load. Refused with nothing changed: unsigned, unknown source, stale "
        "timestamp or bad signature (401), a replayed signed request (409 `replayed`), a site "
        "or zone the source may not curtail (403), a stale or reused modification number "
        "(409). See docs/grid.md.",
        parameters=_HEADERS,
        request=DemandResponseCallInput,
        responses={
            200: DemandResponseOutput,
            201: DemandResponseOutput,
            **errors(400, 403, 409, 415),
        },
        examples=[
            OpenApiExample(
                "Shed 4.5 MW at a site",
                request_only=True,
                value={
                    "event_id": "ercot-dr-2026-12-06-17",
                    "modification_number": 0,
                    "status": "active",
                    "site": "abilene-1",
                    "start": "2026-12-06T17:00:00Z",
                    "end": "2026-12-06T19:00:00Z",
                    "target_mw": "4.5",
                    "reason": "ERCOT EEA 1",
                },
            )
        ],
    )
    def post(self, request: Request) -> Response:
        serializer = DemandResponseCallInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        call = DemandResponseCall(
            event_id=data["event_id"],
            modification_number=data["modification_number"],
            status=data["status"],
            site=data.get("site"),
            zone=data.get("zone"),
            starts_at=data["start"],
            ends_at=data["end"],
            target_mw=data["target_mw"],
            reason=data["reason"].strip(),
        )
        caller: DemandResponseCaller = request.user

        # The whole call is taken again if PostgreSQL picks it as a deadlock's victim (each
        # curtailment service also retries its own part): everything was rolled back.
        @retried_on_deadlock(_ATTEMPTS)
        def apply():
            event, result = demand_response_apply(
                source=caller.source, digest=caller.digest, call=call, body=request.data
            )
            curtailments = event.curtailments.select_related("site").order_by("site_id", "pk")
            return event, result, list(curtailments)

        event, result, curtailments = apply()
        # The totals are the call as it stands: each site's newest curtailment (a call repeated
        # after its window ended gets a new one; the ended one is history), unless called off.
        newest = {c.site_id: c for c in curtailments}  # by site, then pk: the last wins
        live = [c for c in newest.values() if c.called_off_at is None]
        out = {
            "event_id": event.event_id,
            "modification_number": event.modification_number,
            "status": event.status,
            "result": result,
            "target_mw": event.target_mw,
            "shed_mw": sum((c.shed_mw for c in live), 0),
            "short_mw": sum((c.short_mw for c in live), 0),
            "curtailments": curtailments,
        }
        return Response(DemandResponseOutput(out).data, status=201 if result == "created" else 200)
