"""Staff tools for the marketplace.

Reservation status is never edited in a form: staff cancel through the same service customers
use (so the refund terms are computed and recorded), and every transition shows inline.
Quotes, transitions and allocations are records, read-only here, as are the provisioning
records (attempts, site-agent jobs, reservation outages): the workers and agents write them.
Every action needs a permission to change its model: staff who may only view do not act.
"""

import re
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin
from django.contrib.auth.forms import UserChangeForm
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.db.models import Model, Q, QuerySet
from django.forms.models import BaseInlineFormSet
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from config.admin_base import (
    FleetScaleAdmin,
    ReadOnlyAdmin,
    ReadOnlyInline,
    created_at_by_id,
    currency_clean,
)
from config.errors import ApplicationError
from inventory.admin import NodeAdmin
from inventory.models import Node
from marketplace.mail import PLAIN_MAIL_TASK, mail_outbox_resend
from marketplace.models import (
    LIVE_STATUSES,
    AgentJob,
    Allocation,
    ApiKey,
    AuditEntry,
    Curtailment,
    CurtailmentTake,
    CurtailmentVictim,
    DemandResponseEvent,
    DemandResponseSource,
    Event,
    Invitation,
    MailMessage,
    Membership,
    Organization,
    PricingPolicy,
    ProvisioningAttempt,
    Quote,
    RateCard,
    ResaleFee,
    ResaleListing,
    Reservation,
    ReservationOutage,
    ReservationTransition,
    Role,
    SshKey,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from marketplace.provisioning.agent_reports import workload_restarts_summary
from marketplace.provisioning.workload import workload_public
from marketplace.rules import display_name_clean
from marketplace.services.api_keys import SECRET_PREFIX, api_key_revoke
from marketplace.services.curtailment import (
    CurtailmentPlan,
    PlanChanged,
    PlannedVictim,
    curtailment_announce,
    curtailment_call_off,
    curtailment_preview,
)
from marketplace.services.organizations import (
    member_staff_change_record,
    organization_owner_kept_check,
    organization_suspend,
    organization_unsuspend,
    user_staff_change_record,
)
from marketplace.services.reservations import (
    cancellation_terms,
    reservation_cancel,
    reservations_stop_for_suspension,
)
from marketplace.services.transitions import reservation_allowed_actions
from marketplace.services.webhooks import webhook_delivery_resend
from marketplace.templatetags.portal_format import money


def _admin_link(obj: Model | None, label: str | None = None) -> str:
    if obj is None:
        return "-"
    meta = obj._meta
    url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
    return format_html('<a href="{}">{}</a>', url, label or str(obj))


class ProvisioningRecordAdmin(ReadOnlyAdmin):
    """Provisioning records: read-only, linking to their reservation and node."""

    @admin.display(description="reservation", ordering="reservation_id")
    def reservation_link(self, obj) -> str:
        return _admin_link(obj.reservation, obj.reservation.public_id)

    @admin.display(description="node", ordering="node__hostname")
    def node_link(self, obj) -> str:
        return _admin_link(obj.node, obj.node.hostname)


class MembershipFormSet(BaseInlineFormSet):
    """Staff keep the portal's rule: an organisation with members keeps an owner whose account
    is active (checked again under the owner locks once saved: organization_owner_kept_check)."""

    def clean(self):
        super().clean()
        kept = [
            form.cleaned_data
            for form in self.forms
            if form.cleaned_data and not form.cleaned_data.get("DELETE")
        ]
        if kept and not any(
            data.get("role") == Role.OWNER and data.get("user") and data["user"].is_active
            for data in kept
        ):
            raise forms.ValidationError(
                "An organisation keeps at least one owner with an active account: make another "
                "member owner first."
            )


class MembershipInlineForm(forms.ModelForm):
    """A member's row stays theirs: handing it to another user would remove them unrecorded,
    their API keys still live. Staff remove the row and add one (each recorded) instead."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk is not None and "user" in self.fields:
            self.fields["user"].disabled = True  # a posted value is ignored


class MembershipInline(admin.TabularInline):
    model = Membership
    form = MembershipInlineForm
    formset = MembershipFormSet
    extra = 0
    autocomplete_fields = ["user"]

    def get_queryset(self, request):
        # Each row is titled by its user and organisation (Membership.__str__): read with it.
        return super().get_queryset(request).select_related("user", "organization")


class OrganizationForm(forms.ModelForm):
    class Meta:
        model = Organization
        fields = ["name", "slug"]

    def clean_name(self) -> str:
        """The rule the portal and the API apply (it reaches e-mail subjects and pages)."""
        try:
            return display_name_clean(self.cleaned_data.get("name"), what="An organisation")
        except ApplicationError as exc:
            raise forms.ValidationError(exc.message) from None


class SuspendedFilter(admin.SimpleListFilter):
    title = "suspended"
    parameter_name = "suspended"

    def lookups(self, request, model_admin):
        return [("yes", "Suspended"), ("no", "Not suspended")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(suspended_at__isnull=self.value() == "no")
        return queryset


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    form = OrganizationForm
    list_display = ["name", "slug", "public_id", "created_at", "suspended_at"]
    list_filter = [SuspendedFilter]
    search_fields = ["name", "slug", "public_id"]
    readonly_fields = ["public_id", "created_at", "suspended_at", "suspension_reason"]
    inlines = [MembershipInline]
    actions = ["suspend", "unsuspend"]

    @admin.action(description="Suspend selected organisations…", permissions=["change"])
    def suspend(self, request: HttpRequest, queryset: QuerySet) -> TemplateResponse | None:
        """First a page with each organisation's live reservations, a reason (the customer
        reads it) and what happens to its running reservations; nothing changes until staff
        confirm it there."""
        reason = " ".join((request.POST.get("reason") or "").split())
        running = request.POST.get("running")
        if request.POST.get("confirmed") != "yes" or not reason or running not in ("keep", "stop"):
            return self._suspend_confirm(request, queryset, reason=reason, running=running)
        actor = f"staff:{request.user.get_username()}"
        for organization in queryset.order_by("pk"):
            # Suspended already: its first reason stands; its work is still stopped if asked
            # (staff who kept it at first may decide otherwise later).
            newly = organization_suspend(
                organization=organization, reason=reason, actor_label=actor
            )
            stopped, refused = [], []
            if running == "stop":
                stopped, refused = reservations_stop_for_suspension(
                    organization=organization, reason=reason, actor_label=actor
                )
            messages.success(
                request,
                f"{organization} {'suspended' if newly else 'was suspended already'}"
                + (
                    f"; stopped or cancelled: {', '.join(stopped) or 'none'}"
                    if running == "stop"
                    else "; its reservations keep running"
                )
                + ".",
            )
            for public_id, why in refused:
                messages.error(request, f"{organization}: {public_id} not stopped: {why}")
        return None

    def _suspend_confirm(self, request, queryset, *, reason: str, running: str | None):
        rows = [
            {
                "organization": organization,
                "reservations": list(
                    Reservation.objects.filter(
                        organization=organization, status__in=LIVE_STATUSES
                    ).order_by("starts_at", "pk")
                ),
            }
            for organization in queryset.order_by("pk")
        ]
        confirmed = request.POST.get("confirmed") == "yes"
        context = {
            **self.admin_site.each_context(request),
            "title": f"Suspend {len(rows)} organisation(s)?",
            "opts": self.model._meta,
            "rows": rows,
            "reason": reason,
            "running": running,
            "error": "Say why (the customer reads it) and choose what happens to its reservations."
            if confirmed
            else "",
        }
        return TemplateResponse(
            request, "admin/marketplace/organization/suspend_confirm.html", context
        )

    @admin.action(
        description="Lift the suspension of selected organisations", permissions=["change"]
    )
    def unsuspend(self, request: HttpRequest, queryset: QuerySet) -> None:
        actor = f"staff:{request.user.get_username()}"
        lifted = [
            str(organization)
            for organization in queryset.order_by("pk")
            if organization_unsuspend(organization=organization, actor_label=actor)
        ]
        messages.success(
            request, f"Suspension lifted: {', '.join(lifted)}." if lifted else "None was suspended."
        )

    def save_formset(self, request, form, formset, change):
        if formset.model is not Membership:
            return super().save_formset(request, form, formset, change)
        # Read before saving: a deleted row loses its id, a changed one its old role.
        leaving = {id(f.instance): f.instance.pk for f in formset.deleted_forms if f.instance.pk}
        roles_before = {f.instance.pk: f.initial.get("role") for f in formset.initial_forms}
        super().save_formset(request, form, formset, change)
        try:
            # A portal owner leaving meanwhile is not seen by the form's check; this one, under
            # the owner locks, sees it (the whole save rolls back).
            organization_owner_kept_check(form.instance.pk)
        except ApplicationError as exc:
            raise PermissionDenied(f"Nothing was saved: {exc.message}") from None
        # Recorded as the portal's and the API's changes are (events, audit, and what the
        # member handed on that their new access no longer covers, revoked).
        for membership in formset.new_objects:
            member_staff_change_record(membership, change="add")
        for membership in formset.deleted_objects:
            member_staff_change_record(
                membership, change="remove", member_id=leaving.get(id(membership))
            )
        for membership, fields in formset.changed_objects:
            if "role" in fields:
                member_staff_change_record(
                    membership, change="role", before_role=roles_before.get(membership.pk)
                )


def sole_owner_of(user) -> list[Organization]:
    """The organisations `user` is the only owner of with an active account (without them,
    nobody could administer it)."""
    owned = Organization.objects.filter(memberships__user=user, memberships__role=Role.OWNER)
    return [
        org
        for org in owned
        if not org.memberships.filter(role=Role.OWNER, user__is_active=True)
        .exclude(user=user)
        .exists()
    ]


class SwitchyardUserChangeForm(UserChangeForm):
    def clean_is_active(self) -> bool:
        is_active = self.cleaned_data.get("is_active")
        if self.instance.pk and self.instance.is_active and not is_active:
            owned = sole_owner_of(self.instance)
            if owned:
                raise forms.ValidationError(
                    f"{self.instance.get_username()} is the only owner of "
                    f"{', '.join(o.name for o in owned)}: make another member owner first (on "
                    "the organisation's page), then deactivate them."
                )
        return is_active


admin.site.unregister(User)


@admin.register(User)
class SwitchyardUserAdmin(UserAdmin):
    """Django's user admin, but a user who is an organisation's only owner is not deleted
    (the organisation, its money and bookings would be left with nobody to act for them):
    neither from their page nor in a bulk delete that includes them; nor deactivated."""

    form = SwitchyardUserChangeForm

    def has_delete_permission(self, request, obj=None):
        if obj is not None and sole_owner_of(obj):
            return False
        return super().has_delete_permission(request, obj)

    # A user deactivated or deleted here loses what they handed on in their organisations (API
    # keys, open invitations), recorded as the portal records a member's change.
    def save_model(self, request, obj, form, change) -> None:
        with transaction.atomic(), _refused_as_forbidden():
            super().save_model(request, obj, form, change)
            if change and "is_active" in form.changed_data:
                change_made = "reactivate" if obj.is_active else "deactivate"
                user_staff_change_record(obj, change=change_made)

    def delete_model(self, request, obj) -> None:
        with transaction.atomic(), _refused_as_forbidden():
            user_staff_change_record(obj, change="delete")
            super().delete_model(request, obj)

    def delete_queryset(self, request, queryset) -> None:
        with transaction.atomic(), _refused_as_forbidden():
            for user in queryset.order_by("pk"):
                user_staff_change_record(user, change="delete")
            super().delete_queryset(request, queryset)


@contextmanager
def _refused_as_forbidden():
    """A service's refusal the form could not foresee (another owner left meanwhile): the
    admin's transaction rolls back and staff read why, instead of a server error."""
    try:
        yield
    except ApplicationError as exc:
        raise PermissionDenied(f"Nothing was saved: {exc.message}") from None


_KEY_PREFIX = re.compile(rf"(?<![A-Za-z0-9_]){re.escape(SECRET_PREFIX)}[a-z0-9]{{8}}(?![a-z0-9])")


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "organization", "scopes", "last_used_at", "revoked_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix", "public_id", "organization__name", "organization__public_id"]
    search_help_text = (
        "A key's id (key_…), its prefix or the whole secret pasted (sy_live_…), or its name, "
        "or an organisation's name or id."
    )
    list_select_related = ["organization"]
    # What a key may do is its organisation's to decide, checked and audited by the service:
    # staff look, and revoke (a leaked key); grid keys are granted in the portal's key form.
    readonly_fields = [
        "name",
        "scopes",
        "organization",
        "prefix",
        "secret_hash",
        "created_by",
        "created_at",
        "last_used_at",
        "revoked_at",
    ]
    fields = readonly_fields
    actions = ["revoke"]

    def has_add_permission(self, request) -> bool:
        return False  # keys are created by their organisation, which sees the secret once

    def get_search_results(self, request, queryset, search_term):
        # A customer pastes more than the prefix (the whole leaked secret, or the prefix with
        # its "_" or "…"): a substring search for that finds nothing, so each such word also
        # finds its key by the prefix it starts with (unique, indexed).
        found, may_have_duplicates = super().get_search_results(request, queryset, search_term)
        prefixes = {m.group(0) for m in _KEY_PREFIX.finditer(search_term)}
        if prefixes:
            found |= queryset.filter(prefix__in=prefixes)
        return found, may_have_duplicates

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet) -> None:
        live = list(queryset.filter(revoked_at__isnull=True).order_by("pk"))
        for key in live:
            api_key_revoke(api_key=key)
        messages.success(request, f"Revoked {len(live)} key(s).")


@admin.register(SshKey)
class SshKeyAdmin(ReadOnlyAdmin):
    """Saved by their organisation (portal or API), which also deletes them."""

    list_display = ["name", "fingerprint", "organization", "created_by", "created_at"]
    search_fields = ["name", "fingerprint", "public_id", "organization__name"]
    list_select_related = ["organization", "created_by"]


@admin.register(Invitation)
class InvitationAdmin(ReadOnlyAdmin):
    """Sent and revoked by organisation owners and admins (portal or API); the token is never
    stored, only its hash."""

    list_display = [
        "email", "organization", "role", "invited_by", "created_at", "expires_at",
        "accepted_at", "revoked_at",
    ]  # fmt: skip
    list_filter = ["role"]
    search_fields = ["email", "public_id", "organization__name"]
    list_select_related = ["organization", "invited_by"]
    exclude = ["token_hash"]


class RateCardForm(forms.ModelForm):
    class Meta:
        model = RateCard
        fields = ["gpu_model", "site", "price_per_gpu_hour", "currency"]

    def clean_currency(self) -> str:
        return currency_clean(self.cleaned_data.get("currency"))


@admin.register(RateCard)
class RateCardAdmin(admin.ModelAdmin):
    form = RateCardForm
    list_display = ["gpu_model", "site", "price_per_gpu_hour", "currency", "updated_at"]
    list_filter = ["gpu_model", "site"]
    list_select_related = ["gpu_model", "site"]
    list_editable = ["price_per_gpu_hour"]


@admin.register(PricingPolicy)
class PricingPolicyAdmin(admin.ModelAdmin):
    """The newest policy is in force; to change prices, add a new one (history is kept): a
    saved policy is a record, neither edited in place nor deleted (either would rewrite which
    discounts and bounds were in force when past quotes were priced)."""

    list_display = [
        "created_at",
        "discount_1w_pct",
        "discount_1m_pct",
        "discount_3m_pct",
        "discount_1y_pct",
        "interruptible_discount_pct",
        "utilisation_slope",
        "floor_multiplier",
        "ceiling_multiplier",
        "energy_pass_through_pct",
        "floor_margin_pct",
        "floor_margin_per_gpu_hour",
        "note",
    ]

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Quote)
class QuoteAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    list_display = [
        "public_id",
        "organization",
        "gpu_model",
        "gpu_count",
        "site",
        "tier",
        "term",
        "price_per_gpu_hour",
        "total",
        "expires_at",
    ]
    list_filter = ["tier", "site"]
    search_fields = ["public_id", "organization__name", "organization__public_id"]
    list_select_related = ["organization", "gpu_model", "site"]
    # The page shows the total as the list does, in the currency's own decimals.
    exclude = ["total_amount"]
    readonly_fields = ["total"]

    @admin.display(description="total amount", ordering="total_amount")
    def total(self, obj: Quote) -> str:
        return money(obj.total_amount, obj.currency)


class TransitionInline(ReadOnlyInline):
    model = ReservationTransition
    fields = ["at", "from_status", "to_status", "cause", "actor_label"]
    readonly_fields = fields
    ordering = ["at", "id"]


class AllocationInline(ReadOnlyInline):
    model = Allocation
    fields = ["gpu", "node", "period", "is_live"]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("gpu__node", "node")


class OutageInline(ReadOnlyInline):
    model = ReservationOutage
    fields = ["node", "started_at", "ended_at", "cause", "detail", "source_outage"]
    readonly_fields = fields
    ordering = ["started_at", "id"]

    def get_queryset(self, request):
        # The inventory outage is named by its node's hostname: in the same query.
        return super().get_queryset(request).select_related("node", "source_outage__node")


class AgentJobInline(ReadOnlyInline):
    model = AgentJob
    # The payload holds the workload's secrets: not shown.
    fields = [
        "kind",
        "generation",
        "node",
        "status",
        "attempts",
        "lease_expires_at",
        "error",
        "finished_at",
    ]
    readonly_fields = fields
    ordering = ["id"]

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("node")


@admin.register(Reservation)
class ReservationAdmin(FleetScaleAdmin):
    list_display = [
        "public_id",
        "organization",
        "status",
        "tier",
        "term",
        "gpu_model",
        "gpu_count",
        "site",
        "starts_at",
        "ends_at",
        "total",
    ]
    list_filter = ["status", "tier", "site", "gpu_model", ("starts_at", admin.DateFieldListFilter)]
    search_fields = ["public_id", "organization__name", "organization__public_id"]
    search_help_text = "A reservation id or its start (res_…), or an organisation's name or id."
    list_select_related = ["organization", "gpu_model", "site"]
    # Newest first by id, the order they were booked in: the model's (-created_at, -id) has
    # no index of its own, so each page sorted every reservation (0.45 s at 125,000).
    ordering = ["-pk"]
    inlines = [TransitionInline, AllocationInline, OutageInline, AgentJobInline]
    actions = ["cancel"]
    readonly_fields = [
        "public_id",
        "organization",
        "created_by",
        "quote",
        "gpu_model",
        "site",
        "gpu_count",
        "tier",
        "term",
        "starts_at",
        "ends_at",
        "currency",
        "price_per_gpu_hour",
        "total",
        "breakdown",
        "status",
        "status_reason",
        "restarts_in_place",
        "allowed_actions",
        "cancellation",
        "activated_at",
        "released_at",
        "workload_summary",
        "connection",
        "created_at",
        "updated_at",
    ]
    # Everything is shown read-only; changes go through the services (the cancel action).
    fields = readonly_fields

    def has_add_permission(self, request) -> bool:
        return False  # reservations are made through the booking service, never by hand

    def get_search_results(self, request, queryset, search_term):
        # Indexed lookups only: a reservation id by its start (the id's pattern index), or the
        # organisations matched first in their own small table. A substring of every
        # reservation's id read the whole table.
        term = search_term.strip()
        if not term:
            return queryset, False
        organizations = Organization.objects.filter(
            Q(name__icontains=term) | Q(public_id=term)
        ).values_list("pk", flat=True)
        return queryset.filter(
            Q(public_id__startswith=term) | Q(organization_id__in=list(organizations[:100]))
        ), False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    @admin.display(description="total amount", ordering="total_amount")
    def total(self, obj: Reservation) -> str:
        # In the currency's own decimals, as the API and the portal write it ("273,600 JPY").
        return money(obj.total_amount, obj.currency)

    @admin.display(description="workload")
    def workload_summary(self, obj: Reservation) -> dict:
        # Environment values are the customer's secrets: staff see their names only.
        return workload_public(obj.workload)

    @admin.display(description="restarts in place")
    def restarts_in_place(self, obj: Reservation) -> str:
        # Why each one: its history below (actor "system: site agent"); its outages too.
        return workload_restarts_summary(obj, now=timezone.now())

    @admin.display(description="customer actions now")
    def allowed_actions(self, obj: Reservation) -> str:
        return ", ".join(reservation_allowed_actions(obj)) or "none"

    @admin.action(
        description="Cancel selected reservations (refund rule applies)", permissions=["change"]
    )
    def cancel(self, request: HttpRequest, queryset: QuerySet) -> TemplateResponse | None:
        """First a page with each reservation's terms as of now (or why it cannot be
        cancelled) and a reason; the cancellations run once staff confirm it there."""
        reason = (request.POST.get("reason") or "").strip()
        if request.POST.get("confirmed") != "yes" or not reason:
            return self._cancel_confirm(request, queryset, reason=reason)
        done = []
        for reservation in queryset.order_by("pk"):
            # The refund shown on the confirmation page binds: if the rule gives less now (the
            # page was left open across a notice boundary), the service refuses it.
            shown = _shown_refund_fraction(request, reservation)
            if shown is None:
                messages.error(
                    request,
                    f"{reservation.public_id}: its terms were not on the page confirmed; "
                    "nothing was done. Select it and cancel again.",
                )
                continue
            try:
                reservation_cancel(
                    reservation=reservation,
                    actor_label=f"staff:{request.user.get_username()}",
                    reason=reason,
                    expected_refund_fraction=shown,
                )
            except ApplicationError as exc:
                messages.error(request, f"{reservation.public_id}: {exc.message}")
            else:
                done.append(reservation.public_id)
        if done:
            messages.success(request, f"Cancelled: {', '.join(done)}.")
        return None

    def _cancel_confirm(self, request: HttpRequest, queryset: QuerySet, *, reason: str):
        rows = []
        for reservation in queryset.select_related("organization").order_by("pk"):
            try:
                rows.append({"reservation": reservation, "terms": cancellation_terms(reservation)})
            except ApplicationError as exc:
                rows.append({"reservation": reservation, "refused": exc.message})
        context = {
            **self.admin_site.each_context(request),
            "title": f"Cancel {len(rows)} reservation(s)?",
            "opts": self.model._meta,
            "rows": rows,
            "reason": reason,
            "error": "Say why: the customer reads it."
            if request.POST.get("confirmed") == "yes"
            else "",
        }
        return TemplateResponse(
            request, "admin/marketplace/reservation/cancel_confirm.html", context
        )


def _shown_refund_fraction(request: HttpRequest, reservation: Reservation) -> Decimal | None:
    """The refund fraction the cancel confirmation page showed for `reservation` (posted
    back with it), or None if that page did not offer to cancel it."""
    try:
        fraction = Decimal(request.POST.get(f"refund_fraction_{reservation.pk}", ""))
    except InvalidOperation:
        return None
    return fraction if fraction.is_finite() and 0 <= fraction <= 1 else None


def _mw(value) -> str:
    """Megawatts to the watt, without trailing zeros."""
    return f"{value.quantize(Decimal('0.000001')).normalize():f}"


class CurtailmentForm(forms.ModelForm):
    call_notice = forms.BooleanField(
        required=False,
        label="The operator's call gives less than the minimum notice",
        help_text="Preempt at the shed time even if it is sooner than the minimum notice "
        "(the notice says so). Otherwise the minimum notice is given.",
    )
    force_reason = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        label="Force protected work, because",
        help_text="Only if interruptible load cannot cover the target: also preempt on-demand "
        "and reserved reservations (fewest first; recorded in the audit log, credited under "
        "the SLA). Leave empty to shed only interruptible load and record any shortfall.",
    )

    class Meta:
        model = Curtailment
        fields = ["site", "shed_at", "until", "target_mw", "reason"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan: CurtailmentPlan | None = None  # what announcing would do, once valid

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        try:
            self.plan = curtailment_preview(
                site=data["site"],
                shed_at=data["shed_at"],
                until=data.get("until"),
                reason=data.get("reason", ""),
                target_mw=data.get("target_mw"),
                call_notice=data.get("call_notice", False),
                force_reason=data.get("force_reason", ""),
                now=timezone.now(),
            )
        except ApplicationError as exc:
            field = exc.field if exc.field in self.fields else None
            raise forms.ValidationError({field: exc.message} if field else exc.message) from exc
        if data.get("force_reason", "").strip() and data.get("target_mw") is None:
            raise forms.ValidationError(
                {"force_reason": "Forcing needs a megawatt target to cover."}
            )
        return data


class CurtailmentVictimInline(ReadOnlyInline):
    model = CurtailmentVictim
    fields = [
        "reservation",
        "tier",
        "draw_kw",
        "draw_basis",
        "forced",
        "outcome",
        "gpu_hours_forgone",
        "revenue",
        "chosen_at",
        "withdrawn_at",
    ]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("reservation")

    @admin.display(description="revenue forgone")
    def revenue(self, obj: CurtailmentVictim) -> str:
        return money(obj.revenue_forgone, obj.reservation.currency)


class CurtailmentTakeInline(ReadOnlyInline):
    """What was sold in the window since it was planned, out of its over-shed: each booking's
    draw over its hours there (ended where the booking left the live statuses)."""

    model = CurtailmentTake
    verbose_name = "sale in the window"
    verbose_name_plural = "sold in the window since (out of what it shed beyond its target)"
    fields = ["reservation", "kw", "period", "created_at"]
    readonly_fields = fields


@admin.register(Curtailment)
class CurtailmentAdmin(admin.ModelAdmin):
    """Announcing one plans it: the fewest interruptible reservations that cover its target
    are noticed or preempted, and the window's sales stop (marketplace.services.curtailment);
    a saved one is a record, read-only, with its victims below."""

    form = CurtailmentForm
    inlines = [CurtailmentVictimInline, CurtailmentTakeInline]
    list_display = (
        "site",
        "shed_at",
        "until",
        "target",
        "shed",
        "short",
        "reservations_notified",
        "reservations_preempted",
        "gpu_hours_forgone",
        "revenue",
        "short_notice",
        "origin",
        "called_off_at",
    )
    list_filter = ("site", "short_notice")
    # "from" names the operator's call (and its source) or the staff member: in the list's query.
    list_select_related = ("site", "announced_by", "demand_response_event__source")
    date_hierarchy = "shed_at"
    actions = ["call_off"]

    @admin.display(description="asked (MW)")
    def target(self, obj: Curtailment) -> str:
        return "all flexible" if obj.target_mw is None else _mw(obj.target_mw)

    @admin.display(description="shed (MW)")
    def shed(self, obj: Curtailment) -> str:
        return _mw(obj.shed_mw)

    @admin.display(description="short (MW)")
    def short(self, obj: Curtailment) -> str:
        return _mw(obj.short_mw) if obj.short_kw else "–"

    @admin.display(description="revenue forgone", ordering="revenue_forgone")
    def revenue(self, obj: Curtailment) -> str:
        # In the currency's own decimals, as other amounts ("1,500 JPY", "12.00 USD").
        return money(obj.revenue_forgone, obj.currency)

    @admin.display(description="from")
    def origin(self, obj: Curtailment) -> str:
        if obj.demand_response_event_id:
            return f"call {obj.demand_response_event}"
        return f"staff {obj.announced_by}" if obj.announced_by else "staff"

    @admin.action(
        description="Call off, or end now (the operator allows the load back)",
        permissions=["change"],
    )
    def call_off(self, request: HttpRequest, queryset: QuerySet) -> None:
        for curtailment in queryset.order_by("pk"):
            try:
                withdrawn = curtailment_call_off(curtailment=curtailment, user=request.user)
            except ApplicationError as exc:
                messages.error(request, f"{curtailment}: {exc.message}")
                continue
            messages.success(
                request,
                f"{curtailment}: called off or ended, {withdrawn} notice(s) withdrawn; its "
                "window is sold again.",
            )

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        if obj is None:
            return ()
        names = [f.name for f in Curtailment._meta.fields if f.name != "resold_kw"]
        return ["revenue" if name == "revenue_forgone" else name for name in names]

    def get_exclude(self, request: HttpRequest, obj=None):
        # The record's page shows the revenue with its currency (`revenue`), not the number.
        return ["revenue_forgone"] if obj is not None else super().get_exclude(request, obj)

    def get_inlines(self, request, obj=None):
        return self.inlines if obj is not None else []  # victims exist once it is planned

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is not None:  # a record: the model's fields only, all read-only
            kwargs["form"] = forms.ModelForm
        return super().get_form(request, obj, change=change, **kwargs)

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def add_view(self, request: HttpRequest, form_url="", extra_context=None):
        """Two steps: a valid form first shows what announcing would do (nothing is written);
        it is announced once staff confirm that page, and only as shown there (if the plan
        changed meanwhile, the new one is shown instead: PlanChanged)."""
        if request.method != "POST":
            return super().add_view(request, form_url, extra_context)
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = self.get_form(request, None, change=False)(request.POST, request.FILES)
        try:
            if not form.is_valid():  # the add form again, with its errors
                return super().add_view(request, form_url, extra_context)
            if request.POST.get("confirmed") != "yes" or not request.POST.get("plan"):
                return self._announce_confirm(request, form, form.plan)
            with transaction.atomic():
                obj = self.save_form(request, form, change=False)
                self.save_model(request, obj, form, change=False)
                message = self.construct_change_message(request, form, None, add=True)
                self.log_addition(request, obj, message)
        except ApplicationError as exc:
            if isinstance(exc, PlanChanged) and form.is_valid():
                return self._announce_confirm(request, form, exc.plan, changed=exc.message)
            # The site or the clock changed between the form's checks and the locks.
            self.message_user(request, f"Nothing was announced: {exc.message}", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        return self.response_add(request, obj)

    def _announce_confirm(
        self, request: HttpRequest, form, plan: CurtailmentPlan, *, changed: str = ""
    ) -> TemplateResponse:
        call = form.cleaned_data
        context = {
            **self.admin_site.each_context(request),
            "title": f"Announce a curtailment of {call['site']}?",
            "opts": self.model._meta,
            "call": call,
            "plan": plan,
            "asked": "all flexible load"
            if plan.target_kw is None
            else f"{_mw(plan.target_kw / 1000)} MW",
            "shed_mw": _mw(plan.shed_kw / 1000),
            "short_mw": _mw(plan.short_kw / 1000) if plan.short_kw else "",
            "noticed": _planned_victim_rows(plan.noticed),
            "preempted": _planned_victim_rows(plan.preempted),
            "organizations": sorted({v.reservation.organization.name for v in plan.victims}),
            "forced": sum(1 for v in plan.victims if v.forced),
            "hidden_fields": [form[name].as_hidden() for name in form.fields],
            "changed": changed,
        }
        return TemplateResponse(
            request, "admin/marketplace/curtailment/announce_confirm.html", context
        )

    def save_model(self, request: HttpRequest, obj: Curtailment, form, change: bool) -> None:
        if change:
            return  # a record: nothing to change
        done = curtailment_announce(
            site=obj.site,
            shed_at=obj.shed_at,
            until=obj.until,
            target_mw=obj.target_mw,
            reason=obj.reason,
            call_notice=form.cleaned_data.get("call_notice", False),
            force_reason=form.cleaned_data.get("force_reason", ""),
            user=request.user,
            # As shown on the confirmation page (add_view), or PlanChanged: nothing is done.
            expected_plan=request.POST.get("plan", ""),
        )
        obj.pk, obj.announced_at, obj.announced_by = done.pk, done.announced_at, done.announced_by
        for name in ("reservations_notified", "reservations_preempted", "shed_kw", "short_kw"):
            setattr(obj, name, getattr(done, name))
        asked = "all flexible load" if done.target_mw is None else f"{_mw(done.target_mw)} MW"
        self.message_user(
            request,
            f"{obj.site}: asked {asked}, shed {_mw(done.shed_mw)} MW; "
            f"{done.reservations_notified} reservation(s) will be preempted at "
            f"{done.preempt_at:%Y-%m-%d %H:%M:%S %Z}, {done.reservations_preempted} preempted "
            "now (they had not started). Nothing more is sold there for the window.",
            messages.WARNING,
        )
        if done.short_kw:
            self.message_user(
                request,
                f"Short by {_mw(done.short_mw)} MW: the site's interruptible load cannot cover "
                "the target. Force protected work (with a reason) to cover it.",
                messages.ERROR,
            )


def _planned_victim_rows(victims: list[PlannedVictim]) -> list[dict]:
    """The victims as rows of the shared bookings table (admin/inventory/_bookings_table.html),
    with the nodes their GPUs are on and, as its extra column, the draw shedding them saves."""
    nodes: dict[int, list[str]] = {}
    for reservation_id, hostname in (
        Allocation.objects.filter(
            reservation_id__in=[v.reservation.pk for v in victims], is_live=True
        )
        .values_list("reservation_id", "node__hostname")
        .order_by("node__hostname")
        .distinct()
    ):
        nodes.setdefault(reservation_id, []).append(hostname)
    return [
        {
            "node": ", ".join(nodes.get(v.reservation.pk, [])) or "–",
            "booking": {
                "reservation": v.reservation.public_id,
                "organization": v.reservation.organization.name,
                "status": v.reservation.status,
                "tier": v.reservation.tier,
                "gpus": v.reservation.gpu_count,
                "starts_at": v.reservation.starts_at,
                "ends_at": v.reservation.ends_at,
            },
            "extra": f"{v.draw_kw} kW ({v.basis})" + (", forced" if v.forced else ""),
        }
        for v in victims
    ]


# Whoever holds a source's secret may curtail its sites: the one offered is random (47
# characters); one typed instead is at least this long, never a guessable word.
DR_SECRET_MIN_LENGTH = 32


class DemandResponseSourceForm(forms.ModelForm):
    end_previous_secret = forms.BooleanField(
        required=False,
        label="The old secret leaked: stop accepting it at once",
        help_text="Otherwise, when the secret is changed, calls signed with the old one are "
        "still accepted for DEMAND_RESPONSE_SECRET_OVERLAP_HOURS while the operator switches.",
    )

    class Meta:
        model = DemandResponseSource
        fields = ("name", "description", "secret", "sites", "zones", "is_active")

    def clean_secret(self) -> str:
        secret = self.cleaned_data.get("secret") or ""
        if len(secret) < DR_SECRET_MIN_LENGTH:
            raise forms.ValidationError(
                f"A signing secret is at least {DR_SECRET_MIN_LENGTH} characters: whoever holds "
                "it may curtail the source's sites. Keep the random one offered, or paste the "
                "operator's."
            )
        return secret


@admin.register(DemandResponseSource)
class DemandResponseSourceAdmin(admin.ModelAdmin):
    """Grid operators and aggregators whose signed calls become curtailments (docs/grid.md).
    The secret signs their requests: give it to the operator over a trusted channel. Staff who
    may only view a source do not see it (it would let them sign calls)."""

    form = DemandResponseSourceForm
    list_display = ("name", "description", "is_active", "created_at")
    filter_horizontal = ("sites", "zones")
    fields = (
        "name",
        "description",
        "secret",
        "previous_secret_until",
        "end_previous_secret",
        "sites",
        "zones",
        "is_active",
    )
    readonly_fields = ("previous_secret_until",)

    def get_fields(self, request: HttpRequest, obj=None):
        fields = super().get_fields(request, obj)
        if obj is not None and not self.has_change_permission(request, obj):
            return [name for name in fields if name not in ("secret", "end_previous_secret")]
        if obj is None:  # a new source has no old secret
            return [n for n in fields if n not in ("previous_secret_until", "end_previous_secret")]
        return fields

    def save_model(self, request, obj, form, change) -> None:
        """A changed secret keeps the old one accepted for DEMAND_RESPONSE_SECRET_OVERLAP,
        unless staff say it leaked; saying so ends an overlap under way too."""
        now = timezone.now()
        # From the row, not form.changed_data: a field with a callable default reads as
        # changed whenever the form's hidden initial value is not posted.
        before = DemandResponseSource.objects.filter(pk=obj.pk).values_list("secret", flat=True)
        old = before.first() if change else None
        if old is not None and old != obj.secret:
            obj.previous_secret = old
            obj.previous_secret_until = now + settings.DEMAND_RESPONSE_SECRET_OVERLAP
        if form.cleaned_data.get("end_previous_secret") or not obj.previous_secret_until:
            obj.previous_secret, obj.previous_secret_until = "", None
        super().save_model(request, obj, form, change)


@admin.register(DemandResponseEvent)
class DemandResponseEventAdmin(admin.ModelAdmin):
    list_display = (
        "source",
        "event_id",
        "modification_number",
        "status",
        "site",
        "zone",
        "starts_at",
        "ends_at",
        "target_mw",
        "updated_at",
    )
    list_filter = ("source", "status")
    list_select_related = ("source", "site", "zone")  # site and zone may be empty: named here

    def get_readonly_fields(self, request: HttpRequest, obj=None):
        return [f.name for f in DemandResponseEvent._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False


@admin.register(Allocation)
class AllocationAdmin(FleetScaleAdmin):
    list_display = ["reservation", "gpu", "node", "period", "is_live"]
    list_filter = ["is_live"]
    search_fields = ["reservation__public_id", "node__hostname"]
    search_help_text = "A reservation's id (res_…) or a node's hostname, exactly."
    list_select_related = ["reservation", "gpu__node", "node"]

    def get_search_results(self, request, queryset, search_term):
        # The reservation and the node are looked up by their unique keys first, then their
        # allocations through the foreign-key indexes: a substring search joined and read
        # every allocation (4.6 s at a million).
        term = search_term.strip()
        if not term:
            return queryset, False
        reservations = list(Reservation.objects.filter(public_id=term).values_list("pk", flat=True))
        nodes = list(Node.objects.filter(hostname=term).values_list("pk", flat=True))
        return queryset.filter(Q(reservation_id__in=reservations) | Q(node_id__in=nodes)), False

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ProvisioningAttempt)
class ProvisioningAttemptAdmin(FleetScaleAdmin, ProvisioningRecordAdmin):
    list_display = [
        "id",
        "reservation_link",
        "kind",
        "number",
        "outcome",
        "worker",
        "started_at",
        "finished_at",
        "next_attempt_at",
    ]
    list_filter = ["kind", "outcome", ("started_at", admin.DateFieldListFilter)]
    search_fields = ["reservation__public_id"]
    list_select_related = ["reservation"]
    readonly_fields = ["reservation_link", *list_display[2:], "error"]
    fields = readonly_fields


@admin.register(AgentJob)
class AgentJobAdmin(FleetScaleAdmin, ProvisioningRecordAdmin):
    list_display = [
        "id",
        "kind",
        "generation",
        "status",
        "reservation_link",
        "node_link",
        "attempts",
        "lease_expires_at",
        "created_at",
        "finished_at",
    ]
    list_filter = ["kind", "status", "node__site"]
    search_fields = [
        "reservation__public_id",
        "node__hostname",
        "request_id",
    ]
    search_help_text = (
        "A reservation's id (res_…), part of a node's hostname, or the request id (req_…) "
        "that queued the job, exactly."
    )
    list_select_related = ["reservation", "node"]
    # The payload holds the workload's secrets (environment values): never shown here.
    readonly_fields = [
        "reservation_link",
        "node_link",
        "kind",
        "generation",
        "status",
        "lease_owner",
        "lease_expires_at",
        "attempts",
        "progress",
        "result",
        "error",
        "request_id",
        "created_at",
        "updated_at",
        "finished_at",
    ]
    fields = readonly_fields


@admin.register(ReservationOutage)
class ReservationOutageAdmin(ProvisioningRecordAdmin):
    list_display = [
        "id",
        "reservation_link",
        "node_link",
        "cause",
        "started_at",
        "ended_at",
        "source_outage_link",
    ]
    list_filter = ["cause", ("ended_at", admin.EmptyFieldListFilter), "node__site"]
    search_fields = ["reservation__public_id", "node__hostname", "detail"]
    # The inventory outage's link names its node: selected with it, not read per row.
    list_select_related = ["reservation", "node", "source_outage__node"]
    date_hierarchy = "started_at"
    readonly_fields = [
        "reservation_link",
        "node_link",
        "source_outage_link",
        "cause",
        "detail",
        "started_at",
        "ended_at",
        "created_at",
    ]
    fields = readonly_fields

    @admin.display(description="inventory outage")
    def source_outage_link(self, obj: ReservationOutage) -> str:
        return _admin_link(obj.source_outage)


@admin.register(Event)
class EventAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    """What integrators see in GET /events and receive by webhook; written by the services."""

    list_display = ["public_id", "type", "object_id", "organization", "created_at"]
    list_filter = ["type", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["public_id", "object_id", "organization__name", "organization__public_id"]
    list_select_related = ["organization"]


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(ReadOnlyAdmin):
    """Managed by the organisation (portal, API); staff look. The signing secrets never show."""

    list_display = ["public_id", "url", "organization", "enabled", "failing_since", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["public_id", "url", "organization__name", "organization__public_id"]
    list_select_related = ["organization"]
    exclude = ["secret", "previous_secrets"]


class WebhookAttemptInline(ReadOnlyInline):
    model = WebhookAttempt
    fields = ["at", "duration_ms", "succeeded", "response_status", "error", "response_excerpt"]
    readonly_fields = fields


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    list_display = ["public_id", "event", "endpoint", "status", "attempts", "next_attempt_at"]
    list_filter = ["status"]
    search_fields = ["public_id", "event__public_id", "endpoint__public_id", "endpoint__url"]
    list_select_related = ["event", "endpoint"]
    inlines = [WebhookAttemptInline]
    actions = ["resend"]

    def has_resend_permission(self, request: HttpRequest) -> bool:
        # The records are read-only here, so the model's change permission is what resending
        # needs (a view-only user reads them and does not send).
        return request.user.has_perm("marketplace.change_webhookdelivery")

    @admin.action(description="Resend the selected deliveries now", permissions=["resend"])
    def resend(self, request: HttpRequest, queryset: QuerySet) -> None:
        queued = 0
        for delivery in queryset:
            try:
                webhook_delivery_resend(delivery=delivery)
            except ApplicationError as exc:
                messages.error(request, f"{delivery.public_id}: {exc.message}")
            else:
                queued += 1
        if queued:
            messages.success(request, f"{queued} delivery(ies) queued again.")


@admin.register(MailMessage)
class MailMessageAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    """The mail outbox (marketplace.mail): what was sent, what waits, and what failed after
    its last attempt, which staff send again once the mail server or the address is fixed."""

    list_display = ["id", "task", "summary", "status", "attempts", "created_at", "sent_at"]
    list_filter = ["status", "task", ("created_at", admin.DateFieldListFilter)]
    list_display_links = ["id"]
    actions = ["resend"]

    @admin.display(description="message")
    def summary(self, obj: MailMessage) -> str:
        if obj.task == PLAIN_MAIL_TASK and len(obj.args) >= 3:
            return f"{obj.args[0]} → {', '.join(obj.args[2])}"
        return ", ".join(str(arg) for arg in obj.args)

    def has_resend_permission(self, request: HttpRequest) -> bool:
        # Read-only records: the model's change permission is what sending again needs.
        return request.user.has_perm("marketplace.change_mailmessage")

    @admin.action(description="Send the selected failed e-mails again", permissions=["resend"])
    def resend(self, request: HttpRequest, queryset: QuerySet) -> None:
        selected = list(queryset.values_list("pk", flat=True))
        queued = mail_outbox_resend(message_ids=selected)
        if queued:
            messages.success(request, f"{queued} e-mail(s) queued again.")
        if queued < len(selected):
            messages.warning(
                request,
                f"{len(selected) - queued} not failed, left as they are (only a failed "
                "e-mail is sent again).",
            )


@admin.register(AuditEntry)
class AuditEntryAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    """Append-only (the database refuses changes); staff read it."""

    list_display = [created_at_by_id, "organization", "actor", "action", "object_id", "ip_address"]
    # Dates as ranges (today, the past 7 days, …), not a date hierarchy: its links were the
    # table's MIN/MAX and DISTINCT days of created_at, unindexed, on every page (0.8 s at
    # 300,000 entries).
    list_filter = ["action", ("created_at", admin.DateFieldListFilter)]
    search_fields = ["actor", "object_id", "organization__name", "public_id"]
    list_select_related = ["organization"]
    ordering = ["-pk"]  # newest first by id, the order they were written in


class NodeReservationsInline(admin.TabularInline):
    """On a node's page: what runs on it or is booked there, before staff drain it."""

    model = Allocation
    fk_name = "node"
    verbose_name = "GPU in use or booked"
    verbose_name_plural = "Reservations on this node (running or booked)"
    fields = ["reservation_link", "customer", "reservation_status", "gpu", "period"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def get_queryset(self, request):
        return (
            super()
            .get_queryset(request)
            .filter(is_live=True)
            # The GPU's name is its node's hostname and index: one query, not one per row.
            .select_related("reservation__organization", "gpu__node")
            .order_by("reservation__ends_at", "reservation_id", "gpu__index")
        )

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="reservation")
    def reservation_link(self, allocation):
        r = allocation.reservation
        url = reverse("admin:marketplace_reservation_change", args=[r.pk])
        return format_html('<a href="{}">{}</a> ({} GPUs)', url, r.public_id, r.gpu_count)

    @admin.display(description="customer")
    def customer(self, allocation):
        return allocation.reservation.organization.name

    @admin.display(description="status")
    def reservation_status(self, allocation):
        r = allocation.reservation
        return f"{r.get_status_display()} until {r.ends_at:%Y-%m-%d %H:%M} UTC" + (
            " (interruptible)" if r.tier == "interruptible" else ""
        )


# The inventory's node page shows the marketplace's reservations on it: the marketplace
# depends on the inventory, never the reverse, so it adds the inline to the node's admin.
NodeAdmin.inlines = [*NodeAdmin.inlines, NodeReservationsInline]


@admin.register(ResaleListing)
class ResaleListingAdmin(ReadOnlyAdmin):
    """Listings of resold reserved time, and the sales they became (status sold): written by
    the sellers and buyers through the API and the portal."""

    list_display = [
        "public_id",
        "organization",
        "term_link",
        "status",
        "site",
        "node",
        "gpu_count",
        "tier",
        "starts_at",
        "ends_at",
        "price_per_gpu_hour",
        "fee_pct",
        "buyer_link",
        "sold_at",
    ]
    list_filter = ["status", "tier", "site"]
    list_select_related = [
        "organization",
        "reservation",
        "buyer_reservation__organization",
        "site",
        "node",
    ]
    search_fields = ["public_id", "reservation__public_id", "buyer_reservation__public_id"]
    date_hierarchy = "created_at"

    @admin.display(description="term", ordering="reservation_id")
    def term_link(self, obj) -> str:
        return _admin_link(obj.reservation, obj.reservation.public_id)

    @admin.display(description="buyer")
    def buyer_link(self, obj) -> str:
        buyer = obj.buyer_reservation
        if buyer is None:
            return "-"
        return _admin_link(buyer, f"{buyer.public_id} ({buyer.organization})")


@admin.register(ResaleFee)
class ResaleFeeAdmin(admin.ModelAdmin):
    """The platform's fee on resales: the newest row is in force (10 % until one is saved);
    to change it, add a new one (history is kept, and a sale keeps the fee it sold at)."""

    list_display = ["created_at", "fee_pct", "note", "created_by"]
    readonly_fields = ["created_by"]

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change) -> None:
        obj.created_by = request.user
        super().save_model(request, obj, form, change)
