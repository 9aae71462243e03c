"""The public catalogue: GPU models, sites, and availability (search and per site)."""

from contextlib import contextmanager
from datetime import timedelta

from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.response import Response

from config.api.pagination import SlugCursorPagination
from config.api.schema import errors
from config.api.serializers import AmountField, Serializer
from config.api.views import ApiView
from config.currency import currency_refusal
from config.errors import ValidationFailed
from config.replica import replica_reads
from marketplace.models import Term, Tier
from marketplace.selectors.availability import (
    AvailabilityQuery,
    availability_search,
    site_availability,
)
from marketplace.selectors.catalogue import (
    CurtailmentHistory,
    gpu_model_list,
    site_capacity_summaries,
    site_get_public,
    site_list_public,
)
from marketplace.selectors.reference import gpu_models_in_slug_order
from marketplace.services.quotes import resolve_catalogue

TAGS = ["Catalogue"]
# The longest window one availability query may ask about.
MAX_WINDOW = timedelta(days=366)


class GpuModelOutput(Serializer):
    id = serializers.CharField(source="slug", help_text="The model's slug, e.g. h100-sxm-80gb.")
    name = serializers.CharField()
    vendor = serializers.CharField()
    memory_gb = serializers.IntegerField()
    tdp_watts = serializers.IntegerField()
    interconnect = serializers.CharField()


class _Catalogue(ApiView):
    requires_organization = False


class GpuModelListApi(_Catalogue):
    pagination_class = SlugCursorPagination

    def get_queryset(self):
        return gpu_model_list()

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="gpu_models_list",
        summary="List GPU models",
        responses={200: GpuModelOutput(many=True), **errors(400, 403)},
    )
    def get(self, request):
        if not request.query_params:
            # The first page as the paginator would give it, from the per-process reference
            # cache (a catalogue entry takes up to REFERENCE_TTL_SECONDS to show everywhere).
            first_page = _gpu_models_first_page(self.pagination_class.page_size)
            if first_page is not None:
                return Response({"next": None, "previous": None, "results": first_page})
        return self.paginated_response(self.get_queryset(), GpuModelOutput)


_first_page: tuple[list | None, list | None] = (None, None)


def _gpu_models_first_page(page_size: int) -> list | None:
    """The whole catalogue, serialised, when it fits on one page; else None."""
    global _first_page
    models = gpu_models_in_slug_order()
    if len(models) > page_size:
        return None
    cached_for, data = _first_page
    if cached_for is not models:  # the reference cache reloaded: serialise again
        data = GpuModelOutput(models, many=True).data
        _first_page = (models, data)
    return data


class CapacityByModelOutput(Serializer):
    gpu_model = serializers.CharField()
    nodes = serializers.IntegerField()
    gpus = serializers.IntegerField()
    available_nodes = serializers.IntegerField(help_text="Nodes in service right now.")


class CapacitySummaryOutput(Serializer):
    nodes = serializers.IntegerField()
    gpus = serializers.IntegerField()
    gpu_models = CapacityByModelOutput(many=True)


class SiteOutput(Serializer):
    id = serializers.CharField(source="slug", help_text="The site's slug.")
    name = serializers.CharField()
    status = serializers.CharField()
    region = serializers.CharField()
    country = serializers.CharField(help_text="ISO 3166-1 alpha-2.")
    grid_operator = serializers.CharField()
    price_zone = serializers.CharField(
        source="price_zone.code",
        allow_null=True,
        default=None,
        help_text="The power market zone it buys from (its prices: GET grid/zones/{id}/prices); "
        "null: a fixed contract price.",
    )
    power_capacity_kw = serializers.DecimalField(max_digits=10, decimal_places=1)
    pue = serializers.DecimalField(max_digits=4, decimal_places=2)
    renewable_share = serializers.DecimalField(max_digits=4, decimal_places=3, help_text="0 to 1.")
    cooling = serializers.CharField()
    uplink_gbps = serializers.IntegerField()
    former_use = serializers.CharField()
    reliability_30d = serializers.DecimalField(
        max_digits=5,
        decimal_places=4,
        allow_null=True,
        help_text="0-1 over the last 30 days (outages, failed provisioning, GPU failures).",
    )
    capacity = serializers.SerializerMethodField()

    @extend_schema_field(CapacitySummaryOutput)
    def get_capacity(self, site) -> dict:
        summary = self.context["capacity"].get(site.pk) or {"nodes": 0, "gpus": 0, "gpu_models": []}
        return CapacitySummaryOutput(summary).data


class SiteListApi(_Catalogue):
    pagination_class = SlugCursorPagination

    def get_queryset(self):
        return site_list_public()

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="sites_list",
        summary="List sites: where the GPUs are, and what powers and cools them",
        responses={200: SiteOutput(many=True), **errors(400, 403)},
    )
    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        capacity = site_capacity_summaries(site_ids=[site.pk for site in page])
        data = SiteOutput(page, many=True, context={"capacity": capacity}).data
        return self.get_paginated_response(data)


# The period rules (marketplace.rules) name a booking's fields; here the window is asked for
# with start and end, and an error names the parameter the caller sent.
_WINDOW_PARAMS = {"starts_at": "start", "ends_at": "end"}


@contextmanager
def _window_params_named():
    try:
        yield
    except ValidationFailed as exc:
        exc.field = _WINDOW_PARAMS.get(exc.field, exc.field)
        raise


def _validate_window(attrs: dict) -> dict:
    if attrs["end"] <= attrs["start"]:
        raise serializers.ValidationError(
            {"end": "end must be after start."}, code="period_invalid"
        )
    if attrs["end"] - attrs["start"] > MAX_WINDOW:
        raise serializers.ValidationError(
            {"end": f"The window may be at most {MAX_WINDOW.days} days."}, code="period_too_long"
        )
    return attrs


class SiteAvailabilityInput(Serializer):
    start = serializers.DateTimeField(required=False, help_text="Default: now.")
    end = serializers.DateTimeField(help_text="Exclusive end of the window.")

    def validate(self, attrs):
        attrs.setdefault("start", timezone.now())
        return _validate_window(attrs)


class SiteModelAvailabilityOutput(Serializer):
    gpu_model = serializers.CharField(source="gpu_model.slug")
    nodes = serializers.IntegerField(help_text="Nodes in service for the whole window.")
    healthy_gpus = serializers.IntegerField()
    free_gpus = serializers.IntegerField(help_text="Free for the whole window.")
    largest_free_on_one_node = serializers.IntegerField()
    whole_free_nodes = serializers.IntegerField()


class SiteAvailabilityOutput(Serializer):
    site = serializers.CharField()
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    results = SiteModelAvailabilityOutput(many=True)


class SiteAvailabilityApi(_Catalogue):
    query_serializer = SiteAvailabilityInput

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="sites_availability",
        summary="Free GPUs by model at one site for a window",
        responses={200: SiteAvailabilityOutput, **errors(400, 403, 404)},
    )
    def get(self, request, slug: str):
        site = site_get_public(slug=slug)
        params = self.query_input()
        with _window_params_named():
            results = site_availability(site=site, starts_at=params["start"], ends_at=params["end"])
        return Response(
            SiteAvailabilityOutput(
                {
                    "site": site.slug,
                    "start": params["start"],
                    "end": params["end"],
                    "results": results,
                }
            ).data
        )


class GridFiltersInput(Serializer):
    """Which sites qualify by their grid: shared by the search and quotes."""

    min_renewable_share = serializers.DecimalField(
        required=False,
        max_digits=4,
        decimal_places=3,
        min_value=0,
        max_value=1,
        help_text="Only sites whose renewable share (0-1) is at least this.",
    )
    max_grid_carbon = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=2000,
        help_text="Only sites whose grid carbon intensity (gCO2e/kWh) is at most this; sites "
        "without the figure are left out.",
    )
    max_pue = serializers.DecimalField(
        required=False,
        max_digits=4,
        decimal_places=2,
        min_value=1,
        max_value=5,
        help_text="Only sites whose PUE is at most this.",
    )

    def grid_filters(self) -> dict:
        """The filters as availability_search takes them."""
        data = self.validated_data
        return {
            "min_renewable_share": data.get("min_renewable_share"),
            "max_grid_carbon_g_per_kwh": data.get("max_grid_carbon"),
            "max_pue": data.get("max_pue"),
        }


class AvailabilityInput(GridFiltersInput):
    gpu_model = serializers.SlugField(required=False, help_text="e.g. h100-sxm-80gb.")
    min_gpu_memory_gb = serializers.IntegerField(required=False, min_value=1)
    gpu_count = serializers.IntegerField(default=1, min_value=1, max_value=4096)
    start = serializers.DateTimeField(required=False, help_text="Default: now.")
    end = serializers.DateTimeField(help_text="Exclusive end of the period.")
    region = serializers.CharField(required=False, max_length=64)
    site = serializers.SlugField(required=False)
    tier = serializers.ChoiceField(choices=Tier.choices, default=Tier.ON_DEMAND)
    term = serializers.ChoiceField(choices=Term.choices, default=Term.NONE)
    min_reliability = serializers.DecimalField(
        required=False,
        max_digits=5,
        decimal_places=4,
        min_value=0,
        max_value=1,
        help_text="Only nodes whose 30-day reliability (0-1) is at least this.",
    )
    max_price = serializers.DecimalField(
        required=False,
        max_digits=12,
        decimal_places=4,
        min_value=0,
        help_text="Highest acceptable price per GPU-hour, in the offer's currency (with "
        "`currency`, in that one).",
    )
    currency = serializers.CharField(
        required=False,
        min_length=3,
        max_length=3,
        help_text="Only offers priced in this currency (lower case, e.g. usd). An organisation "
        "books in the currency it is billed in (GET /billing/balance); an offer in another is "
        "refused with 409 currency_mismatch.",
    )

    def validate_currency(self, value: str) -> str:
        if refusal := currency_refusal(value):
            raise serializers.ValidationError(refusal)
        return value

    def validate(self, attrs):
        attrs.setdefault("start", timezone.now())
        return _validate_window(attrs)


class BreakdownOutput(Serializer):
    """How the price was reached; every amount a decimal string."""

    currency = serializers.CharField()
    list_price_per_gpu_hour = serializers.CharField()
    rate_source = serializers.CharField()
    tier = serializers.CharField()
    term = serializers.CharField()
    tier_discount_pct = serializers.CharField()
    utilisation = serializers.CharField()
    utilisation_multiplier = serializers.CharField()
    energy_price_per_mwh = serializers.CharField(
        allow_null=True,
        help_text="The power price this tier is priced from, per MWh in the price's currency "
        "(the site's zone prices over the tier's basis, else its static price); null when not "
        "known in that currency (then no energy adjustment and no energy floor).",
    )
    energy_price_source = serializers.CharField(
        allow_null=True, help_text='"zone:<code>" or "static"; null when not known.'
    )
    energy_price_basis = serializers.ChoiceField(
        choices=["hour", "window", "long"],
        allow_null=True,
        help_text="hour: the window's first hour; window: the booked window, time-weighted; "
        "long: the window and the 30 days before it.",
    )
    energy_price_note = serializers.CharField(
        default="", help_text="In words: which prices, gaps and time beyond the published horizon."
    )
    window_energy_price_per_mwh = serializers.CharField(
        allow_null=True, help_text="The expected power price over the booked window."
    )
    energy_multiplier = serializers.CharField(
        help_text="1 + the policy's pass-through × (energy price ÷ reference − 1); 1 when off."
    )
    multiplier_unbounded = serializers.CharField()
    multiplier = serializers.CharField()
    clamped = serializers.ChoiceField(
        choices=["floor", "ceiling", "energy_floor"],
        allow_null=True,
        help_text="energy_floor: the price is the GPU-hour's energy cost plus margin.",
    )
    energy_cost_per_gpu_hour = serializers.CharField(
        allow_null=True,
        help_text="Rated board power × site PUE × the power price: the GPU-hour's marginal "
        "energy cost.",
    )
    margin_per_gpu_hour = serializers.CharField(allow_null=True)
    price_floor_per_gpu_hour = serializers.CharField(
        allow_null=True, help_text="Energy cost + margin: no price goes below it."
    )
    price_per_gpu_hour = serializers.CharField()
    gpu_count = serializers.IntegerField()
    hours = serializers.CharField()
    total = serializers.CharField()
    rounding = serializers.CharField()


class EnergyOutput(Serializer):
    """Estimated energy and emissions of the GPU time (marketplace.services.energy)."""

    kwh = serializers.CharField(help_text="Decimal string, 3 places.")
    kg_co2e = serializers.CharField(
        allow_null=True, help_text="Market-based; null when the site's grid intensity is unknown."
    )
    pue = serializers.CharField()
    renewable_share = serializers.CharField(help_text="0 to 1.")
    grid_carbon_g_per_kwh = serializers.IntegerField(allow_null=True)
    basis = serializers.ChoiceField(
        choices=["estimated", "measured"],
        help_text="measured: from the power the GPUs reported (reservations that have run); "
        "estimated: from rated power (offers, quotes, time without readings).",
    )
    method = serializers.CharField(help_text="How the figures were computed.")
    measured_share = serializers.CharField(
        allow_null=True, help_text="Measured: the share of metered GPU-time with readings (0-1)."
    )


class OfferSiteOutput(Serializer):
    id = serializers.CharField(source="slug")
    name = serializers.CharField()
    region = serializers.CharField()
    country = serializers.CharField()


class CurtailmentHistoryOutput(Serializer):
    days = serializers.IntegerField(help_text="The period looked at: the last 90 days.")
    events = serializers.IntegerField(help_text="Curtailments that took effect in it.")
    hours = serializers.CharField(help_text="Hours the site was curtailed in it (1 place).")


class OfferGridOutput(Serializer):
    """The grid behind the offer."""

    price_zone = serializers.CharField(
        allow_null=True, help_text="The site's power market zone (its prices: grid/zones/{id})."
    )
    expected_energy_price_per_mwh = serializers.CharField(
        allow_null=True,
        help_text="The expected power price over the window, time-weighted, in `currency`; "
        "null when not known in it.",
    )
    currency = serializers.CharField()
    energy_price_note = serializers.CharField(help_text="Where that price comes from.")
    curtailments_90d = CurtailmentHistoryOutput()


class OfferResaleOutput(Serializer):
    listing = serializers.CharField(
        source="public_id", help_text="lst_…: book it with POST reservations {listing: …}."
    )
    starts_at = serializers.DateTimeField(help_text="The listing's window, inside which you book.")
    ends_at = serializers.DateTimeField()
    gpu_count = serializers.IntegerField(help_text="GPUs listed (you may take fewer).")


class OfferOutput(Serializer):
    site = OfferSiteOutput()
    gpu_model = serializers.CharField(source="gpu_model.slug")
    gpu_count = serializers.IntegerField()
    placement = serializers.ChoiceField(
        choices=["single_node", "cluster"],
        help_text="single_node: all GPUs on one node; cluster: whole nodes at one site.",
    )
    node_count = serializers.IntegerField()
    fitting_node_count = serializers.IntegerField()
    free_gpus = serializers.IntegerField()
    currency = serializers.CharField()
    price_per_gpu_hour = serializers.DecimalField(max_digits=12, decimal_places=4)
    total = AmountField()
    breakdown = serializers.SerializerMethodField()
    energy = serializers.SerializerMethodField()
    grid = serializers.SerializerMethodField(
        help_text="The site's power zone, the expected power price over the window, and its "
        "curtailments over the last 90 days."
    )
    reliability = serializers.DecimalField(
        max_digits=5,
        decimal_places=4,
        allow_null=True,
        help_text="The least reliable offered node's 30-day figure (0-1; null before computed).",
    )
    resale = OfferResaleOutput(
        source="listing",
        allow_null=True,
        help_text="Resold reserved time (another customer's term, at their asking price): the "
        "listing to book; null for the operator's own capacity.",
    )

    @extend_schema_field(BreakdownOutput)
    def get_breakdown(self, offer) -> dict:
        return offer.breakdown.as_dict()

    @extend_schema_field(EnergyOutput)
    def get_energy(self, offer) -> dict:
        return offer.energy().as_dict()

    @extend_schema_field(OfferGridOutput)
    def get_grid(self, offer) -> dict:
        b = offer.breakdown
        price = b.window_energy_price_per_mwh
        return {
            "price_zone": offer.price_zone,
            "expected_energy_price_per_mwh": None if price is None else str(price),
            "currency": b.currency,
            "energy_price_note": b.energy_price_note,
            "curtailments_90d": (offer.curtailments or CurtailmentHistory()).as_dict(),
        }


class AvailabilityOutput(Serializer):
    results = OfferOutput(
        many=True,
        help_text="Cheapest first; one offer per site and model, and one per resale listing "
        "that fits.",
    )


class AvailabilityApi(_Catalogue):
    query_serializer = AvailabilityInput

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="availability_search",
        summary="Search offers: what can be reserved now for a period, and at what price",
        responses={200: AvailabilityOutput, **errors(400, 403)},
    )
    def get(self, request):
        serializer = self.query_serializer(data=request.query_params)
        serializer.is_valid(raise_exception=True)
        params = serializer.validated_data
        resolve_catalogue(gpu_model=params.get("gpu_model"), site=params.get("site"))
        with _window_params_named():
            offers = availability_search(self._query(params, serializer.grid_filters()))
        return Response(AvailabilityOutput({"results": offers}).data)

    @staticmethod
    def _query(params: dict, grid_filters: dict) -> AvailabilityQuery:
        return AvailabilityQuery(
            gpu_count=params["gpu_count"],
            starts_at=params["start"],
            ends_at=params["end"],
            tier=params["tier"],
            term=params["term"],
            gpu_model=params.get("gpu_model"),
            min_gpu_memory_gb=params.get("min_gpu_memory_gb"),
            region=params.get("region"),
            site=params.get("site"),
            max_price_per_gpu_hour=params.get("max_price"),
            min_reliability=params.get("min_reliability"),
            **grid_filters,
            currency=params.get("currency"),
            include_resale=True,
        )
