"""POST quotes; GET quotes/{id}."""

from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api.schema import errors
from config.api.serializers import AmountField, Serializer
from config.api.views import ApiView
from marketplace.apis.catalogue import BreakdownOutput, EnergyOutput, GridFiltersInput
from marketplace.models import Term, Tier
from marketplace.selectors.catalogue import quote_get_for_org
from marketplace.services.energy import booking_energy
from marketplace.services.quotes import quote_create

TAGS = ["Quotes"]


class QuoteCreateInput(GridFiltersInput):
    gpu_model = serializers.SlugField(help_text="e.g. h100-sxm-80gb.")
    gpu_count = serializers.IntegerField(min_value=1, max_value=4096)
    starts_at = serializers.DateTimeField(required=False, help_text="Default: now.")
    ends_at = serializers.DateTimeField(help_text="Exclusive end of the period.")
    tier = serializers.ChoiceField(choices=Tier.choices, default=Tier.ON_DEMAND)
    term = serializers.ChoiceField(
        choices=Term.choices, default=Term.NONE, help_text="Reserved tier only: 1w, 1m, 3m, 1y."
    )
    site = serializers.SlugField(required=False, help_text="Only this site.")
    region = serializers.CharField(required=False, max_length=64, help_text="Only this region.")
    min_reliability = serializers.DecimalField(
        required=False,
        max_digits=5,
        decimal_places=4,
        min_value=0,
        max_value=1,
        help_text="Only nodes whose 30-day reliability (0-1) is at least this, as "
        "availability's filter: the booking is placed on such nodes only.",
    )


class QuoteOutput(Serializer):
    id = serializers.CharField(source="public_id")
    gpu_model = serializers.CharField(source="gpu_model.slug")
    site = serializers.CharField(source="site.slug")
    gpu_count = serializers.IntegerField()
    tier = serializers.ChoiceField(choices=Tier.choices)
    term = serializers.ChoiceField(choices=Term.choices)
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    currency = serializers.CharField()
    price_per_gpu_hour = serializers.DecimalField(max_digits=12, decimal_places=4)
    total = AmountField(source="total_amount")
    breakdown = BreakdownOutput()
    min_reliability = serializers.DecimalField(
        max_digits=5,
        decimal_places=4,
        allow_null=True,
        help_text="The reliability floor asked for; the booking is placed on such nodes only.",
    )
    expires_at = serializers.DateTimeField(help_text="Reserve before this to keep the price.")
    energy = serializers.SerializerMethodField()
    expired = serializers.SerializerMethodField()
    reservation = serializers.SerializerMethodField(help_text="The reservation made from it.")
    created_at = serializers.DateTimeField()

    @extend_schema_field(EnergyOutput)
    def get_energy(self, quote) -> dict:
        return booking_energy(quote).as_dict()

    def get_expired(self, quote) -> bool:
        return timezone.now() >= quote.expires_at

    def get_reservation(self, quote) -> str | None:
        reservation = getattr(quote, "reservation", None)
        return reservation.public_id if reservation else None


class QuoteListApi(ApiView):
    @extend_schema(
        tags=TAGS,
        operation_id="quotes_create",
        summary="Get a quote: the cheapest offer that fits, price held for a few minutes",
        request=QuoteCreateInput,
        responses={201: QuoteOutput, **errors(400, 403, 404, 409, 415, 422)},
    )
    def post(self, request):
        serializer = QuoteCreateInput(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        quote = quote_create(
            organization=self.organization,
            gpu_model=data["gpu_model"],
            gpu_count=data["gpu_count"],
            starts_at=data.get("starts_at") or timezone.now(),
            ends_at=data["ends_at"],
            tier=data["tier"],
            term=data["term"],
            site=data.get("site"),
            region=data.get("region"),
            min_reliability=data.get("min_reliability"),
            **serializer.grid_filters(),
        )
        return Response(QuoteOutput(quote).data, status=status.HTTP_201_CREATED)


class QuoteDetailApi(ApiView):
    @extend_schema(
        tags=TAGS,
        operation_id="quotes_retrieve",
        summary="Retrieve a quote",
        responses={200: QuoteOutput, **errors(403, 404, 410)},
    )
    def get(self, request, quote_id: str):
        return Response(
            QuoteOutput(quote_get_for_org(organization=self.organization, public_id=quote_id)).data
        )
