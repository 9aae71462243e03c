"""Cursor pagination: stable under inserts, opaque cursors, newest first."""

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, serializers
from rest_framework.pagination import CursorPagination

__all__ = ["NewestFirstCursorPagination", "SlugCursorPagination"]


class NewestFirstCursorPagination(CursorPagination):
    """?limit= (1–100, default 25) and ?cursor= from the `next`/`previous` links."""

    ordering = ("-created_at", "-id")
    page_size = 25
    page_size_query_param = "limit"
    max_page_size = 100

    def get_page_size(self, request):
        # DRF quietly falls back to the default for ?limit=abc and clamps ?limit=1000; an
        # integrator should learn that the limit they asked for is not the one applied.
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        limit = int(raw) if raw.isascii() and raw.isdigit() else None
        if limit is None or not 1 <= limit <= self.max_page_size:
            raise serializers.ValidationError(
                {
                    self.page_size_query_param: (
                        f"limit must be a whole number from 1 to {self.max_page_size}."
                    )
                },
                code="invalid_limit",
            )
        return limit

    def get_schema_operation_parameters(self, view):
        # The bounds get_page_size() enforces, so a client (or a fuzzer) reading the schema
        # does not send a limit it is then refused for.
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["description"] = (
                    f"Results per page, 1 to {self.max_page_size} (default {self.page_size})."
                )
                parameter["schema"].update(
                    minimum=1, maximum=self.max_page_size, default=self.page_size
                )
        return parameters

    def decode_cursor(self, request):
        # DRF answers a bad cursor with 404; it is bad input, so say so.
        try:
            return super().decode_cursor(request)
        except exceptions.NotFound:
            raise _invalid_cursor() from None

    def paginate_queryset(self, queryset, request, view=None):
        # A cursor that decodes but whose position is not a value of the ordering field (a
        # forged one: "p=garbage" where a time goes) fails in the query, as bad input.
        try:
            return super().paginate_queryset(queryset, request, view)
        except DjangoValidationError:
            raise _invalid_cursor() from None


def _invalid_cursor() -> serializers.ValidationError:
    return serializers.ValidationError(
        {"cursor": "Invalid cursor; use the next or previous link as given."},
        code="invalid_cursor",
    )


class SlugCursorPagination(NewestFirstCursorPagination):
    """For catalogue lists, which read best in slug order."""

    ordering = ("slug",)
