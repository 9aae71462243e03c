"""Cursor pagination: stable under inserts, opaque cursors, newest first."""

from rest_framework.pagination import CursorPagination

__all__ = ["NewestFirstCursorPagination", "SlugCursorPagination"]


class NewestFirstCursorPagination(CursorPagination):
    """?limit= (1–100, default 25) and ?cursor= from the `next`/`previous` links."""

    ordering = ("-created_at", "-id")
    page_size = 25
    page_size_query_param = "limit"
    max_page_size = 100


class SlugCursorPagination(NewestFirstCursorPagination):
    """For catalogue lists, which read best in slug order."""

    ordering = ("slug",)
