"""Reservations: create, list, retrieve, cancellation terms, cancel, extend."""

from datetime import timedelta
from decimal import Decimal, InvalidOperation

from django.utils import timezone
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.serializers import AmountField, Serializer, amount_text
from config.api.views import FILTERED, ApiView, validated_input
from config.dates import iso_utc_within
from config.replica import replica_reads
from marketplace.apis.catalogue import EnergyOutput
from marketplace.filters import ReservationFilter
from marketplace.models import Reservation, ReservationStatus, Term, Tier
from marketplace.provisioning.workload import workload_public, workload_validate
from marketplace.selectors.catalogue import quote_get_for_org
from marketplace.selectors.resale import listing_get_for_sale
from marketplace.selectors.reservations import (
    reservation_get_for_org,
    reservation_list_for_org,
    reservations_charged_load,
)
from marketplace.selectors.telemetry import (
    MAX_WINDOW,
    reservation_energy,
    reservation_telemetry,
)
from marketplace.serializers import ReservationOutput
from marketplace.services.reservations import (
    cancellation_terms,
    extension_terms,
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from marketplace.services.ssh_keys import workload_add_saved_ssh_keys
from marketplace.services.transitions import reservation_allowed_actions

TAGS = ["Reservations"]

_DIRECT_FIELDS = (
    "gpu_model",
    "gpu_count",
    "starts_at",
    "ends_at",
    "tier",
    "term",
    "site",
    "region",
    "min_reliability",
)


class WorkloadInput(Serializer):
    image = serializers.CharField(
        required=False, max_length=512, help_text="Container image; default: the platform's."
    )
    ssh_public_keys = serializers.ListField(
        child=serializers.CharField(max_length=16384), required=False, max_length=16
    )
    env = serializers.DictField(
        child=serializers.CharField(allow_blank=True, max_length=4096),
        required=False,
        help_text="Environment variables; values are secrets and are never shown back.",
    )
    ports = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=65535), required=False, max_length=16
    )


class ReservationCreateInput(Serializer):
    quote = serializers.CharField(
        required=False, max_length=32, help_text="quo_…: reserve at the quoted price."
    )
    listing = serializers.CharField(
        required=False,
        max_length=32,
        help_text="lst_…: resold time from a search offer's `resale.listing`, with gpu_count, "
        "starts_at and ends_at inside its window (its site, model, tier and asking price).",
    )
    gpu_model = serializers.SlugField(required=False, help_text="Without a quote.")
    gpu_count = serializers.IntegerField(required=False, min_value=1, max_value=4096)
    starts_at = serializers.DateTimeField(required=False)
    ends_at = serializers.DateTimeField(required=False)
    tier = serializers.ChoiceField(choices=Tier.choices, required=False)
    term = serializers.ChoiceField(choices=Term.choices, required=False)
    site = serializers.SlugField(required=False)
    region = serializers.CharField(required=False, max_length=64)
    min_reliability = serializers.DecimalField(
        required=False,
        max_digits=5,
        decimal_places=4,
        min_value=0,
        max_value=1,
        help_text="Only nodes whose 30-day reliability (0-1) is at least this, as "
        "availability's filter: the booking is placed on such nodes only.",
    )
    max_price = serializers.DecimalField(
        required=False,
        max_digits=12,
        decimal_places=4,
        min_value=0,
        help_text="The most you will pay per GPU-hour, in the offer's currency (as the "
        "search's max_price): a booking priced above it now is refused with 409 "
        "price_above_max and nothing is booked. Also checked against a quote's or "
        "listing's price.",
    )
    workload = WorkloadInput(required=False)
    ssh_key_ids = serializers.ListField(
        child=serializers.CharField(max_length=32),
        required=False,
        max_length=16,
        help_text="ssh_…: saved SSH keys of the organisation, added to workload.ssh_public_keys "
        "(each key once).",
    )

    def validate(self, attrs):
        direct = [name for name in _DIRECT_FIELDS if name in attrs]
        if "quote" in attrs and (direct or "listing" in attrs):
            raise serializers.ValidationError(
                {
                    (direct or ["listing"])[0]: "Give either a quote or the reservation's "
                    "parameters, not both."
                },
                code="quote_and_parameters",
            )
        if "listing" in attrs:
            for name in ("gpu_count", "ends_at"):
                if name not in attrs:
                    raise serializers.ValidationError(
                        {name: "This field is required with a listing."}, code="required"
                    )
            for name in ("region", "min_reliability"):
                # A listing's GPUs are fixed: a filter it would ignore must not look applied.
                if name in attrs:
                    raise serializers.ValidationError(
                        {name: f"{name} does not apply to a listing, whose node is fixed; "
                               "the search offer shows its site and reliability."},
                        code="not_with_listing",
                    )  # fmt: skip
        elif "quote" not in attrs:
            for name in ("gpu_model", "gpu_count", "ends_at"):
                if name not in attrs:
                    raise serializers.ValidationError(
                        {name: "This field is required without a quote."}, code="required"
                    )
        return attrs


class TransitionOutput(Serializer):
    from_status = serializers.CharField(allow_blank=True)
    to_status = serializers.CharField()
    cause = serializers.CharField()
    actor = serializers.CharField(source="actor_label")
    at = serializers.DateTimeField()


class AllocationNodeOutput(Serializer):
    hostname = serializers.CharField()
    gpus = serializers.IntegerField()


class AllocationSummaryOutput(Serializer):
    gpu_count = serializers.IntegerField()
    node_count = serializers.IntegerField()
    nodes = AllocationNodeOutput(many=True)


class WorkloadOutput(Serializer):
    image = serializers.CharField(allow_null=True)
    ssh_public_keys = serializers.ListField(child=serializers.CharField())
    env_names = serializers.ListField(child=serializers.CharField())
    ports = serializers.ListField(child=serializers.IntegerField())


class ConnectionNodeOutput(Serializer):
    host = serializers.CharField()
    ssh_port = serializers.IntegerField(
        allow_null=True, help_text="Null when the workload has no SSH keys (22 not published)."
    )
    ports = serializers.DictField(
        child=serializers.IntegerField(),
        default=dict,
        help_text="Workload port → port to connect to.",
    )
    gpu_indexes = serializers.ListField(child=serializers.IntegerField(), required=False)


class ConnectionOutput(Serializer):
    host = serializers.CharField(help_text="The entry point (the first node).")
    ssh_port = serializers.IntegerField(
        allow_null=True, help_text="Null when the workload has no SSH keys (22 not published)."
    )
    simulated = serializers.BooleanField(
        default=False,
        help_text="True when no workload runs: the simulated driver (demo, tests) made these up.",
    )
    ports = serializers.DictField(
        child=serializers.IntegerField(),
        default=dict,
        help_text="Workload port → port to connect to.",
    )
    nodes = ConnectionNodeOutput(many=True, required=False, help_text="Every node, in order.")


class OutageOutput(Serializer):
    started_at = serializers.DateTimeField()
    ended_at = serializers.DateTimeField(allow_null=True, help_text="null while still open.")
    cause = serializers.CharField()


class CancellationTermsOutput(Serializer):
    action = serializers.ChoiceField(
        choices=["cancel", "stop"],
        help_text="cancel: before activation; stop: an active reservation ends early.",
    )
    at = serializers.DateTimeField()
    currency = serializers.CharField()
    unused_amount = AmountField(
        help_text="What was charged up front for the time not yet used: a reserved term's "
        "price for it; 0 for on-demand and interruptible (charged only as used).",
    )
    refund_fraction = serializers.DecimalField(
        max_digits=4,
        decimal_places=2,
        help_text="The share of unused_amount refunded (1 for on-demand and interruptible: "
        "nothing is kept); send it back as expected_refund_fraction.",
    )
    refund_amount = AmountField(help_text="Credited to the balance on cancelling.")
    fee_amount = AmountField(help_text="What of unused_amount is kept.")
    rule = serializers.CharField()


class ReservationDetailFields(Serializer):
    """What the detail shows beyond ReservationOutput's fields (which come first). A create
    shows ReservationOutput's part from its reservation.created event's data, serialised once
    for both (reservation_detail_after_create)."""

    allowed_actions = serializers.SerializerMethodField()
    breakdown = serializers.JSONField()
    energy = serializers.SerializerMethodField(
        help_text="Energy and emissions: before it runs, estimated for the booked period; once "
        "it has run, its metered time at the measured power where the GPUs reported it "
        '(basis "measured"), else at rated power (basis "estimated").'
    )
    workload = serializers.SerializerMethodField()
    allocations = serializers.SerializerMethodField()
    connection = serializers.SerializerMethodField(
        help_text="Host, SSH port and mapped ports; only while the reservation is active."
    )
    outages = OutageOutput(
        many=True,
        source="outage_list",
        help_text="Time the reservation was not served (a node out); not charged.",
    )
    cancellation = serializers.JSONField(
        allow_null=True, help_text="The refund terms applied, once cancelled."
    )
    transitions = TransitionOutput(many=True, source="transition_list")

    @extend_schema_field(EnergyOutput)
    def get_energy(self, reservation) -> dict:
        return reservation_energy(reservation=reservation).as_dict()

    def get_allowed_actions(self, reservation) -> list[str]:
        return reservation_allowed_actions(reservation)

    @extend_schema_field(WorkloadOutput)
    def get_workload(self, reservation) -> dict:
        return workload_public(reservation.workload)

    @extend_schema_field(AllocationSummaryOutput)
    def get_allocations(self, reservation) -> dict:
        live = [a for a in reservation.allocation_list if a.is_live]
        shown = live or reservation.allocation_list
        # Distinct GPUs: a GPU whose time was partly resold has an allocation before and after.
        per_node: dict[str, set[int]] = {}
        for allocation in shown:
            per_node.setdefault(allocation.node.hostname, set()).add(allocation.gpu_id)
        return {
            "gpu_count": len({a.gpu_id for a in shown}),
            "node_count": len(per_node),
            "nodes": [{"hostname": h, "gpus": len(g)} for h, g in per_node.items()],
        }

    @extend_schema_field(ConnectionOutput(allow_null=True))
    def get_connection(self, reservation) -> dict | None:
        if reservation.status != ReservationStatus.ACTIVE or not reservation.connection:
            return None
        return ConnectionOutput(reservation.connection).data

    def to_representation(self, reservation):
        data = super().to_representation(reservation)
        data["cancellation"] = _cancellation_shown(reservation)
        # Times kept in JSON before they were written as the API writes times ("Z").
        data["breakdown"] = iso_utc_within(data["breakdown"])
        return data


_CANCELLATION_AMOUNTS = ("unused_amount", "refund_amount", "fee_amount")
# The terms applied show their fraction as cancellation-terms stated it ("1.00", not "1").
_REFUND_FRACTION = CancellationTermsOutput().fields["refund_fraction"]


def _cancellation_shown(reservation) -> dict | None:
    """The refund terms applied, their amounts written as the API writes money and their
    refund_fraction as cancellation-terms writes it (stored as the service's Decimals printed:
    "241500.00" in yen where a term's total was the unused part, "1" or "0.5")."""
    if not reservation.cancellation:
        return None
    shown = iso_utc_within(dict(reservation.cancellation))
    for key in (*_CANCELLATION_AMOUNTS, "refund_fraction"):
        if isinstance(shown.get(key), str):
            try:
                number = Decimal(shown[key])
                if key == "refund_fraction":
                    shown[key] = _REFUND_FRACTION.to_representation(number)
                else:
                    shown[key] = amount_text(number, reservation.currency)
            except InvalidOperation:  # not a number: shown as stored, not hidden
                pass
    return shown


class ReservationDetailOutput(ReservationOutput, ReservationDetailFields):
    """A reservation with its actions, allocations, history: ReservationOutput's fields, then
    ReservationDetailFields'."""


def reservation_detail_after_create(reservation) -> dict:
    """ReservationDetailOutput(reservation).data for a reservation reservation_create just
    returned: its ReservationOutput part is the data its reservation.created event recorded
    (nothing changes the reservation between the two), so it is serialised once."""
    return {**reservation.created_event.data, **ReservationDetailFields(reservation).data}


class ReservationListApi(ApiView):
    pagination_class = NewestFirstCursorPagination
    filter_backends = FILTERED
    filterset_class = ReservationFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Reservation.objects.none()
        return reservation_list_for_org(organization=self.organization)

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="reservations_list",
        summary="List reservations, newest first",
        responses={200: ReservationOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        reservations_charged_load(page)  # one question to billing for the page
        return self.get_paginated_response(ReservationOutput(page, many=True).data)

    @extend_schema(
        tags=TAGS,
        operation_id="reservations_create",
        summary="Reserve GPUs, from a quote (at its price) or directly (priced now)",
        request=ReservationCreateInput,
        responses={
            201: ReservationDetailOutput,
            **errors(400, 402, 403, 404, 409, 410, 415, 422),
        },
    )
    def post(self, request):
        data = validated_input(ReservationCreateInput, request.data)
        workload = workload_add_saved_ssh_keys(
            organization=self.organization,
            workload=workload_validate(data.get("workload")),
            ssh_key_ids=data.get("ssh_key_ids", []),
        )
        ctx = self.org_context
        if "quote" in data:
            quote = quote_get_for_org(organization=self.organization, public_id=data["quote"])
            reservation = reservation_create(
                organization=self.organization,
                user=ctx.user,
                quote=quote,
                workload=workload,
                max_price_per_gpu_hour=data.get("max_price"),
            )
        elif "listing" in data:
            reservation = reservation_create(
                organization=self.organization,
                user=ctx.user,
                listing=listing_get_for_sale(public_id=data["listing"]),
                gpu_model=data.get("gpu_model"),
                gpu_count=data["gpu_count"],
                starts_at=data.get("starts_at") or timezone.now(),
                ends_at=data["ends_at"],
                tier=data.get("tier"),
                term=data.get("term", Term.NONE),
                site=data.get("site"),
                workload=workload,
                max_price_per_gpu_hour=data.get("max_price"),
            )
        else:
            reservation = reservation_create(
                organization=self.organization,
                user=ctx.user,
                gpu_model=data["gpu_model"],
                gpu_count=data["gpu_count"],
                starts_at=data.get("starts_at") or timezone.now(),
                ends_at=data["ends_at"],
                tier=data.get("tier", Tier.ON_DEMAND),
                term=data.get("term", Term.NONE),
                site=data.get("site"),
                region=data.get("region"),
                min_reliability=data.get("min_reliability"),
                workload=workload,
                max_price_per_gpu_hour=data.get("max_price"),
            )
        # The service returns the reservation with everything it just wrote (transition,
        # allocations with their nodes): shown as GET shows it, without reading it back.
        return Response(
            reservation_detail_after_create(reservation), status=status.HTTP_201_CREATED
        )


def _detail(organization, public_id: str) -> dict:
    """The fresh detail, read back the way GET shows it."""
    return ReservationDetailOutput(
        reservation_get_for_org(organization=organization, public_id=public_id)
    ).data


class _OneReservation(ApiView):
    def reservation(self):
        return reservation_get_for_org(
            organization=self.organization, public_id=self.kwargs["reservation_id"]
        )


class ReservationDetailApi(_OneReservation):
    @extend_schema(
        tags=TAGS,
        operation_id="reservations_retrieve",
        summary="Retrieve a reservation, with the actions allowed now and its history",
        responses={200: ReservationDetailOutput, **errors(403, 404)},
    )
    def get(self, request, reservation_id: str):
        return Response(ReservationDetailOutput(self.reservation()).data)


class CancellationTermsApi(_OneReservation):
    @extend_schema(
        tags=TAGS,
        operation_id="reservations_cancellation_terms",
        summary="What cancelling now would refund (the rule is stated before it is applied)",
        responses={200: CancellationTermsOutput, **errors(403, 404, 409)},
    )
    def get(self, request, reservation_id: str):
        return Response(CancellationTermsOutput(cancellation_terms(self.reservation())).data)


class ReservationCancelInput(Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500, default="")
    expected_refund_fraction = serializers.DecimalField(
        required=False,
        max_digits=4,
        decimal_places=3,
        min_value=0,
        max_value=1,
        help_text="The refund_fraction cancellation-terms stated: if the rule now gives less "
        "(a notice boundary passed meanwhile), 409 refund_changed and nothing changes.",
    )


class ReservationCancelApi(_OneReservation):
    allowed_while_suspended = True

    @extend_schema(
        tags=TAGS,
        operation_id="reservations_cancel",
        summary="Cancel (before activation) or stop early (active); refund per cancellation-terms",
        request=ReservationCancelInput,
        responses={200: ReservationDetailOutput, **errors(400, 403, 404, 409, 415, 422)},
    )
    def post(self, request, reservation_id: str):
        reservation = self.reservation()
        data = validated_input(ReservationCancelInput, request.data)
        reservation_cancel(
            reservation=reservation,
            actor_label=self.org_context.actor_label,
            reason=data["reason"],
            expected_refund_fraction=data.get("expected_refund_fraction"),
        )
        return Response(_detail(self.organization, reservation.public_id))


class ExtensionTermsInput(Serializer):
    ends_at = serializers.DateTimeField(help_text="The new, later end to price.")


class ExtensionTermsOutput(Serializer):
    ends_at = serializers.DateTimeField(help_text="The current end.")
    new_ends_at = serializers.DateTimeField()
    currency = serializers.CharField()
    price_per_gpu_hour = serializers.DecimalField(max_digits=12, decimal_places=4)
    extra_amount = AmountField(help_text="What the extra time costs.")
    new_total = AmountField()
    charged_now = AmountField(
        help_text="Charged when the extension is made (a reserved term's extra time); "
        "on-demand and interruptible time is charged as it is used.",
    )
    rule = serializers.CharField()
    warnings = serializers.ListField(
        child=serializers.CharField(),
        help_text="What may still refuse or stop the extra time: a grid curtailment of the "
        "site during it. Empty when nothing is known.",
    )


class ExtensionTermsApi(_OneReservation):
    query_serializer = ExtensionTermsInput

    @extend_schema(
        tags=TAGS,
        operation_id="reservations_extension_terms",
        summary="What extending to ends_at would cost, before extending (nothing changes)",
        responses={200: ExtensionTermsOutput, **errors(400, 403, 404, 409)},
    )
    def get(self, request, reservation_id: str):
        data = self.query_input()
        terms = extension_terms(self.reservation(), data["ends_at"])
        return Response(ExtensionTermsOutput(terms).data)


class ReservationExtendInput(Serializer):
    ends_at = serializers.DateTimeField(
        help_text="The new, later end; same GPUs, same price (see extension-terms first)."
    )


class ReservationExtendApi(_OneReservation):
    @extend_schema(
        tags=TAGS,
        operation_id="reservations_extend",
        summary="Extend: move the end later if the same GPUs stay free and the extra time is "
        "funded",
        request=ReservationExtendInput,
        responses={200: ReservationDetailOutput, **errors(400, 402, 403, 404, 409, 415, 422)},
    )
    def post(self, request, reservation_id: str):
        reservation = self.reservation()
        data = validated_input(ReservationExtendInput, request.data)
        reservation_extend(
            reservation=reservation,
            new_ends_at=data["ends_at"],
            actor_label=self.org_context.actor_label,
        )
        return Response(_detail(self.organization, reservation.public_id))


class TelemetryInput(Serializer):
    since = serializers.DateTimeField(required=False, help_text="Default: 6 hours before until.")
    until = serializers.DateTimeField(
        required=False, help_text="Default: now, or the reservation's end if earlier."
    )

    def validate(self, attrs):
        since, until = attrs.get("since"), attrs.get("until")
        if since and until and since >= until:
            raise serializers.ValidationError({"since": "since must be before until."})
        if since and until and until - since > MAX_WINDOW:
            raise serializers.ValidationError(
                {"since": f"At most {MAX_WINDOW.days} days per request."}
            )
        return attrs


class TelemetryPointOutput(Serializer):
    t = serializers.DateTimeField(help_text="The minute (UTC) the figures are for.")
    utilization_pct = serializers.FloatField(allow_null=True, help_text="Mean over the minute.")
    memory_used_mib = serializers.IntegerField(allow_null=True, help_text="Most in the minute.")
    power_w = serializers.FloatField(allow_null=True, help_text="Mean board power.")
    temperature_c = serializers.IntegerField(allow_null=True, help_text="Hottest reading.")


class GpuSeriesOutput(Serializer):
    node = serializers.CharField()
    index = serializers.IntegerField(help_text="The GPU's index on its node.")
    starts_at = serializers.DateTimeField(help_text="When this GPU became the reservation's.")
    ends_at = serializers.DateTimeField(help_text="When it stops (or stopped) being.")
    points = TelemetryPointOutput(many=True)


class ReservationTelemetryOutput(Serializer):
    reservation = serializers.CharField()
    since = serializers.DateTimeField()
    until = serializers.DateTimeField()
    resolution_seconds = serializers.IntegerField()
    gpus = GpuSeriesOutput(many=True)


class ReservationTelemetryApi(_OneReservation):
    query_serializer = TelemetryInput

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="reservations_telemetry",
        summary="GPU utilisation, memory, power and temperature per minute, per GPU",
        responses={200: ReservationTelemetryOutput, **errors(400, 403, 404)},
    )
    def get(self, request, reservation_id: str):
        reservation = self.reservation()
        params = self.query_input()
        until = params.get("until") or min(timezone.now(), reservation.ends_at)
        since = params.get("since") or max(until - timedelta(hours=6), reservation.starts_at)
        if since >= until:
            since = until - timedelta(minutes=1)
        if until - since > MAX_WINDOW:
            since = until - MAX_WINDOW
        series = reservation_telemetry(reservation=reservation, since=since, until=until)
        body = {
            "reservation": reservation.public_id,
            "since": since,
            "until": until,
            "resolution_seconds": 60,
            "gpus": series,
        }
        return Response(ReservationTelemetryOutput(body).data)
