"""Retention: deleting what is past its window in batches, each batch its own transaction.

A retention job never holds locks on a large table for long, never builds one huge delete (a
day of events at fleet scale), and can stop at any point: what it deleted is committed, what
is left is found again by the next run. Which table keeps what, and why money is never
deleted: docs/retention.md.
"""

from django.conf import settings
from django.db import transaction
from django.db.models import QuerySet


def delete_in_batches(queryset: QuerySet, *, batch_size: int | None = None) -> int:
    """Delete the rows of `queryset` in primary-key order, `batch_size` rows a transaction
    (RETENTION_BATCH_SIZE by default); returns how many of its rows were deleted.

    Each batch goes through the ORM's delete, so rows that reference them with on_delete
    CASCADE go in the same transaction. Running it again finds nothing more to delete.
    """
    size = batch_size or settings.RETENTION_BATCH_SIZE
    label = queryset.model._meta.label
    total = 0
    while True:
        with transaction.atomic():
            ids = list(queryset.order_by("pk").values_list("pk", flat=True)[:size])
            if not ids:
                return total
            _, per_model = queryset.model._base_manager.filter(pk__in=ids).delete()
            total += per_model.get(label, 0)
        if len(ids) < size:
            return total
