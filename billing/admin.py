"""Staff views of billing: accounts with balance and history, holds, the outbox, webhooks,
invoices.

The ledger is read-only here as everywhere; staff move money only through the services
(issue a credit, refund a top-up, approve postpaid), each with a reason and their name.
"""

from decimal import Decimal

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.shortcuts import get_object_or_404, redirect, render
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from billing.models import (
    INVOICE_UNPAID_STATUSES,
    Balance,
    BillingAccount,
    BillingNotice,
    Hold,
    Invoice,
    LedgerEntry,
    OutboxMessage,
    PaymentMethod,
    Refund,
    TopUp,
    UsageAggregate,
    WebhookEvent,
)
from billing.money import from_minor_units, to_minor_units_asked
from billing.selectors import balance_minor
from billing.services.accounts import (
    billing_account_approve_postpaid,
    billing_currency_change_check,
    billing_settings_check,
    billing_settings_update,
)
from billing.services.credits import credit_issue
from billing.services.funding import billing_account_lock
from billing.services.refunds import refund_create
from config.admin_base import FleetScaleAdmin, ReadOnlyAdmin, created_at_by_id, currency_clean
from config.errors import ApplicationError
from config.once import OnceField, once_or_refused
from marketplace.portal.fields import PortalAmountField


def _money_moved(model_admin, request, form, organization, move, *, done: str, again: str):
    """Take a MoneyForm's action once (its one-time key) and say so; False (the refusal on
    the form) when the service refused it."""
    try:
        moved = once_or_refused(request, organization, form.cleaned_data["once"], move)
    except ApplicationError as exc:
        form.add_error(None, exc.message)
        return False
    if moved is None:
        model_admin.message_user(request, f"{again} (the form was sent twice).", messages.WARNING)
    else:
        model_admin.message_user(request, done)
    return True


def money_column(field: str, description: str):
    """A list column showing the row's `field` (minor units) as money in the row's currency,
    "5,999 JPY" or "59.99 USD", sortable by the field: staff read amounts, not minor units."""

    @admin.display(description=description, ordering=field)
    def column(obj):
        return f"{from_minor_units(getattr(obj, field), obj.currency):,} {obj.currency.upper()}"

    column.__name__ = f"{field}_money"
    return column


class MoneyForm(forms.Form):
    # Digits as typed: "1e3" is not read as 1000 (money typed is money moved).
    amount = PortalAmountField(max_digits=12, decimal_places=2, min_value=Decimal("0.01"))
    reason = forms.CharField(widget=forms.Textarea, max_length=2000)
    # Sent twice (a double click, a reload): the money moves once.
    once = OnceField()
    # The currency the amount was typed in, as the form showed it: the account's may have
    # changed since (until money moves), and a credit is refused in any other.
    currency = forms.CharField(widget=forms.HiddenInput, required=False)

    def __init__(self, *args, currency: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.currency = currency
        self.fields["amount"].label = f"Amount ({currency.upper()})"
        self.fields["currency"].initial = currency

    def clean_amount(self) -> Decimal:
        # The amount typed is the amount moved: 10.50 in yen would be rounded to 11.
        amount = self.cleaned_data["amount"]
        try:
            to_minor_units_asked(amount, self.currency, field="amount")
        except ApplicationError as exc:
            raise forms.ValidationError(exc.message) from None
        return amount


_SETTINGS_FIELDS = {  # admin field (minor units) → billing_settings_update's argument (major)
    "recharge_threshold_minor": "recharge_threshold",
    "recharge_amount_minor": "recharge_amount",
    "monthly_spend_limit_minor": "monthly_spend_limit",
}


class BillingAccountAdminForm(forms.ModelForm):
    """Staff change an account's settings within the customer's own bounds
    (billing_settings_check), and its currency by the customer's rule for a change
    (billing_currency_change_check: until money moves), to any currency Switchyard charges in."""

    class Meta:
        model = BillingAccount
        fields = ("currency", "auto_recharge_enabled", *_SETTINGS_FIELDS)

    def settings_changes(self) -> dict:
        """The changed settings, as billing_settings_update takes them (major units)."""
        currency = self.cleaned_data.get("currency") or self.instance.currency
        changes = {}
        for name, argument in _SETTINGS_FIELDS.items():
            if name in self.changed_data and name in self.cleaned_data:
                value = self.cleaned_data[name]
                changes[argument] = None if value is None else from_minor_units(value, currency)
        if "auto_recharge_enabled" in self.changed_data and "auto_recharge_enabled" in (
            self.cleaned_data
        ):
            changes["auto_recharge_enabled"] = self.cleaned_data["auto_recharge_enabled"]
        return changes

    def clean_currency(self) -> str:
        return currency_clean(self.cleaned_data.get("currency"))

    def clean(self):
        cleaned = super().clean()
        if (
            self.cleaned_data.get("auto_recharge_enabled")
            and "auto_recharge_enabled" in (self.changed_data)
            and not self.instance.default_payment_method_id
        ):
            self.add_error("auto_recharge_enabled", "The organisation has no saved card.")
        try:
            if "currency" in self.changed_data and "currency" in cleaned:
                # The customer's rules for a change (billing_currency_change_check), for any
                # currency: taken under the account's lock (the funding gate's), the check and
                # the save are one decision (the admin's change view is one transaction), so
                # no booking can hold money in the old currency between them. Minor units
                # kept as they are mean another amount in the new currency: all of the
                # settings are checked, not only those changed.
                billing_currency_change_check(
                    account=billing_account_lock(self.instance.organization_id),
                    currency=cleaned["currency"],
                    any_currency=True,
                    **{
                        argument: None
                        if cleaned.get(name) is None
                        else from_minor_units(cleaned[name], cleaned["currency"])
                        for name, argument in _SETTINGS_FIELDS.items()
                    },
                )
            else:
                bounds = self.settings_changes()
                bounds.pop("auto_recharge_enabled", None)
                billing_settings_check(currency=self.instance.currency, **bounds)
        except ApplicationError as exc:
            field = {v: k for k, v in _SETTINGS_FIELDS.items()}.get(exc.field, exc.field)
            self.add_error(field if field in self.fields else None, exc.message)
        return cleaned


@admin.register(BillingAccount)
class BillingAccountAdmin(admin.ModelAdmin):
    list_display = ("organization", "mode", "funding_state", "balance", "stripe_customer_id")
    list_filter = ("mode", "funding_state")
    search_fields = ("organization__name", "organization__slug", "organization__public_id",
                     "stripe_customer_id")  # fmt: skip
    search_help_text = "An organisation's name, slug or id (org_…), or a Stripe customer (cus_…)."
    readonly_fields = (
        "organization", "balance", "stripe_customer_id", "mode", "postpaid_approved_by",
        "postpaid_approved_at", "funding_state", "grace_until", "funding_state_changed_at",
        "default_payment_method_id", "recharge_armed", "actions_links", "recent_notices",
        "ledger_history",
    )  # fmt: skip
    fields = readonly_fields[:2] + (
        "currency", "auto_recharge_enabled", "recharge_threshold_minor", "recharge_amount_minor",
        "monthly_spend_limit_minor",
    ) + readonly_fields[2:]  # fmt: skip
    actions = ["approve_postpaid"]
    form = BillingAccountAdminForm

    def has_add_permission(self, request):
        return False

    def get_fields(self, request, obj=None):
        fields = super().get_fields(request, obj)
        if request.user.has_perm("billing.change_billingaccount"):
            return fields
        return [f for f in fields if f != "actions_links"]  # a credit needs the permission

    def get_readonly_fields(self, request, obj=None):
        fields = super().get_readonly_fields(request, obj)
        if obj is not None and LedgerEntry.objects.filter(organization=obj.organization).exists():
            return (*fields, "currency")  # money is on its ledger in this currency
        return fields

    def save_model(self, request, obj, form, change):
        # Through the customer's own service (its bounds, its audit entry), the currency too:
        # checked again under the lock the form's clean took in this transaction.
        changes = form.settings_changes()
        if "currency" in form.changed_data:
            changes.update(currency=form.cleaned_data["currency"], any_currency=True)
        if changes:
            billing_settings_update(organization=obj.organization, **changes)

    def has_delete_permission(self, request, obj=None):
        return False

    def get_queryset(self, request):
        # The balance of every listed account in the list's one query, read from the row the
        # ledger's trigger keeps (billing.selectors.balance_minor): summing each account's
        # ledger read every line it ever had, and sorting by balance summed the whole ledger.
        balance = Balance.objects.filter(organization=OuterRef("organization")).values(
            "amount_minor"
        )
        return (
            super()
            .get_queryset(request)
            .select_related("organization")
            .annotate(balance_minor=Coalesce(Subquery(balance), 0))
        )

    @admin.display(description="balance", ordering="balance_minor")
    def balance(self, obj):
        amount = getattr(obj, "balance_minor", None)
        if amount is None:
            amount = balance_minor(organization=obj.organization)
        return f"{from_minor_units(amount, obj.currency):,} {obj.currency.upper()}"

    @admin.display(description="ledger (latest 50, read-only)")
    def ledger_history(self, obj):
        rows = LedgerEntry.objects.filter(organization=obj.organization).select_related(
            "reservation"
        )[:50]
        return format_html(
            "<table><tr><th>at</th><th>kind</th><th>amount</th><th>reservation</th>"
            "<th>description</th></tr>{}</table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                (
                    (
                        e.created_at,
                        e.kind,
                        f"{from_minor_units(e.amount_minor, e.currency):,} {e.currency.upper()}",
                        e.reservation.public_id if e.reservation else "",
                        e.description,
                    )
                    for e in rows
                ),  # fmt: skip
            ),
        )

    @admin.display(description="notices (latest 10)")
    def recent_notices(self, obj):
        notices = BillingNotice.objects.filter(organization=obj.organization)[:10]
        return format_html_join(
            "", "<p>{}: {} — {}</p>", ((n.created_at, n.kind, n.message) for n in notices)
        )

    @admin.display(description="staff actions")
    def actions_links(self, obj):
        if obj.pk is None:
            return ""
        url = reverse("admin:billing_billingaccount_credit", args=[obj.pk])
        return format_html('<a class="button" href="{}">Issue a credit</a>', url)

    @admin.action(description="Approve postpaid invoicing…", permissions=["change"])
    def approve_postpaid(self, request, queryset):
        """First a page with each account and what the switch does (the admin has no way
        back to prepaid); the switches run once staff confirm it there."""
        if request.POST.get("confirmed") != "yes":
            accounts = list(queryset.order_by("pk"))
            context = {
                **self.admin_site.each_context(request),
                "title": f"Approve postpaid invoicing for {len(accounts)} organisation(s)?",
                "opts": self.model._meta,
                "rows": [{"account": a, "balance": self.balance(a)} for a in accounts],
            }
            return TemplateResponse(
                request, "admin/billing/billingaccount/approve_postpaid_confirm.html", context
            )
        for account in queryset.order_by("pk"):
            try:
                billing_account_approve_postpaid(
                    organization=account.organization, approved_by=request.user
                )
            except ApplicationError as exc:
                self.message_user(
                    request, f"{account.organization}: {exc.message}", messages.WARNING
                )
            else:
                self.message_user(request, f"{account.organization} is now postpaid.")

    def get_urls(self):
        return [
            path(
                "<int:pk>/credit/",
                self.admin_site.admin_view(self.credit_view),
                name="billing_billingaccount_credit",
            ),  # fmt: skip
            *super().get_urls(),
        ]

    def credit_view(self, request, pk: int):
        if not request.user.has_perm("billing.change_billingaccount"):
            raise PermissionDenied
        account = get_object_or_404(BillingAccount.objects.select_related("organization"), pk=pk)
        form = MoneyForm(request.POST or None, currency=account.currency)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            if _money_moved(
                self, request, form, account.organization,
                lambda: credit_issue(organization=account.organization, amount=data["amount"],
                                     reason=data["reason"], created_by=request.user,
                                     currency=data["currency"] or account.currency),
                done="Credit issued.", again="This credit was already issued",
            ):  # fmt: skip
                return redirect("admin:billing_billingaccount_change", pk)
        context = {**self.admin_site.each_context(request), "form": form,
                   "title": "Issue a credit", "subject": str(account.organization)}  # fmt: skip
        return render(request, "admin/billing/money_form.html", context)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    list_display = (created_at_by_id, "organization", "kind",
                    money_column("amount_minor", "amount"), "reservation")  # fmt: skip
    list_filter = ("kind",)
    search_fields = ("public_id", "organization__name", "organization__public_id",
                     "idempotency_key")  # fmt: skip
    list_select_related = ("organization", "reservation")
    # Newest first by id, the order entries were written in, as holds and reservations are
    # listed: a metering run stamps all its lines with one created_at, which the model's
    # (-created_at, -id) then sorted as one group.
    ordering = ("-pk",)


@admin.register(Hold)
class HoldAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    """What bookings hold against balances until the meter charges them or they end."""

    list_display = (created_at_by_id, "organization", "reservation",
                    money_column("amount_minor", "held"), money_column("charged_minor", "charged"),
                    "status", "closed_at")  # fmt: skip
    list_filter = ("status",)
    search_fields = ("organization__name", "reservation__public_id", "idempotency_key")
    list_select_related = ("organization", "reservation")
    # Newest first by id, the order they were taken in: created_at has no index (each page
    # sorted every hold, 0.7 s at 300,000).
    ordering = ("-pk",)


@admin.register(TopUp)
class TopUpAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    list_display = ("public_id", "organization", money_column("amount_minor", "amount"),
                    "automatic", "status", "stripe_payment_intent_id", "refund_link")  # fmt: skip
    list_filter = ("status", "automatic")
    search_fields = ("public_id", "organization__name", "organization__public_id",
                     "stripe_payment_intent_id")  # fmt: skip
    search_help_text = "A top-up's id (tu_…), an organisation's name or id, or a payment (pi_…)."

    def get_list_display(self, request):
        shown = super().get_list_display(request)
        if request.user.has_perm("billing.add_refund"):
            return shown
        return [c for c in shown if c != "refund_link"]  # a refund needs the permission

    @admin.display(description="refund")
    def refund_link(self, obj):
        if obj.status != "succeeded":
            return ""
        return format_html(
            '<a href="{}">Refund…</a>', reverse("admin:billing_topup_refund", args=[obj.pk])
        )

    def get_urls(self):
        return [
            path(
                "<int:pk>/refund/",
                self.admin_site.admin_view(self.refund_view),
                name="billing_topup_refund",
            ),  # fmt: skip
            *super().get_urls(),
        ]

    def refund_view(self, request, pk: int):
        if not request.user.has_perm("billing.add_refund"):
            raise PermissionDenied
        top_up = get_object_or_404(TopUp.objects.select_related("organization"), pk=pk)
        form = MoneyForm(request.POST or None, currency=top_up.currency)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            if _money_moved(
                self, request, form, top_up.organization,
                lambda: refund_create(top_up=top_up, amount=data["amount"],
                                      reason=data["reason"], created_by=request.user),
                done="Refund requested; Stripe confirms it shortly.",
                again="This refund was already requested",
            ):  # fmt: skip
                return redirect("admin:billing_topup_changelist")
        context = {**self.admin_site.each_context(request), "form": form, "title": "Refund a top-up",
                   "subject": f"{top_up.organization}: top-up {top_up.pk} of "
                   f"{from_minor_units(top_up.amount_minor, top_up.currency)} {top_up.currency.upper()}"}  # fmt: skip
        return render(request, "admin/billing/money_form.html", context)


@admin.register(Refund)
class RefundAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "organization",
        money_column("amount_minor", "amount"),
        "status",
        "reason",
        "created_by",
    )
    list_filter = ("status",)
    search_fields = ("stripe_refund_id", "top_up__public_id", "top_up__stripe_payment_intent_id",
                     "organization__name", "organization__public_id")  # fmt: skip
    search_help_text = "A Stripe refund (re_…), its top-up (tu_…, pi_…), or an organisation."
    list_select_related = ("organization", "created_by")  # created_by may be empty: named here


@admin.register(OutboxMessage)
class OutboxMessageAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "status",
        "attempts",
        "next_attempt_at",
        "stripe_object_id",
        "last_error",
    )
    list_filter = ("status", "kind")
    search_fields = ("idempotency_key", "stripe_object_id")


@admin.register(WebhookEvent)
class WebhookEventAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    list_display = ("stripe_event_id", "type", "received_at", "processed_at", "error")
    list_filter = ("type",)
    search_fields = ("stripe_event_id",)


class InvoicePastDueFilter(admin.SimpleListFilter):
    """Unpaid invoices that became past due (their organisations' bookings are refused once
    the grace is over), and the rest."""

    title = "past due"
    parameter_name = "past_due"

    def lookups(self, request, model_admin):
        return [("yes", "Past due (unpaid)"), ("no", "Not past due")]

    def queryset(self, request, queryset):
        past_due = Q(payment_failed_at__isnull=False, status__in=INVOICE_UNPAID_STATUSES)
        if self.value() == "yes":
            return queryset.filter(past_due)
        if self.value() == "no":
            return queryset.exclude(past_due)
        return queryset


@admin.register(Invoice)
class InvoiceAdmin(ReadOnlyAdmin):
    list_display = ("stripe_invoice_id", "organization", "status",
                    money_column("amount_due_minor", "amount due"), "period_start",
                    "payment_failed_at", "hosted_link")  # fmt: skip
    list_filter = ("status", InvoicePastDueFilter)
    search_fields = ("stripe_invoice_id", "stripe_customer_id", "organization__name",
                     "organization__public_id")  # fmt: skip
    search_help_text = "A Stripe invoice (in_…) or customer (cus_…), or an organisation."

    @admin.display(description="invoice")
    def hosted_link(self, obj):
        return (
            format_html('<a href="{}" target="_blank">open</a>', obj.hosted_invoice_url)
            if obj.hosted_invoice_url
            else ""
        )


@admin.register(PaymentMethod)
class PaymentMethodAdmin(ReadOnlyAdmin):
    list_display = ("stripe_payment_method_id", "organization", "brand", "last4", "detached_at")
    search_fields = ("stripe_payment_method_id", "last4", "organization__name",
                     "organization__public_id")  # fmt: skip


@admin.register(UsageAggregate)
class UsageAggregateAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    list_display = (
        "id",
        "organization",
        "period_start",
        money_column("amount_minor", "amount"),
        "gpu_seconds",
    )


@admin.register(BillingNotice)
class BillingNoticeAdmin(FleetScaleAdmin, ReadOnlyAdmin):
    list_display = ("created_at", "organization", "kind", "message")
    list_filter = ("kind",)
