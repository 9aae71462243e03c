"""Resale of reserved time: GET/POST resale/listings, GET resale/listings/{id},
POST resale/listings/{id}/withdraw, GET resale/sales. Every member reads; reserving roles (and
keys with the write scope) list and withdraw. Buying is POST reservations with `listing`."""

import django_filters
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.views import FILTERED, ApiView, validated_input
from marketplace.funding import funding_gate
from marketplace.models import RESALE_TIER_CHOICES, ListingStatus, ResaleListing, Tier
from marketplace.selectors.resale import listing_get_for_org, listings_for_org
from marketplace.selectors.reservations import reservation_get_for_org
from marketplace.serializers import ListingOutput
from marketplace.services.resale import listing_create, listing_withdraw

TAGS = ["Resale"]


def _listings_output(listings) -> list:
    sold = [listing.pk for listing in listings if listing.status == ListingStatus.SOLD]
    settled = funding_gate().resale_settled(listing_ids=sold) if sold else {}
    return ListingOutput(listings, many=True, context={"settled": settled}).data


class ListingCreateInput(Serializer):
    reservation = serializers.CharField(max_length=32, help_text="res_…: your reserved term.")
    gpu_count = serializers.IntegerField(min_value=1, max_value=4096)
    node = serializers.CharField(
        required=False,
        max_length=255,
        help_text="Hostname of the term's node to list from; default: the best fit.",
    )
    starts_at = serializers.DateTimeField(help_text="Inside the term, not yet begun.")
    ends_at = serializers.DateTimeField(help_text="Inside the term.")
    price_per_gpu_hour = serializers.DecimalField(
        max_digits=12,
        decimal_places=4,
        min_value=0,
        help_text="Asking price per GPU-hour, in the term's currency; not below the floor.",
    )
    tier = serializers.ChoiceField(
        choices=RESALE_TIER_CHOICES,
        default=Tier.ON_DEMAND,
        help_text="The tier buyers get it at: on_demand, or interruptible (preempted by a "
        "curtailment like any interruptible work).",
    )


class ListingFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=ListingStatus.choices)
    reservation = django_filters.CharFilter(field_name="reservation__public_id")

    class Meta:
        model = ResaleListing
        fields = ["status", "reservation"]


class ListingListApi(ApiView):
    pagination_class = NewestFirstCursorPagination
    filter_backends = FILTERED
    filterset_class = ListingFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ResaleListing.objects.none()
        return listings_for_org(organization=self.organization).select_related("parent")

    @extend_schema(
        tags=TAGS,
        operation_id="resale_listings_list",
        summary="Your resale listings, newest first (open, sold, returned, withdrawn, expired)",
        responses={200: ListingOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        page = self.paginate_queryset(self.filter_queryset(self.get_queryset()))
        return self.get_paginated_response(_listings_output(page))

    @extend_schema(
        tags=TAGS,
        operation_id="resale_listings_create",
        summary="List whole GPUs of a reserved term for a future window, at an asking price",
        request=ListingCreateInput,
        responses={201: ListingOutput, **errors(400, 403, 404, 409, 415, 422)},
    )
    def post(self, request):
        data = validated_input(ListingCreateInput, request.data)
        reservation = reservation_get_for_org(
            organization=self.organization, public_id=data["reservation"]
        )
        listing = listing_create(
            organization=self.organization,
            reservation=reservation,
            gpu_count=data["gpu_count"],
            node=data.get("node"),
            starts_at=data["starts_at"],
            ends_at=data["ends_at"],
            price_per_gpu_hour=data["price_per_gpu_hour"],
            tier=data["tier"],
            user=self.org_context.user,
        )
        fresh = listing_get_for_org(organization=self.organization, public_id=listing.public_id)
        return Response(ListingOutput(fresh).data, status=status.HTTP_201_CREATED)


class _OneListing(ApiView):
    def listing(self) -> ResaleListing:
        return listing_get_for_org(
            organization=self.organization, public_id=self.kwargs["listing_id"]
        )


class ListingDetailApi(_OneListing):
    @extend_schema(
        tags=TAGS,
        operation_id="resale_listings_retrieve",
        summary="One of your listings (a sold one with what it has brought so far)",
        responses={200: ListingOutput, **errors(403, 404)},
    )
    def get(self, request, listing_id: str):
        return Response(ListingOutput(self.listing()).data)


class ListingWithdrawApi(_OneListing):
    @extend_schema(
        tags=TAGS,
        operation_id="resale_listings_withdraw",
        summary="Withdraw an open listing (twice is harmless; a sold one is 409)",
        request=None,
        responses={200: ListingOutput, **errors(403, 404, 409)},
    )
    def post(self, request, listing_id: str):
        listing = listing_withdraw(organization=self.organization, listing=self.listing())
        return Response(ListingOutput(listing).data)


class SaleListApi(ApiView):
    pagination_class = NewestFirstCursorPagination

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return ResaleListing.objects.none()
        return (
            listings_for_org(organization=self.organization)
            .filter(status=ListingStatus.SOLD)
            .select_related("parent")
        )

    @extend_schema(
        tags=TAGS,
        operation_id="resale_sales_list",
        summary="Your sales of resold time, newest first, with proceeds and fees so far",
        responses={200: ListingOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        page = self.paginate_queryset(self.get_queryset())
        return self.get_paginated_response(_listings_output(page))
