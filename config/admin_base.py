"""What every app's admin shares: records written by services, tasks and agents, which staff
look at and never edit."""

from datetime import datetime

from django import forms
from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import URLField
from django.utils.functional import cached_property

from config.currency import currency_refusal


def currency_clean(value: str) -> str:
    """A currency staff type (a rate card's, an account's), lower-cased, held to the rule
    settings.CURRENCY keeps (config.currency.currency_refusal)."""
    code = (value or "").strip().lower()
    refusal = currency_refusal(code)
    if refusal:
        raise forms.ValidationError(refusal)
    return code


class EstimatedCountPaginator(Paginator):
    """A list of a fleet-sized table, unfiltered, is counted from the planner's estimate
    (pg_class.reltuples, kept by autovacuum) instead of a COUNT(*) that reads every row: a
    million allocations took 0.2 s a count. A filtered or searched list, or a small table,
    is counted exactly."""

    exact_below = 10_000

    @cached_property
    def count(self) -> int:
        query = getattr(self.object_list, "query", None)
        if query is not None and not query.where and not query.distinct:
            model = self.object_list.model
            with connections[self.object_list.db].cursor() as cursor:
                cursor.execute(
                    "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                    [model._meta.db_table],
                )
                row = cursor.fetchone()
            if row is not None and row[0] >= self.exact_below:
                return row[0]
        return super().count


@admin.display(description="created at", ordering="pk")
def created_at_by_id(obj) -> datetime:
    """A list's created_at column of an append-only table, sorted by id when staff click it:
    the same order (rows are written in it), read from the primary key's index instead of
    sorting a table that only grows."""
    return obj.created_at


class FleetScaleAdmin(admin.ModelAdmin):
    """The list of a table that grows with the fleet (GPUs, reservations, allocations, the
    ledger): counted by estimate when unfiltered, and never counted twice (the "N total"
    beside a filtered count is a second COUNT(*) over the whole table). Narrowed by date with
    ranges (admin.DateFieldListFilter), never a date_hierarchy: its links read the table's
    first and last dates and its distinct years, months or days on every page."""

    paginator = EstimatedCountPaginator
    show_full_result_count = False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyAdmin(admin.ModelAdmin):
    """Records written by services, tasks and agents: staff look, never edit."""

    # The (read-only) form's URL fields as the portal's: a URL without a scheme is https.
    formfield_overrides = {URLField: {"assume_scheme": "https"}}

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False
