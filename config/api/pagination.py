"""Cursor pagination: stable under inserts, opaque cursors, newest first."""

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
        try:
            limit = int(raw)
        except ValueError:
            limit = None
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

    def decode_cursor(self, request):
        # DRF answers a bad cursor with 404; it is bad input, so say so.
        try:
            return super().decode_cursor(request)
        except exceptions.NotFound:
            raise serializers.ValidationError(
                {"cursor": "Invalid cursor; use the next or previous link as given."},
                code="invalid_cursor",
            ) from None


class SlugCursorPagination(NewestFirstCursorPagination):
    """For catalogue lists, which read best in slug order."""

    ordering = ("slug",)
