"""Staff tools for the inventory.

Status is never edited in a form: it changes only through the actions below, which call the
services, so every change is checked and recorded as a StatusChange with who and why. Every
action needs the change permission on its model: staff who may only view do not act.
"""

from collections.abc import Callable
from datetime import timedelta
from functools import partial

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from config.admin_base import FleetScaleAdmin
from config.errors import ApplicationError
from inventory import grid_prices, services, telemetry
from inventory.burn_in import burn_in_request
from inventory.models import (
    BurnIn,
    Gpu,
    GpuHealthChange,
    GpuMinute,
    GpuModel,
    HealthRules,
    MaintenanceWindow,
    Node,
    NodeStatus,
    NodeToken,
    Outage,
    OutageCause,
    PriceZone,
    Site,
    SiteStatus,
    StatusChange,
    ZonePrice,
)
from inventory.node_bookings import node_bookings
from inventory.selectors import site_capacity_summary, site_list_with_capacity


class StatusActionForm(ActionForm):
    """The action bar gains a reason box; the reason is recorded with each status change."""

    reason = forms.CharField(
        required=False,
        max_length=500,
        widget=forms.TextInput(attrs={"placeholder": "reason (recorded)", "size": 40}),
    )


def _apply(
    request: HttpRequest,
    queryset: QuerySet,
    service: Callable,
    target: str,
    verb: str,
) -> None:
    """Run a status service on each selected row; report successes and refusals one by one."""
    reason = request.POST.get("reason", "").strip() or f"{verb} from the admin"
    done = []
    for obj in queryset.order_by("pk"):
        try:
            service(**{target: obj}, actor=request.user, reason=reason)
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            done.append(str(obj))
    if done:
        messages.success(request, f"{verb}: {', '.join(done)}.")


def _staff_action(action: str) -> Callable:
    return partial(services.status_change, action=action)


# What taking nodes out of service does to the bookings on them, said before it is done.
_NODE_CONSEQUENCES = {
    "drain": "Nothing new is booked on these nodes. The reservations listed keep their GPUs: "
    "those running run on, and those booked start here as booked.",
    "set_maintenance": "Nothing new is booked on these nodes. Running workloads are not "
    "stopped by this: ask their customers, or wait for them to end, if the work needs the "
    "node down. A booked reservation that starts while its node is out of service is placed "
    "on other free GPUs of its model at its site, or fails if there are none.",
    "retire": "Final: the node leaves the fleet and its agent tokens are revoked. A node is "
    "retired only when none of its GPUs is booked from now on, so the nodes with bookings "
    "listed here will be refused: drain them and retire them once those bookings end.",
}


# What taking sites out of sale does to the bookings at them, said before it is done.
_SITE_CONSEQUENCES = {
    "curtail": "Nothing new is sold at these sites and no booking there is extended: this stops "
    "sales only (to preempt interruptible work, announce a grid curtailment under Marketplace "
    "→ Curtailments). The reservations listed keep their GPUs: those running run on, and those "
    "booked start as booked; one whose node or GPU fails meanwhile cannot be moved to other "
    "GPUs at its site, and fails.",
    "set_maintenance": "Nothing new is sold at these sites and no booking there is extended. "
    "Running workloads are not stopped by this, and those booked start on their nodes as "
    "booked: ask their customers, or wait for them to end, if the work needs the site down. "
    "One whose node or GPU fails meanwhile cannot be moved to other GPUs at its site, and fails.",
    "retire": "Final: the site leaves the fleet and cannot come back. A site is retired only "
    "once all its nodes are (and a node only when none of its GPUs is booked from now on), so "
    "the sites listed with nodes not retired will be refused: retire their nodes first.",
}


def _status_confirm_page(
    model_admin: admin.ModelAdmin,
    request: HttpRequest,
    *,
    template: str,
    hostnames: dict[int, str],
    action: str,
    verb: str,
    **context,
) -> TemplateResponse:
    """A status action's page before it is taken: the reservations holding GPUs of the nodes
    it touches (`hostnames`, by node id) from now on, and a form that confirms it."""
    bookings = node_bookings(hostnames, now=timezone.now())
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.model._meta,
        "bookings": [{"node": hostnames[b.node_id], "booking": b} for b in bookings],
        "booked_nodes": len({b.node_id for b in bookings}),
        "action": action,
        "verb": f"Yes, {verb.lower()}",
        "reason": request.POST.get("reason", ""),
        **context,
    }
    return TemplateResponse(request, template, context)


def _node_status_confirm(
    model_admin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet, action: str, verb: str
) -> TemplateResponse | None:
    """The page that lists the reservations a node action touches, before it is taken; None
    once staff confirmed it there (the action then runs)."""
    if request.POST.get("confirmed") == "yes":
        return None
    nodes = list(queryset.order_by("pk"))
    return _status_confirm_page(
        model_admin,
        request,
        template="admin/inventory/node/status_confirm.html",
        hostnames={node.pk: node.hostname for node in nodes},
        action=action,
        verb=verb,
        title=f"{verb} {len(nodes)} node(s)?",
        nodes=nodes,
        consequence=_NODE_CONSEQUENCES[action],
        table_id="node-bookings",
    )


def _site_status_confirm(
    model_admin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet, action: str, verb: str
) -> TemplateResponse | None:
    """As _node_status_confirm, for a site action: the sites with their nodes, and the
    reservations holding GPUs of those nodes from now on."""
    if request.POST.get("confirmed") == "yes":
        return None
    sites = list(queryset.order_by("pk"))
    nodes = Node.objects.filter(site__in=sites).values_list("pk", "hostname", "site_id", "status")
    hostnames, counts = {}, {site.pk: [0, 0] for site in sites}  # [nodes, not retired]
    for pk, hostname, site_id, status in nodes:
        hostnames[pk] = hostname
        counts[site_id][0] += 1
        counts[site_id][1] += status != NodeStatus.RETIRED
    rows = [{"site": s, "nodes": counts[s.pk][0], "in_fleet": counts[s.pk][1]} for s in sites]
    return _status_confirm_page(
        model_admin,
        request,
        template="admin/inventory/site/status_confirm.html",
        hostnames=hostnames,
        action=action,
        verb=verb,
        title=f"{verb} {len(sites)} site(s)?",
        sites=rows,
        consequence=_SITE_CONSEQUENCES[action],
        table_id="site-bookings",
    )


class StatusChangeInline(admin.TabularInline):
    model = StatusChange
    fields = ["at", "from_status", "to_status", "actor_label", "reason"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-at", "-id"]

    def get_queryset(self, request):
        # Each row is titled by its node or site (StatusChange.__str__): read with the row, not
        # once per change in a history that grows with every status the node or site has had.
        return super().get_queryset(request).select_related("node", "site")

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


class SiteStatusChangeInline(StatusChangeInline):
    fk_name = "site"


class NodeStatusChangeInline(StatusChangeInline):
    fk_name = "node"


class PriceCsvForm(forms.Form):
    file = forms.FileField(
        help_text="CSV with the header zone,starts_at,ends_at,price_per_mwh,currency; times "
        "ISO 8601 with a UTC offset; currency may be empty (the zone's)."
    )
    dry_run = forms.BooleanField(required=False, help_text="Check and report; write nothing.")


@admin.register(PriceZone)
class PriceZoneAdmin(admin.ModelAdmin):
    """Zones with their feed's health: when a price last arrived, how far ahead prices are
    published, the price now, and what is wrong (stale, gaps, absurd values, no price now)."""

    list_display = ["name", "code", "currency", "timezone", "feed_status", "last_received",
                    "horizon", "price_now"]  # fmt: skip
    search_fields = ["name", "code"]
    actions = ["load_prices_csv"]

    def get_queryset(self, request):
        return grid_prices.price_zones_with_feed_health()

    def _health(self, zone: PriceZone) -> grid_prices.FeedHealth:
        return grid_prices.FeedHealth.of(zone, now=timezone.now())

    @admin.display(description="feed")
    def feed_status(self, zone: PriceZone) -> str:
        problems = self._health(zone).problems
        if not problems:
            return "ok"
        return format_html('<strong class="errornote">{}</strong>', ", ".join(problems))

    @admin.display(description="last price received", ordering="feed_last_received_at")
    def last_received(self, zone: PriceZone):
        return zone.feed_last_received_at

    @admin.display(description="prices published until", ordering="feed_horizon")
    def horizon(self, zone: PriceZone):
        return zone.feed_horizon

    @admin.display(description="price now (per MWh)")
    def price_now(self, zone: PriceZone):
        return zone.feed_current_price

    @admin.action(
        description="Load prices for the selected zones from a CSV file…", permissions=["change"]
    )
    def load_prices_csv(self, request, queryset):
        zones = list(queryset)
        form = PriceCsvForm(request.POST or None, request.FILES or None)
        if "apply" in request.POST and form.is_valid():
            upload = form.cleaned_data["file"]
            try:
                result = grid_prices.zone_prices_csv_load(
                    data=upload.read(),
                    source=f"csv:{request.user.get_username()}",
                    zones=zones,
                    dry_run=form.cleaned_data["dry_run"],
                )
            except grid_prices.PricesRefused as exc:
                form.add_error(None, f"{len(exc.problems)} problem(s), nothing was written.")
                problems = exc.problems
            else:
                verb = "Checked (nothing written)" if form.cleaned_data["dry_run"] else "Loaded"
                messages.success(request, f"{verb} {upload.name}: {result.summary()}.")
                return None
        else:
            problems = []
        return TemplateResponse(
            request,
            "admin/inventory/pricezone/load_prices.html",
            {
                **self.admin_site.each_context(request),
                "title": "Load power prices from a CSV file",
                "zones": zones,
                "form": form,
                "problems": problems,
                "opts": self.model._meta,
                "action_checkbox_name": admin.helpers.ACTION_CHECKBOX_NAME,
            },
            status=400 if problems else 200,
        )


@admin.register(ZonePrice)
class ZonePriceAdmin(FleetScaleAdmin):
    """Written by the feeds (CSV upload, the API); read-only here so every price has a source."""

    list_display = ["zone", "starts_at", "ends_at", "price_per_mwh", "currency", "source",
                    "received_at"]  # fmt: skip
    list_filter = ["zone", ("starts_at", admin.DateFieldListFilter)]
    list_select_related = ["zone"]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Site)
class SiteAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "slug",
        "region",
        "country",
        "grid_operator",
        "price_zone",
        "cooling",
        "status",
        "gpu_total",
        "gpu_available",
        "reliability_30d",
    ]
    list_filter = ["status", "region", "country", "cooling", "price_zone"]
    search_fields = ["name", "slug", "region", "grid_operator", "former_use"]
    readonly_fields = ["status", "created_at", "updated_at"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [SiteStatusChangeInline]
    action_form = StatusActionForm
    actions = ["activate", "curtail", "set_maintenance", "return_to_service", "retire"]
    change_form_template = "admin/inventory/site/change_form.html"

    def get_queryset(self, request):
        return site_list_with_capacity().select_related("price_zone")

    @admin.display(description="GPUs", ordering="gpu_total")
    def gpu_total(self, site: Site) -> int:
        return site.gpu_total

    @admin.display(description="GPUs available", ordering="gpu_available")
    def gpu_available(self, site: Site) -> int:
        return site.gpu_available

    def change_view(self, request, object_id, form_url="", extra_context=None):
        site = self.get_object(request, object_id)
        extra_context = extra_context or {}
        if site is not None:
            extra_context["capacity"] = site_capacity_summary(site=site)
            extra_context["node_statuses"] = list(NodeStatus.values)
        return super().change_view(request, object_id, form_url, extra_context)

    @admin.action(description="Activate selected sites", permissions=["change"])
    def activate(self, request, queryset):
        _apply(request, queryset, _staff_action("activate"), "site", "Activated")

    @admin.action(
        description="Mark selected sites curtailed (stops sales only; to preempt interruptible "
        "work, announce it under Marketplace → Curtailments)…",
        permissions=["change"],
    )
    def curtail(self, request, queryset):
        return _site_status_confirm(self, request, queryset, "curtail", "Curtail") or _apply(
            request, queryset, _staff_action("curtail"), "site", "Curtailed"
        )

    @admin.action(description="Put selected sites in maintenance…", permissions=["change"])
    def set_maintenance(self, request, queryset):
        page = _site_status_confirm(
            self, request, queryset, "set_maintenance", "Put in maintenance"
        )
        return page or _apply(
            request, queryset, _staff_action("set_maintenance"), "site", "Put in maintenance"
        )

    @admin.action(description="Return selected sites to service", permissions=["change"])
    def return_to_service(self, request, queryset):
        _apply(request, queryset, _staff_action("return_to_service"), "site", "Returned to service")

    @admin.action(description="Retire selected sites (final)…", permissions=["change"])
    def retire(self, request, queryset):
        return _site_status_confirm(self, request, queryset, "retire", "Retire") or _apply(
            request, queryset, _staff_action("retire"), "site", "Retired"
        )


@admin.register(GpuModel)
class GpuModelAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "vendor", "memory_gb", "tdp_watts", "interconnect"]
    list_filter = ["vendor"]
    search_fields = ["slug", "name", "vendor"]


class GpuInlineForm(forms.ModelForm):
    """A GPU added on the node's page gets its index; an existing GPU keeps it (its physical
    identity: jobs send it as gpu_indexes, telemetry and health name the GPU by it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None and "index" in self.fields:
            self.fields["index"].disabled = True  # a posted value is ignored


class GpuInline(admin.TabularInline):
    model = Gpu
    form = GpuInlineForm
    fields = ["index", "serial", "health", "health_reason", "health_reported_at"]
    # Health changes only through the GPU actions (recorded, outage opened or closed).
    readonly_fields = ["health", "health_reason", "health_reported_at"]
    extra = 0

    def get_queryset(self, request):
        # Each row is titled by the GPU's name, its node's hostname: read with the GPUs.
        return super().get_queryset(request).select_related("node")


class OutageInline(admin.TabularInline):
    """The node's outages, to read: staff record one on the Outages page (checked there)."""

    model = Outage
    fields = ["cause", "gpu", "started_at", "ended_at", "detail"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-started_at"]

    def get_queryset(self, request):
        # An outage (its row's title) and its GPU are named by their node's hostname: read
        # with the outages, not two or three queries per outage in the node's whole history.
        return super().get_queryset(request).select_related("node", "gpu__node")

    def has_add_permission(self, request, obj=None) -> bool:
        return False


class NodeTokenInline(admin.TabularInline):
    model = NodeToken
    fields = ["prefix", "label", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("node")  # each row's title

    def has_add_permission(self, request, obj=None) -> bool:
        return False  # tokens are issued with the "Issue agent token" action (secret shown once)


@admin.register(Node)
class NodeAdmin(FleetScaleAdmin):
    list_display = [
        "hostname",
        "site",
        "gpu_model",
        "gpu_count",
        "status",
        "last_heartbeat_at",
        "agent_version",
        "reliability_30d",
    ]
    list_filter = ["status", "site", "gpu_model"]
    list_select_related = ["site", "gpu_model"]
    search_fields = ["hostname", "gpus__serial"]
    readonly_fields = [
        "status",
        "status_changed_at",
        "last_heartbeat_at",
        "agent_version",
        "telemetry_error",
        "gpu_telemetry",
        "created_at",
        "updated_at",
    ]
    inlines = [GpuInline, OutageInline, NodeTokenInline, NodeStatusChangeInline]

    @admin.action(
        description="Burn in selected nodes (in maintenance), then return them to sale if it passes",
        permissions=["change"],
    )
    def burn_in(self, request, queryset):
        _burn_in(request, {node: None for node in queryset.select_related("site")})

    @admin.display(description="GPU telemetry (last 15 minutes, per minute)")
    def gpu_telemetry(self, node: Node) -> str:
        gpus = {g.pk: g.index for g in node.gpus.all()} if node.pk else {}
        since = timezone.now() - timedelta(minutes=15)
        rows = GpuMinute.objects.filter(gpu_id__in=list(gpus), minute__gte=since).order_by(
            "-minute", "gpu_id"
        )
        return _minutes_table(rows, lambda row: f"gpu{gpus[row.gpu_id]}")

    action_form = StatusActionForm
    actions = [
        "drain",
        "set_maintenance",
        "burn_in",
        "return_to_service",
        "retire",
        "issue_token",
    ]

    def get_queryset(self, request):
        # A subquery, not Count("gpus"): the search by GPU serial joins the GPUs again, and a
        # Count over that join multiplied (an 8-GPU node found by "GPU" showed 64). The admin
        # keeps one row per node found through that join itself (may_have_duplicates).
        gpus = (
            Gpu.objects.filter(node=OuterRef("pk"))
            .order_by()
            .values("node")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(gpu_count=Coalesce(Subquery(gpus, output_field=IntegerField()), 0))
        )

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "site":  # a retired site is final: no node joins it
            kwargs["queryset"] = Site.objects.exclude(status=SiteStatus.RETIRED)
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def get_readonly_fields(self, request, obj=None):
        # The GPUs on a node are of its model; a different model means different hardware.
        # Its site is where it physically is: placement, curtailment and prices go by it.
        fields = super().get_readonly_fields(request, obj)
        return [*fields, "gpu_model", "site"] if obj is not None else fields

    @admin.display(description="GPUs", ordering="gpu_count")
    def gpu_count(self, node: Node) -> int:
        return node.gpu_count

    @admin.action(description="Drain selected nodes…", permissions=["change"])
    def drain(self, request, queryset):
        return _node_status_confirm(self, request, queryset, "drain", "Drain") or _apply(
            request, queryset, _staff_action("drain"), "node", "Drained"
        )

    @admin.action(description="Put selected nodes in maintenance…", permissions=["change"])
    def set_maintenance(self, request, queryset):
        page = _node_status_confirm(
            self, request, queryset, "set_maintenance", "Put in maintenance"
        )
        return page or _apply(
            request, queryset, _staff_action("set_maintenance"), "node", "Put in maintenance"
        )

    @admin.action(description="Return selected nodes to service", permissions=["change"])
    def return_to_service(self, request, queryset):
        _apply(request, queryset, _staff_action("return_to_service"), "node", "Returned to service")

    @admin.action(description="Retire selected nodes (final)…", permissions=["change"])
    def retire(self, request, queryset):
        return _node_status_confirm(self, request, queryset, "retire", "Retire") or _apply(
            request, queryset, _staff_action("retire"), "node", "Retired"
        )

    @admin.action(description="Issue an agent token for selected nodes", permissions=["change"])
    def issue_token(self, request, queryset):
        """Shows each new secret once, on a page of its own (never stored, nor put in a
        message, which would travel in a cookie)."""
        label = request.POST.get("reason", "").strip() or f"issued by {request.user}"
        issued = []
        for node in queryset.order_by("pk"):
            try:
                token, secret = services.node_token_issue(node=node, label=label)
            except ApplicationError as exc:
                messages.error(request, exc.message)
            else:
                issued.append({"node": node, "token": token, "secret": secret})
        if not issued:
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Agent tokens issued",
            "issued": issued,
            "opts": self.model._meta,
        }
        response = TemplateResponse(request, "admin/inventory/node/issued_tokens.html", context)
        response["Cache-Control"] = "no-store"
        return response


def _minutes_table(rows, label) -> str:
    cells = format_html_join(
        "",
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        (
            (
                f"{row.minute:%Y-%m-%d %H:%M}",
                label(row),
                row.samples,
                "–" if row.utilization_pct_avg is None else f"{row.utilization_pct_avg:.0f} %",
                "–" if row.memory_used_mib_max is None else f"{row.memory_used_mib_max} MiB",
                "–" if row.power_w_avg is None else f"{row.power_w_avg:.0f} W",
                "–" if row.temperature_c_max is None else f"{row.temperature_c_max} °C",
            )
            for row in rows
        ),
    )
    if not cells:
        return "No telemetry in this window."
    return format_html(
        "<table><thead><tr><th>minute (UTC)</th><th>GPU</th><th>samples</th>"
        "<th>utilisation</th><th>memory</th><th>power</th><th>hottest</th></tr></thead>"
        "<tbody>{}</tbody></table>",
        cells,
    )


class GpuHealthChangeInline(admin.TabularInline):
    model = GpuHealthChange
    fields = ["at", "from_health", "to_health", "actor_label", "reason"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-at", "-id"]

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Gpu)
class GpuAdmin(FleetScaleAdmin):
    list_display = [
        "__str__",
        "node",
        "index",
        "serial",
        "health",
        "health_reason",
        "reliability_30d",
    ]
    list_filter = ["health", "node__site", "node__gpu_model", "node__status"]
    list_select_related = ["node"]
    search_fields = ["serial", "node__hostname"]
    readonly_fields = [
        "health",
        "health_reason",
        "health_reported_at",
        "over_temp_since",
        "telemetry_last_hour",
    ]
    raw_id_fields = ["node"]
    inlines = [GpuHealthChangeInline]
    action_form = StatusActionForm
    actions = ["burn_in", "return_to_service", "mark_failed"]

    def get_readonly_fields(self, request, obj=None):
        # A GPU's node and index are its physical identity (the fleet import creates them):
        # jobs send the index as gpu_indexes, telemetry and health name the GPU by it.
        fields = super().get_readonly_fields(request, obj)
        return [*fields, "node", "index"] if obj is not None else fields

    @admin.action(
        description="Burn in selected failed GPUs, then return them to sale if it passes",
        permissions=["change"],
    )
    def burn_in(self, request, queryset):
        _burn_in(request, {gpu.node: [gpu] for gpu in queryset.select_related("node")})

    @admin.display(description="telemetry, last hour (per minute)")
    def telemetry_last_hour(self, gpu: Gpu) -> str:
        since = timezone.now() - timedelta(hours=1)
        rows = GpuMinute.objects.filter(gpu_id=gpu.pk, minute__gte=since).order_by("-minute")
        return _minutes_table(rows, lambda row: f"gpu{gpu.index}")

    @admin.action(
        description="Return selected GPUs to service (reason required, recorded)",
        permissions=["change"],
    )
    def return_to_service(self, request, queryset):
        reason = request.POST.get("reason", "").strip()
        if not reason:
            messages.error(request, "Give a reason to return a GPU to service.")
            return
        _apply(request, queryset, telemetry.gpu_return_to_service, "gpu", "Returned to service")

    @admin.action(
        description="Mark selected GPUs failed (their work is moved or ended)…",
        permissions=["change"],
    )
    def mark_failed(self, request, queryset):
        """Asks first, listing the reservations on the GPUs, and needs a reason: their
        customers read it in their reservation's history."""
        confirmed = request.POST.get("confirmed") == "yes"
        if confirmed and request.POST.get("reason", "").strip():
            return _apply(request, queryset, telemetry.gpu_mark_failed, "gpu", "Marked failed")
        if confirmed:
            messages.error(request, "Give a reason to mark a GPU failed.")
        return _gpu_mark_failed_confirm(self, request, queryset)


# What failing GPUs does to the bookings on them (marketplace.services.gpu_failures).
_GPU_FAILED_CONSEQUENCE = (
    "The GPUs leave sale now and an outage opens for each. Each reservation listed is moved to "
    "healthy GPUs of its model at its site (a running workload restarts there; the time from "
    "the failure is not billed), or, with none free, ends as failed: undelivered time is not "
    "charged and a reserved term's rest is refunded. Its customer reads the reason in its "
    "history."
)


def _gpu_mark_failed_confirm(
    model_admin: admin.ModelAdmin, request: HttpRequest, queryset: QuerySet
) -> TemplateResponse:
    gpus = list(queryset.select_related("node").order_by("pk"))
    hostnames = {gpu.node_id: gpu.node.hostname for gpu in gpus}
    bookings = node_bookings(hostnames, now=timezone.now(), gpu_ids=[gpu.pk for gpu in gpus])
    context = {
        **model_admin.admin_site.each_context(request),
        "title": f"Mark {len(gpus)} GPU(s) failed?",
        "opts": model_admin.model._meta,
        "gpus": gpus,
        "bookings": [{"node": hostnames[b.node_id], "booking": b} for b in bookings],
        "consequence": _GPU_FAILED_CONSEQUENCE,
        "reason": request.POST.get("reason", ""),
    }
    return TemplateResponse(request, "admin/inventory/gpu/mark_failed_confirm.html", context)


def _burn_in(request, targets: dict) -> None:
    reason = request.POST.get("reason", "").strip() or "burn-in from the admin"
    by_node: dict = {}
    for node, gpus in targets.items():
        by_node.setdefault(node, []).extend(gpus or [])
    for node, gpus in by_node.items():
        try:
            burn_in = burn_in_request(
                node=node,
                gpus=gpus or None,
                reason=reason,
                requested_by=request.user.get_username(),
            )
        except ApplicationError as exc:
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Burn-in #{burn_in.pk} queued on {node.hostname}.")


@admin.register(BurnIn)
class BurnInAdmin(FleetScaleAdmin):
    """Burn-in runs and their output: read-only (queued from the node and GPU actions)."""

    list_display = ["id", "node", "gpu_indexes", "status", "exit_code", "timed_out", "created_at",
                    "finished_at"]  # fmt: skip
    list_filter = ["status", "node__site"]
    list_select_related = ["node"]
    search_fields = ["node__hostname"]
    readonly_fields = [f.name for f in BurnIn._meta.fields]

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False  # staff view it (view permission); the agent writes it

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(HealthRules)
class HealthRulesAdmin(admin.ModelAdmin):
    """The one rule set (docs/health.md); edits take effect within 10 s."""

    list_display = ["__str__", "failing_events", "over_temp_c", "over_temp_minutes", "updated_at"]

    def has_add_permission(self, request) -> bool:
        # The one row, added once, and only by staff who may add it: the rules decide which
        # GPUs are failed, so a view-only member must not write them.
        return super().has_add_permission(request) and not HealthRules.objects.exists()

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        telemetry.rules_cache_clear()  # this process at once; the others within 10 s

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class OpenOutageFilter(admin.SimpleListFilter):
    title = "open"
    parameter_name = "open"

    def lookups(self, request, model_admin):
        return [("yes", "Open"), ("no", "Closed")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(ended_at__isnull=True)
        if self.value() == "no":
            return queryset.filter(ended_at__isnull=False)
        return queryset


class OutageForm(forms.ModelForm):
    class Meta:
        model = Outage
        fields = ["node", "gpu", "started_at", "ended_at", "cause", "detail"]

    def clean(self):
        cleaned = super().clean()
        # An open outage of one GPU is the GPU's failure: only marking the GPU failed takes it
        # out of sale and moves or ends the work on it (and stops its bill); an outage row
        # alone would leave it sold and billed, and open until someone closed it by hand.
        gpu, node = cleaned.get("gpu"), cleaned.get("node")
        on_node = gpu is not None and node is not None and gpu.node_id == node.pk  # else: model
        if self.instance.pk is None and on_node and not cleaned.get("ended_at"):
            self.add_error(
                "gpu",
                'A GPU that is down now is marked failed (GPUs list, "Mark selected GPUs '
                'failed"), which opens its outage and moves or ends its work. Here, record a '
                "GPU's outage that has ended, or the node's.",
            )
        return cleaned


@admin.register(Outage)
class OutageAdmin(FleetScaleAdmin):
    """Outages are records that bills and SLA credits are computed from: staff record one that
    happened (a hardware fault, say) and close it, never delete one or move its start. A
    heartbeat outage is the sweeper's: it opens when a node goes silent and only the node's
    next heartbeat ends it."""

    form = OutageForm
    list_display = ["node", "gpu", "cause", "started_at", "ended_at"]
    list_filter = [
        OpenOutageFilter,
        "cause",
        "node__site",
        ("started_at", admin.DateFieldListFilter),
    ]
    list_select_related = ["node", "gpu__node"]  # a GPU is named by its node's hostname
    search_fields = ["node__hostname"]
    raw_id_fields = ["node", "gpu"]

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        fixed = ["node", "gpu", "cause", "started_at"]
        # An open outage of one GPU is its failure's (staff cannot open one here): it ends
        # when the GPU is returned to service, which also puts the GPU back on sale. Ended by
        # hand, the GPU would stay failed with its outage over, its downtime cut short.
        gpu_failure_open = obj.gpu_id is not None and obj.ended_at is None
        if obj.cause == OutageCause.HEARTBEAT_MISSED or gpu_failure_open:
            return [*fixed, "ended_at"]
        return fixed

    def formfield_for_choice_field(self, db_field, request, **kwargs):
        if db_field.name == "cause":
            kwargs["choices"] = [
                c for c in OutageCause.choices if c[0] != OutageCause.HEARTBEAT_MISSED
            ]
        return super().formfield_for_choice_field(db_field, request, **kwargs)


# What a maintenance window does to the bookings it overlaps, said before it is saved.
_WINDOW_CONSEQUENCE = (
    "Nothing new is sold on this node during the window, and no booking is extended into it. "
    "The reservations listed keep their GPUs: a maintenance window neither stops nor moves "
    "them, so ask their customers, or plan the window around them."
)


def _window_bookings(node: Node, period) -> list:
    """The bookings holding GPUs of the node during [start, end) of the window: none once
    it has ended (those it overlapped are past)."""
    now = timezone.now()
    if period.upper is not None and period.upper <= now:
        return []
    after = period.lower if period.lower is not None and period.lower > now else now
    return [
        b
        for b in node_bookings([node.pk], now=after)
        if period.upper is None or b.starts_at < period.upper
    ]


class MaintenanceWindowForm(forms.ModelForm):
    """A window over booked GPUs is saved only once staff have seen those bookings (listed on
    the page) and ticked the acknowledgement; adding one, or moving one, asks again."""

    acknowledge_bookings = forms.BooleanField(
        required=False,
        label="Save it over these bookings",
        help_text="The bookings listed above hold GPUs of this node during the window.",
        widget=forms.HiddenInput,  # a checkbox once there is something to acknowledge
    )

    class Meta:
        model = MaintenanceWindow
        fields = ["node", "period", "reason"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bookings: list = []
        if self.instance.pk is not None and not self.is_bound:
            self._show_bookings(_window_bookings(self.instance.node, self.instance.period))

    def _show_bookings(self, bookings: list) -> None:
        self.bookings = bookings
        if bookings and "acknowledge_bookings" in self.fields:
            self.fields["acknowledge_bookings"].widget = forms.CheckboxInput()

    def clean_period(self):
        period = self.cleaned_data.get("period")
        if period is None or period.lower is None or period.upper is None:
            raise forms.ValidationError("A maintenance window needs a start and an end.")
        if period.upper <= period.lower:
            raise forms.ValidationError("A maintenance window must end after it starts.")
        return period

    def clean(self):
        cleaned = super().clean()
        node, period = cleaned.get("node"), cleaned.get("period")
        if node is None or period is None:
            return cleaned
        self._show_bookings(_window_bookings(node, period))
        moved = self.instance.pk is None or {"node", "period"} & set(self.changed_data)
        if self.bookings and moved and not cleaned.get("acknowledge_bookings"):
            self.add_error(
                "acknowledge_bookings",
                f"{len(self.bookings)} booking(s) hold GPUs of {node.hostname} during this "
                "window (listed above): tick the box to save the window over them.",
            )
        return cleaned


@admin.register(MaintenanceWindow)
class MaintenanceWindowAdmin(admin.ModelAdmin):
    form = MaintenanceWindowForm
    list_display = ["node", "period", "reason", "created_by", "created_at"]
    list_filter = ["node__site"]
    list_select_related = ["node", "created_by"]
    search_fields = ["node__hostname", "reason"]
    raw_id_fields = ["node"]
    readonly_fields = ["created_by", "created_at"]
    change_form_template = "admin/inventory/maintenancewindow/change_form.html"

    def get_readonly_fields(self, request, obj=None):
        # A window that has ended is history (it kept its GPUs off sale then), and a retired
        # node plans no more downtime: their node and period stay as they are, the reason may
        # still be edited (MaintenanceWindow.clean checks only a window added or moved).
        fields = super().get_readonly_fields(request, obj)
        if obj is not None and (
            obj.node.status == NodeStatus.RETIRED
            or (obj.period.upper is not None and obj.period.upper <= timezone.now())
        ):
            return [*fields, "node", "period"]
        return fields

    def render_change_form(self, request, context, *args, **kwargs):
        form = context["adminform"].form
        context["window_bookings"] = getattr(form, "bookings", [])
        context["window_consequence"] = _WINDOW_CONSEQUENCE
        return super().render_change_form(request, context, *args, **kwargs)

    def save_model(self, request, obj, form, change):
        # The form already checked the no-overlap exclusion constraint (Django validates
        # model constraints in ModelForms); the database holds it against races.
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(StatusChange)
class StatusChangeAdmin(FleetScaleAdmin):
    """The audit trail: read-only."""

    list_display = ["at", "target", "from_status", "to_status", "actor_label", "reason"]
    list_filter = ["to_status", "site", ("at", admin.DateFieldListFilter)]
    list_select_related = ["node", "site"]
    search_fields = ["node__hostname", "site__slug"]

    @admin.display(description="node or site")
    def target(self, change: StatusChange) -> str:
        return str(change.node or change.site)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(NodeToken)
class NodeTokenAdmin(admin.ModelAdmin):
    list_display = ["prefix", "node", "label", "created_at", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "node__site"]
    list_select_related = ["node"]
    search_fields = ["prefix", "node__hostname", "label"]
    fields = ["prefix", "node", "label", "created_at", "last_used_at", "revoked_at"]
    readonly_fields = ["prefix", "node", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False  # issue tokens from the node list: the secret must be shown once

    def has_delete_permission(self, request, obj=None) -> bool:
        return False  # revoke instead, so the record of the token stays

    @admin.action(description="Revoke selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        # Only the live ones: one already revoked keeps its time, and is neither counted nor
        # recorded again. Who revoked a token is in its history (the admin's log).
        live = list(queryset.filter(revoked_at__isnull=True).order_by("pk"))
        for token in live:
            services.node_token_revoke(token=token)
            self.log_change(request, token, "Revoked")
        messages.success(request, f"Revoked {len(live)} token(s).")
