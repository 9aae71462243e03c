"""The admin at fleet scale: lists that do not count or sort a whole table twice, searches
that use indexes, pages whose queries do not grow with their rows, no <select> over a
fleet-sized table, and the records that only a service may change."""

from datetime import timedelta

import pytest
from django.contrib import admin
from django.contrib.admin.widgets import AutocompleteSelect, ForeignKeyRawIdWidget
from django.core.exceptions import EmptyResultSet
from django.db import connection
from django.forms import ModelChoiceField
from django.test.client import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import Hold, LedgerEntry
from config.admin_base import EstimatedCountPaginator, FleetScaleAdmin
from inventory.models import Gpu, GpuHealth, Node, Outage, OutageCause
from inventory.telemetry import gpu_mark_failed
from marketplace.models import Allocation, AuditEntry, Event, Quote, Reservation
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]

FLEET_SIZED = {Node, Gpu, Reservation, Allocation, Quote, Event, LedgerEntry, Hold}


@pytest.fixture
def fleet():
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    site = SiteFactory()
    nodes = make_nodes(site, model, 2)
    org = OrganizationFactory(name="Acme Research")
    return {"model": model, "site": site, "nodes": nodes, "org": org}


def _book(fleet, *, hours: int = 0, gpus: int = 2) -> Reservation:
    return reservation_create(
        organization=fleet["org"],
        gpu_model=fleet["model"].slug,
        gpu_count=gpus,
        starts_at=tomorrow(hours),
        ends_at=tomorrow(hours + 3),
        tier="on_demand",
    )


def _get(client, url: str, **params):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url, params)
    assert response.status_code == 200
    return response, [q["sql"] for q in ctx.captured_queries]


def test_an_unfiltered_allocation_list_is_counted_from_the_estimate(
    admin_client, fleet, monkeypatch
):
    for hours in (0, 4, 8):
        _book(fleet, hours=hours)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE marketplace_allocation")  # the estimate autovacuum keeps
    monkeypatch.setattr(EstimatedCountPaginator, "exact_below", 1)

    response, queries = _get(admin_client, reverse("admin:marketplace_allocation_changelist"))

    counts = [q for q in queries if "COUNT(" in q and "marketplace_allocation" in q]
    assert counts == []
    assert response.context["cl"].result_count == 6
    assert len(response.context["cl"].result_list) == 6


def test_a_filtered_list_is_counted_once_and_exactly(admin_client, fleet):
    _book(fleet)

    response, queries = _get(
        admin_client, reverse("admin:marketplace_reservation_changelist"), status="scheduled"
    )

    counts = [q for q in queries if "COUNT(" in q and "marketplace_reservation" in q]
    assert len(counts) == 1  # not a second one over the whole table for "N total"
    assert (
        response.context["cl"].result_count
        == Reservation.objects.filter(status="scheduled").count()
    )


@pytest.mark.parametrize(
    "name",
    [
        "marketplace_reservation",
        "marketplace_allocation",
        "inventory_node",
        "inventory_gpu",
        "inventory_site",
    ],
)
def test_a_changelist_takes_the_same_queries_for_one_row_or_many(admin_client, fleet, name):
    _book(fleet)
    url = reverse(f"admin:{name}_changelist")
    _get(admin_client, url)  # the process's first page reads what it caches
    _, few = _get(admin_client, url)
    for hours in (4, 8, 12, 16):
        _book(fleet, hours=hours, gpus=4)

    _, many = _get(admin_client, url)

    assert len(many) == len(few) <= 12


def test_a_node_page_takes_the_same_queries_for_one_booking_or_many(admin_client, fleet):
    node = fleet["nodes"][0]
    _book(fleet, gpus=16)  # every GPU of both nodes
    url = reverse("admin:inventory_node_change", args=[node.pk])
    _get(admin_client, url)  # the process's first page reads what it caches
    _, few = _get(admin_client, url)
    for hours in (4, 8, 12):
        _book(fleet, hours=hours, gpus=16)

    response, many = _get(admin_client, url)

    assert Allocation.objects.filter(node=node, is_live=True).count() == 32
    assert f"{node.hostname}/gpu7" in response.content.decode()
    assert len(many) == len(few)


def test_the_site_list_counts_gpus_for_its_rows_only(admin_client, fleet):
    Node.objects.filter(pk=fleet["nodes"][1].pk).update(status="draining")

    response, queries = _get(admin_client, reverse("admin:inventory_site_changelist"))

    site = next(s for s in response.context["cl"].result_list if s.pk == fleet["site"].pk)
    assert (site.gpu_total, site.gpu_available) == (16, 8)
    # The count and the filters' choices do not read the GPUs.
    for sql in queries:
        if "COUNT(*)" in sql or "DISTINCT" in sql:
            assert "inventory_gpu" not in sql


def test_allocations_are_found_by_reservation_id_or_hostname_exactly(admin_client, fleet):
    first, second = _book(fleet), _book(fleet, hours=4)
    url = reverse("admin:marketplace_allocation_changelist")
    node = Allocation.objects.filter(reservation=second).first().node

    by_id, queries = _get(admin_client, url, q=f" {first.public_id} ")
    by_host, _ = _get(admin_client, url, q=node.hostname)
    partial, _ = _get(admin_client, url, q=first.public_id[:-2])

    assert {a.reservation_id for a in by_id.context["cl"].result_list} == {first.pk}
    assert {a.node_id for a in by_host.context["cl"].result_list} == {node.pk}
    assert len(by_host.context["cl"].result_list) == Allocation.objects.filter(node=node).count()
    assert list(partial.context["cl"].result_list) == []
    assert not any("LIKE" in sql for sql in queries)


def test_reservations_are_found_by_id_start_or_organisation(admin_client, fleet):
    mine = _book(fleet)
    other_org = OrganizationFactory(name="Other Lab")
    other = reservation_create(
        organization=other_org,
        gpu_model=fleet["model"].slug,
        gpu_count=1,
        starts_at=tomorrow(4),
        ends_at=tomorrow(6),
        tier="on_demand",
    )
    url = reverse("admin:marketplace_reservation_changelist")

    by_prefix, queries = _get(admin_client, url, q=mine.public_id[:-3])
    by_org_name, _ = _get(admin_client, url, q="acme")
    by_org_id, _ = _get(admin_client, url, q=other_org.public_id)

    # A start of the id (its pattern index), never a substring of every id (a full read).
    searched = [q for q in queries if 'FROM "marketplace_reservation"' in q]
    assert searched
    assert not any("UPPER(" in q or "LIKE '%" in q for q in searched)

    assert mine in by_prefix.context["cl"].result_list
    assert other not in by_prefix.context["cl"].result_list
    assert list(by_org_name.context["cl"].result_list) == [mine]
    assert list(by_org_id.context["cl"].result_list) == [other]


def test_no_admin_form_offers_a_select_over_a_fleet_sized_table(admin_user):
    request = RequestFactory().get("/admin/")
    request.user = admin_user
    offenders = []
    for model, model_admin in admin.site._registry.items():
        admins = [model_admin, *model_admin.get_inline_instances(request)]
        for each in admins:
            inline = each is not model_admin
            add = (
                each.has_add_permission(request, None)
                if inline
                else each.has_add_permission(request)
            )
            if not add and not each.has_change_permission(request):
                continue  # shown read-only, as text
            if each is model_admin:
                form = each.get_form(request, obj=None)
            else:
                form = each.get_formset(request, obj=None).form
            for name, field in form.base_fields.items():
                if not isinstance(field, ModelChoiceField):
                    continue
                if field.queryset.model not in FLEET_SIZED:
                    continue
                widget = getattr(field.widget, "widget", field.widget)  # the related wrapper
                if not isinstance(widget, ForeignKeyRawIdWidget | AutocompleteSelect):
                    offenders.append(f"{type(each).__name__}.{name}")
    assert offenders == []


def test_an_open_gpu_outage_ends_only_when_its_gpu_returns_to_service(admin_client, fleet):
    gpu = fleet["nodes"][0].gpus.get(index=3)
    gpu_mark_failed(gpu=gpu, actor=None, reason="xid 79", actor_label="test")
    outage = Outage.objects.get(gpu=gpu, ended_at=None)
    url = reverse("admin:inventory_outage_change", args=[outage.pk])
    ended = timezone.now() - timedelta(seconds=1)

    page = admin_client.get(url)
    response = admin_client.post(
        url,
        {
            "ended_at_0": ended.strftime("%Y-%m-%d"),
            "ended_at_1": ended.strftime("%H:%M:%S"),
            "detail": "closed by hand",
        },
    )

    assert 'name="ended_at_0"' not in page.content.decode()
    assert response.status_code == 302
    outage.refresh_from_db()
    gpu.refresh_from_db()
    assert outage.ended_at is None
    assert outage.detail == "closed by hand"
    assert gpu.health == GpuHealth.FAILED


def test_a_node_outage_staff_recorded_is_still_closed_on_its_page(admin_client, fleet):
    node = fleet["nodes"][1]
    started = timezone.now() - timedelta(hours=2)
    outage = Outage.objects.create(
        node=node, started_at=started, cause=OutageCause.HARDWARE_FAILURE
    )
    ended = timezone.now() - timedelta(minutes=5)

    response = admin_client.post(
        reverse("admin:inventory_outage_change", args=[outage.pk]),
        {
            "ended_at_0": ended.strftime("%Y-%m-%d"),
            "ended_at_1": ended.strftime("%H:%M:%S"),
            "detail": "PSU replaced",
        },
    )

    assert response.status_code == 302
    outage.refresh_from_db()
    assert outage.ended_at is not None
    assert abs(outage.ended_at - ended) < timedelta(seconds=1)


def test_the_reservation_list_is_newest_first_by_its_indexed_id(admin_client, fleet):
    first, second = _book(fleet), _book(fleet, hours=4)

    response, queries = _get(admin_client, reverse("admin:marketplace_reservation_changelist"))

    assert list(response.context["cl"].result_list) == [second, first]
    listed = [q for q in queries if 'ORDER BY "marketplace_reservation".' in q]
    assert listed
    assert all('ORDER BY "marketplace_reservation"."id" DESC' in q for q in listed)


def test_the_audit_list_reads_no_dates_of_the_whole_log_and_is_newest_first_by_id(
    admin_client, fleet
):
    entries = [
        AuditEntry.objects.create(organization=fleet["org"], actor="user:ann",
                                  action="api_key.create", object_type="api_key", object_id=f"k{n}")
        for n in range(3)
    ]  # fmt: skip
    url = reverse("admin:marketplace_auditentry_changelist")
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)

    response, queries = _get(admin_client, url)
    clicked, clicked_queries = _get(admin_client, url, o="0")  # its "created at" column
    since_today, _ = _get(admin_client, url, created_at__gte=str(today))  # as its link
    from_tomorrow, _ = _get(admin_client, url, created_at__gte=str(today + timedelta(days=1)))

    # A date hierarchy read the MIN/MAX and the DISTINCT days of created_at (unindexed) over
    # the whole log on every page; the date filter's links read nothing.
    assert not [q for q in queries if "DATE_TRUNC" in q or "MIN(" in q]
    listed = [
        q.split("ORDER BY")[1]
        for q in queries + clicked_queries
        if 'FROM "marketplace_auditentry"' in q and "ORDER BY" in q and "DISTINCT" not in q
    ]
    assert listed == [' "marketplace_auditentry"."id" DESC', ' "marketplace_auditentry"."id" ASC']
    assert list(response.context["cl"].result_list) == entries[::-1]
    assert list(clicked.context["cl"].result_list) == entries
    assert list(since_today.context["cl"].result_list) == entries[::-1]
    assert list(from_tomorrow.context["cl"].result_list) == []


def test_no_list_of_a_table_that_grows_with_the_fleet_has_a_date_drill_down():
    """A date_hierarchy reads the whole table's dates on every page (MIN/MAX, then DISTINCT
    years, months or days); these lists narrow by date ranges instead."""
    from django.contrib import admin as django_admin

    from config.admin_base import FleetScaleAdmin

    fleet_scale = {
        type(model_admin).__name__: model_admin
        for model_admin in django_admin.site._registry.values()
        if isinstance(model_admin, FleetScaleAdmin)
    }

    assert {"ReservationAdmin", "EventAdmin", "AuditEntryAdmin", "OutageAdmin"} <= set(fleet_scale)
    assert [name for name, a in fleet_scale.items() if a.date_hierarchy] == []


def _fleet_admins():
    return sorted(
        (
            (model, model_admin)
            for model, model_admin in admin.site._registry.items()
            if isinstance(model_admin, FleetScaleAdmin) and model_admin.search_fields
        ),
        key=lambda pair: pair[0]._meta.label,
    )


@pytest.mark.parametrize(
    ("model", "model_admin"),
    _fleet_admins(),
    ids=lambda value: value._meta.label if isinstance(value, type) else "",
)
def test_every_search_of_a_table_that_grows_with_the_fleet_uses_an_index(
    admin_user, fleet, model, model_admin
):
    """With sequential scans priced out, the planner still reads the table whole (a Seq Scan,
    or every entry of an index with a filter) only where no index can answer: each search
    field must be one (ids, keys, a related table's rows through its foreign key's index),
    never a substring of every row."""
    _book(fleet)  # rows for the related lookups to find (the organisation by name)
    request = RequestFactory().get("/admin/", {"q": "Acme"})
    request.user = admin_user
    found, _ = model_admin.get_search_results(request, model._default_manager.all(), "Acme")
    try:
        sql, params = found.query.sql_with_params()
    except EmptyResultSet:
        return  # nothing can match: no query at all
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN (FORMAT JSON) {sql}", params)
        plan = cursor.fetchone()[0][0]["Plan"]
    whole = [
        node["Node Type"]
        for node in _plan_nodes(plan)
        if node.get("Relation Name") == model._meta.db_table
        and (
            node["Node Type"] == "Seq Scan"
            or "Scan" in node["Node Type"]
            and "Index Cond" not in node
            and "Bitmap" not in node["Node Type"]
        )
    ]
    assert whole == [], plan


def _plan_nodes(node):
    yield node
    for child in node.get("Plans", ()):
        yield from _plan_nodes(child)


def test_a_ledger_search_finds_an_organisations_lines_and_an_entry_by_its_exact_id(
    admin_client, fleet
):
    other = OrganizationFactory(name="Other Lab")
    mine = LedgerEntry.objects.create(organization=fleet["org"], kind="credit", amount_minor=100,
                                      currency="usd", idempotency_key="a")  # fmt: skip
    theirs = LedgerEntry.objects.create(organization=other, kind="credit", amount_minor=200,
                                        currency="usd", idempotency_key="b")  # fmt: skip
    url = reverse("admin:billing_ledgerentry_changelist")

    def found(term):
        return {e.pk for e in admin_client.get(url, {"q": term}).context["cl"].result_list}

    assert found("acme res") == {mine.pk}  # part of the organisation's name
    assert found(theirs.public_id) == {theirs.pk}
    assert found(theirs.public_id[:-2]) == set()  # ids exactly, never a substring
    assert found(other.public_id) == {theirs.pk}
