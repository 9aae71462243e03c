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
