"""Power prices per zone: read by anyone signed in, pushed by a grid feed.

A push comes from an API key with the `grid` scope (staff grant it; it may write any zone) or
from a site agent's node token (only the zone of that node's site). Sessions cannot push.
"""

from datetime import timedelta

from django.utils import timezone
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.permissions import SAFE_METHODS
from rest_framework.response import Response

from config.api.errors import ErrorSerializer, agent_errors
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.views import ApiView, validated_input
from config.errors import NotFound, PermissionDenied
from inventory.auth import NodeTokenAuthentication
from inventory.grid_prices import MAX_ROWS, zone_price_rows_parse, zone_prices_upsert
from inventory.models import PriceZone
from inventory.selectors import zone_prices_between
from marketplace.auth import ApiKeyAuthentication, ApiKeyUser
from marketplace.models import ApiKeyScope

TAGS = ["Grid"]
MAX_READ_WINDOW = timedelta(days=31)


class PriceInput(Serializer):
    """One interval; checked by the same rules as a staff CSV (docs/grid.md)."""

    starts_at = serializers.CharField(help_text="ISO 8601 with a UTC offset.")
    ends_at = serializers.CharField(help_text="Exclusive; at most a day after starts_at.")
    price_per_mwh = serializers.CharField(help_text="Decimal string, up to 2 places.")
    currency = serializers.CharField(
        required=False, allow_blank=True, help_text="The zone's currency (default)."
    )


class PricesPushInput(Serializer):
    prices = serializers.ListField(child=PriceInput(), min_length=1, max_length=MAX_ROWS)


class GapOutput(Serializer):
    zone = serializers.CharField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()


class PricesPushOutput(Serializer):
    zone = serializers.CharField()
    created = serializers.IntegerField(help_text="Intervals not stored before.")
    corrected = serializers.IntegerField(help_text="Same interval, another price: replaced.")
    unchanged = serializers.IntegerField(help_text="Sent again as stored: nothing changed.")
    replaced = serializers.IntegerField(
        help_text="Stored intervals cut by new ones (the part not covered is kept)."
    )
    gaps = GapOutput(many=True, help_text="Holes between the intervals sent (flagged, stored).")


class PricesReadInput(Serializer):
    start = serializers.DateTimeField(required=False, help_text="Default: now.")
    end = serializers.DateTimeField(required=False, help_text="Default: start + 48 hours.")

    def validate(self, attrs):
        attrs.setdefault("start", timezone.now())
        attrs.setdefault("end", attrs["start"] + timedelta(hours=48))
        if attrs["end"] <= attrs["start"]:
            raise serializers.ValidationError({"end": "end must be after start."})
        if attrs["end"] - attrs["start"] > MAX_READ_WINDOW:
            raise serializers.ValidationError(
                {"end": f"The window may be at most {MAX_READ_WINDOW.days} days."}
            )
        return attrs


class ZoneOutput(Serializer):
    id = serializers.CharField(source="code")
    name = serializers.CharField()
    currency = serializers.CharField()
    timezone = serializers.CharField()


class PriceOutput(Serializer):
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    price_per_mwh = serializers.DecimalField(max_digits=12, decimal_places=2)
    currency = serializers.CharField()


class PricesReadOutput(Serializer):
    zone = ZoneOutput()
    prices = PriceOutput(many=True)


def _zone(code: str) -> PriceZone:
    zone = PriceZone.objects.filter(code=code).first()
    if zone is None:
        raise NotFound(f"No price zone {code!r}.", field="zone")
    return zone


class ZonePricesApi(ApiView):
    requires_organization = False
    query_serializer = PricesReadInput

    @extend_schema(
        tags=TAGS,
        operation_id="zone_prices_list",
        summary="A price zone's power prices for a window",
        responses={200: PricesReadOutput, **errors(400, 403, 404)},
    )
    def get(self, request, code: str):
        zone = _zone(code)
        params = self.query_input()
        prices = zone_prices_between(zone=zone, starts_at=params["start"], ends_at=params["end"])
        return Response(PricesReadOutput({"zone": zone, "prices": prices}).data)


# What a node token may price: from a day back (late readings) to a week ahead (day-ahead
# markets); a grid feed's key may price any time.
NODE_PRICE_PAST = timedelta(days=1)
NODE_PRICE_AHEAD = timedelta(days=7)


class ZonePricesPushApi(ApiView):
    """The feed's door, beside the site agents' endpoints (their document, not the customers')."""

    # The node token first: the key class refuses any other Bearer token outright.
    authentication_classes = [NodeTokenAuthentication, ApiKeyAuthentication, SessionAuthentication]
    # Like the agents' endpoints, not rate limited: a feed's pushes are few and authenticated.
    throttle_classes = []
    requires_organization = False

    def required_key_scope(self, method: str) -> str | None:
        return ApiKeyScope.READ if method in SAFE_METHODS else ApiKeyScope.GRID

    @extend_schema(
        tags=TAGS,
        operation_id="zone_prices_push",
        summary="Push a zone's power prices (grid feeds: a grid-scope key or a node token)",
        description="Upserts intervals: the same body twice changes nothing; a new price for a "
        "stored interval replaces it; an interval across stored ones replaces the part it "
        "covers. One bad row refuses the whole body (400 prices_refused, every problem listed "
        "in `problems`). A node token may push only its own site's zone.",
        request=PricesPushInput,
        responses={
            200: PricesPushOutput,
            **agent_errors(),
            401: OpenApiResponse(ErrorSerializer, description="Missing or unknown credentials."),
            403: OpenApiResponse(
                ErrorSerializer,
                description="A key without the grid scope, a node of another zone's site, or a "
                "signed-in session.",
            ),
            404: OpenApiResponse(ErrorSerializer, description="No such price zone."),
        },
    )
    def post(self, request, code: str):
        zone = _zone(code)
        source = self._source(request, zone)
        data = validated_input(PricesPushInput, request.data)
        now = timezone.now()
        rows = zone_price_rows_parse(
            [
                (f"prices[{i}]", {**item, "zone": zone.code})
                for i, item in enumerate(data["prices"])
            ],
            zones={zone.code: zone},
            # A site's node reports what its meter sees: around now, not the zone's history.
            window=(now - NODE_PRICE_PAST, now + NODE_PRICE_AHEAD)
            if source.startswith("node:")
            else None,
        )
        result = zone_prices_upsert(rows=rows, source=source)
        return Response(PricesPushOutput({"zone": zone.code, **result.as_dict()}).data)

    def _source(self, request, zone: PriceZone) -> str:
        user = request.user
        if isinstance(user, ApiKeyUser):  # the scope was checked before the handler
            return f"api_key:{user.api_key.prefix}"
        node = getattr(user, "node", None)
        if node is not None:
            if node.site.price_zone_id != zone.pk:
                raise PermissionDenied(
                    f"This node's site is not in zone {zone.code}; a node token pushes only "
                    "its own site's zone.",
                    code="wrong_zone",
                )
            return f"node:{node.hostname}"
        raise PermissionDenied(
            "Power prices are pushed with an API key with the grid scope or a site's node "
            "token, not from a signed-in session.",
            code="grid_credentials_required",
        )
