"""What every app's admin shares: records written by services, tasks and agents, which staff
look at and never edit."""

from datetime import datetime

from django import forms
from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Q, URLField
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

    def get_search_results(self, request, queryset, search_term):
        """Searched through indexes only, never a substring of every row (a ledger search
        read the whole table). Each of `search_fields` is either a field of this table, which
        the term must equal (an id, a key, a serial) or, for a name, start (a node's hostname,
        through its pattern index), or a related table's field (`node__hostname`,
        `organization__name`), looked up in that table first: by substring for a name (a small
        table: organisations, nodes, sites, endpoints), else exactly. Its rows are then found
        through the foreign key's index (the first 100 matches)."""
        term = search_term.strip()
        fields = self.get_search_fields(request)
        if not term or not fields:
            return queryset, False
        match = Q()
        for path in fields:
            match |= _indexed_match(queryset.model, path, term)
        return queryset.filter(match), False


# A related table's fields searched by substring: names people type part of. Every other
# field is matched exactly.
_SUBSTRING_FIELDS = frozenset({"name", "hostname", "slug", "url"})
_RELATED_MATCHES = 100


def _indexed_match(model, path: str, term: str) -> Q:
    first, _, rest = path.partition("__")
    if not rest:
        return Q(**{f"{first}__startswith" if first in _SUBSTRING_FIELDS else first: term})
    field = model._meta.get_field(first)
    lookup = "icontains" if rest.rsplit("__", 1)[-1] in _SUBSTRING_FIELDS else "exact"
    related = field.related_model._default_manager.filter(**{f"{rest}__{lookup}": term})
    if field.many_to_one or (field.one_to_one and field.concrete):
        ids = list(related.values_list("pk", flat=True)[:_RELATED_MATCHES])
        return Q(**{f"{field.attname}__in": ids})
    # A reverse relation (a node's GPUs): the rows the matches point at.
    ids = list(related.values_list(field.field.attname, flat=True)[:_RELATED_MATCHES])
    return Q(pk__in=ids)


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
