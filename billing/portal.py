"""The portal's Billing pages: balance and settings, cards, top-ups, usage and ledger, invoices.

Thin views over the services and selectors the API uses, with the API's role sets: every
member reads; owners, admins and billing members change money things. A refused action
(a domain error, Stripe unreachable or not configured) is a message on the page and
changes nothing.
"""

from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.utils import timezone
from django.utils.cache import add_never_cache_headers
from django.views import View

from billing.apis import MONEY_ROLES
from billing.exports import statement_csv_lines
from billing.models import BillingMode, FundingState
from billing.money import from_minor_units, top_up_limits, top_up_range_text
from billing.selectors import (
    account_currency,
    balance_by_day,
    billing_account_for_org,
    currency_choices,
    currency_lock_reason,
    invoice_past_due,
    invoices_for_org,
    ledger_for_org,
    month_start,
    notices_for_org,
    payment_methods_for_org,
    spend_by_day_and_model,
    spend_minor,
    statement_for_month,
    statement_month,
    statement_months,
    top_ups_for_org,
    usage_page,
    usage_row_energy,
)
from billing.services.accounts import billing_account_get_or_create, billing_settings_update
from billing.services.funding import committed_hold_minor
from billing.services.holds import money_position
from billing.services.payment_methods import (
    payment_method_attach,
    payment_method_detach,
    payment_method_set_default,
    setup_intent_create,
)
from billing.services.topups import top_up_create
from config.csp import stripe_js_allow
from config.errors import ApplicationError
from config.once import OnceField, once_or_refused
from config.replica import replica_reads
from marketplace.portal.fields import PortalAmountField, PortalDateField
from marketplace.portal.mixins import PortalView, show_error

FUNDING_MEANING = {
    FundingState.OK: "Funded: the balance covers new reservations.",
    # funding_words states the threshold: a customer who never set one must see the figure.
    FundingState.WARNING: "The available balance is below {threshold}, the threshold in your "
    "billing settings at which you are warned (and automatic recharge, when on, tops up). Top "
    "up before it runs out.",
    FundingState.GRACE: "The balance has run out. On-demand and interruptible reservations keep "
    "running until the grace period ends, then they are stopped unless you top up.",
    FundingState.SUSPENDED: "The balance ran out and the grace period is over: on-demand and "
    "interruptible reservations were stopped; reserved terms keep running. A top-up that "
    "brings the balance above zero lifts this.",
}
FUNDING_LABEL = {
    FundingState.OK: "Funded",
    FundingState.WARNING: "Running low",
    FundingState.GRACE: "Out of funds (grace period)",
    FundingState.SUSPENDED: "Suspended",
}
NO_BALANCE = (
    "No balance yet: top up before reserving. On-demand and interruptible reservations need "
    "their first hour paid up front, reserved terms the whole term."
)
NOT_CONFIGURED = "Card payments are not available on this deployment; contact support."
LEDGER_PAGE_SIZE = 50


def money(amount_minor: int | None, currency: str) -> str:
    """Minor units as the customer reads them: "1,234.50 USD"."""
    if amount_minor is None:
        return "—"
    return f"{from_minor_units(int(amount_minor), currency):,} {currency.upper()}"


def funding_words(account, balance: int) -> tuple[str, str]:
    """The funding state's label and meaning as the customer should read them now.

    A prepaid account with nothing on it is "ok" to the dunning steps (nothing runs, so nothing
    is owed) but cannot reserve: it is not called funded.
    """
    state = account.funding_state if account else FundingState.OK
    prepaid = account is None or account.mode == BillingMode.PREPAID
    if state == FundingState.OK and prepaid and balance <= 0:
        return "No balance", NO_BALANCE
    meaning = FUNDING_MEANING.get(state, "")
    if state == FundingState.WARNING:
        meaning = meaning.format(
            threshold=money(account.recharge_threshold_minor, account.currency)
        )
    return FUNDING_LABEL.get(state, str(state)), meaning


def commitment_funding(membership, *, currency: str, **commitment) -> dict:
    """For a quote page: what is held now, what is available, and whether it covers it."""
    organization = membership.organization
    account = billing_account_for_org(organization=organization)
    due_minor = committed_hold_minor(currency=currency, **commitment)
    due_now = from_minor_units(due_minor, currency)
    position = money_position(organization_id=organization.pk)
    balance, held = position.balance, position.accrued + position.held
    postpaid = bool(account) and account.mode == BillingMode.POSTPAID
    # Postpaid: nothing is due now, but an invoice left unpaid past the grace refuses it, as
    # the funding gate does.
    overdue = (
        invoice_past_due(organization_id=organization.pk, past_grace=True) if postpaid else None
    )
    return {
        "due_now": due_now,
        "due_is_total": due_now >= commitment["total_amount"],
        "balance": from_minor_units(balance, currency),
        "held": from_minor_units(held, currency),
        "available": from_minor_units(position.available, currency),
        "postpaid": postpaid,
        "invoice_past_due": overdue,
        "covered": (postpaid and overdue is None)
        or (not postpaid and position.available >= due_minor),
        "can_pay": membership.role in MONEY_ROLES,
    }


def _payments_configured() -> bool:
    # The same switch billing.stripe_gateway.build_client uses: no secret key, no Stripe.
    return bool(settings.STRIPE_SECRET_KEY)


def _amount_field(label: str, **kwargs) -> forms.DecimalField:
    # A text box, not type=number: money is typed as text and validated here, one way. Room
    # for the largest top-up in any currency (¥10,000,000); the service checks the limits.
    return PortalAmountField(
        label=label,
        max_digits=12,
        decimal_places=2,
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
        **kwargs,
    )


class BillingSettingsForm(forms.Form):
    """The API's BillingSettingsInput; the ranges are the service's to enforce, and the help
    texts state them in the account's currency."""

    auto_recharge_enabled = forms.BooleanField(
        label="Recharge automatically",
        required=False,
        help_text="Off until you turn it on; needs a saved card. Every automatic charge is "
        "e-mailed with its reason, and before a reservation triggers one you are asked.",
    )
    recharge_threshold = _amount_field("Recharge threshold")
    recharge_amount = _amount_field("Recharge amount")
    monthly_spend_limit = PortalAmountField(
        label="Monthly spend limit",
        max_digits=12,
        decimal_places=2,
        required=False,
        widget=forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"}),
        help_text="Empty: no limit. New reservations that would go over it are refused.",
    )

    def __init__(self, *args, currency: str, currency_choices: list[str] | None = None, **kwargs):
        """`currency_choices`: more than one shows the billing currency as a choice (only
        while it can still change)."""
        super().__init__(*args, **kwargs)
        if currency_choices and len(currency_choices) > 1:
            self.fields = {
                "currency": forms.ChoiceField(
                    label="Billing currency",
                    choices=[(c, c.upper()) for c in currency_choices],
                    initial=currency,
                    help_text="What you are billed in and can book: only offers priced in it. "
                    "It can be changed until money moves (a top-up or a booking); the "
                    "amounts below are in the currency chosen here.",
                ),
                **self.fields,
            }
        most = top_up_limits(currency)[1]
        self.fields["recharge_threshold"].help_text = (
            "Recharge, and warn, when the balance drops below this "
            f"(at most {most:,} {currency.upper()})."
        )
        self.fields["recharge_amount"].help_text = f"Between {top_up_range_text(currency)}."


class TopUpForm(forms.Form):
    amount = _amount_field("Amount")
    # A double click or a reload of the answer sends the form twice: one charge, not two.
    once = OnceField()

    def __init__(self, *args, currency: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["amount"].help_text = f"Between {top_up_range_text(currency)}."


class PaymentMethodAttachForm(forms.Form):
    payment_method = forms.RegexField(r"^pm_[A-Za-z0-9_]+$", max_length=64)
    setup_intent = forms.RegexField(r"^seti_[A-Za-z0-9_]+$", max_length=64, required=False)


class UsageFilterForm(forms.Form):
    since = PortalDateField(required=False, widget=forms.DateInput(attrs={"type": "date"}))
    until = PortalDateField(
        required=False,
        widget=forms.DateInput(attrs={"type": "date"}),
        help_text="Up to, not including.",
    )

    def clean(self):
        cleaned = super().clean()
        since, until = cleaned.get("since"), cleaned.get("until")
        if since and until and until <= since:
            self.add_error(
                "until", "Pick a day after the first one (the last day is not included)."
            )
        return cleaned


class UsagePageForm(UsageFilterForm):
    """The usage page's period: its charts have a bar per day, so at most CHART_MAX_DAYS
    (a download takes any period)."""

    CHART_MAX_DAYS = 366

    def clean(self):
        cleaned = super().clean()
        since, until = cleaned.get("since"), cleaned.get("until")
        if since and not self.errors:
            end = until or timezone.now().date() + timedelta(days=1)
            if (end - since).days > self.CHART_MAX_DAYS:
                self.add_error(
                    "since",
                    f"Pick at most {self.CHART_MAX_DAYS} days here (a bar per day); the CSV "
                    "download takes any period.",
                )
        return cleaned


def _form_error(form: forms.Form, exc: ApplicationError) -> None:
    form.add_error(exc.field if exc.field in form.fields else None, exc.message)


class BillingPage(PortalView, View):
    write_roles = MONEY_ROLES

    def can_write(self) -> bool:
        return self.membership.role in MONEY_ROLES

    def render(self, request, template: str, context: dict, status: int = 200):
        shared = {"can_write": self.can_write(), "payments_configured": _payments_configured()}
        return render(request, f"portal/billing/{template}", shared | context, status=status)


def _currency_choices(account, *, changing: bool = False) -> list[str]:
    """The billing currencies the settings form offers: none (the currency is stated as text)
    once it can no longer change or when only one is sold. A change posted (`changing`) keeps
    the choice, so a refusal (money moved meanwhile) is shown on it."""
    if not changing and currency_lock_reason(organization_id=account.organization_id):
        return []
    return currency_choices(account=account)


class OverviewView(BillingPage):
    def get(self, request, form: BillingSettingsForm | None = None, status: int = 200):
        account = billing_account_get_or_create(organization=self.organization)
        c = account.currency
        if form is None:
            form = BillingSettingsForm(
                currency=c,
                currency_choices=_currency_choices(account) if self.can_write() else [],
                initial={
                    "auto_recharge_enabled": account.auto_recharge_enabled,
                    "recharge_threshold": from_minor_units(account.recharge_threshold_minor, c),
                    "recharge_amount": from_minor_units(account.recharge_amount_minor, c),
                    "monthly_spend_limit": None
                    if account.monthly_spend_limit_minor is None
                    else from_minor_units(account.monthly_spend_limit_minor, c),
                },
            )
        spent = spend_minor(organization=self.organization, since=month_start(timezone.now()))
        position = money_position(organization_id=self.organization.pk)
        balance, held = position.balance, position.held
        funding_label, funding_meaning = funding_words(account, position.available)
        top_ups = list(top_ups_for_org(organization=self.organization)[:5])
        for top_up in top_ups:
            top_up.amount_display = money(top_up.amount_minor, top_up.currency)
        return self.render(
            request,
            "overview.html",
            {
                "account": account,
                "currency": c.upper(),
                "balance": money(balance, c),
                "accrued": money(position.accrued, c) if position.accrued else None,
                "held": money(held, c) if held else None,
                "available": money(position.available, c),
                "spent_this_month": money(spent, c),
                "monthly_spend_limit": money(account.monthly_spend_limit_minor, c)
                if account.monthly_spend_limit_minor is not None
                else "No limit",
                "recharge_threshold": money(account.recharge_threshold_minor, c),
                "recharge_amount": money(account.recharge_amount_minor, c),
                "funding_label": funding_label,
                "funding_meaning": funding_meaning,
                "top_ups": top_ups,
                "notices": notices_for_org(organization=self.organization)[:20],
                "form": form,
            },
            status=status,
        )

    def post(self, request):
        account = billing_account_get_or_create(organization=self.organization)
        form = BillingSettingsForm(
            request.POST,
            currency=account.currency,
            currency_choices=_currency_choices(account, changing="currency" in request.POST),
        )
        if form.is_valid():
            asked = dict(form.cleaned_data)
            if asked.get("currency", account.currency) != account.currency:
                # Amounts left as the page showed them (in the old currency) are not asked:
                # defaults become the new currency's (billing_settings_update), not the same
                # figure in it.
                for name in ("recharge_threshold", "recharge_amount"):
                    shown = from_minor_units(getattr(account, f"{name}_minor"), account.currency)
                    if asked.get(name) == shown:
                        del asked[name]
            try:
                billing_settings_update(organization=self.organization, **asked)
            except ApplicationError as exc:
                _form_error(form, exc)
            else:
                messages.success(request, "Billing settings saved.")
                return redirect("portal-billing:overview")
        return self.get(request, form=form, status=400)


class PaymentMethodsView(BillingPage):
    """The saved cards; POST saves one that Stripe.js confirmed (payment_method_attach)."""

    def get(self, request):
        account = billing_account_for_org(organization=self.organization)
        default = account.default_payment_method_id if account else ""
        methods = list(payment_methods_for_org(organization=self.organization))
        for pm in methods:
            pm.is_default = pm.stripe_payment_method_id == default
        return self.render(request, "payment_methods.html", {"methods": methods})

    def post(self, request):
        form = PaymentMethodAttachForm(request.POST)
        if not form.is_valid():
            messages.error(request, "The card was not confirmed by Stripe; nothing was saved.")
            return redirect("portal-billing:payment-methods")
        try:
            pm = payment_method_attach(
                organization=self.organization,
                payment_method_id=form.cleaned_data["payment_method"],
                setup_intent_id=form.cleaned_data["setup_intent"],
            )
        except ApplicationError as exc:
            show_error(request, exc)
        else:
            messages.success(request, f"{pm.brand.title()} ending {pm.last4} saved.")
        return redirect("portal-billing:payment-methods")


class PaymentMethodNewView(BillingPage):
    """Starts a SetupIntent (a Stripe write, so money roles only) for Stripe.js to confirm."""

    read_roles = MONEY_ROLES

    def get(self, request):
        try:
            setup = setup_intent_create(organization=self.organization)
        except ApplicationError as exc:
            return self.render(request, "payment_method_new.html", {"error": exc.message})
        stripe_config = {
            "publishableKey": setup["publishable_key"],
            "clientSecret": setup["client_secret"],
        }
        response = self.render(
            request,
            "payment_method_new.html",
            {"stripe_js_url": setup["stripe_js_url"], "stripe_config": stripe_config},
        )
        add_never_cache_headers(response)  # the SetupIntent's client secret
        return stripe_js_allow(response)


class PaymentMethodDefaultView(BillingPage):
    read_roles = MONEY_ROLES

    def post(self, request, payment_method_id: str):
        try:
            payment_method_set_default(
                organization=self.organization, payment_method_id=payment_method_id
            )
        except ApplicationError as exc:
            show_error(request, exc)
        else:
            messages.success(request, "Default card changed.")
        return redirect("portal-billing:payment-methods")


class PaymentMethodRemoveView(BillingPage):
    """GET asks for confirmation, saying what removing the card changes; POST removes it."""

    read_roles = MONEY_ROLES

    def get(self, request, payment_method_id: str):
        methods = list(payment_methods_for_org(organization=self.organization))
        card = next(
            (pm for pm in methods if pm.stripe_payment_method_id == payment_method_id), None
        )
        if card is None:  # gone already, or another organisation's: as the service says
            raise Http404("No such payment method.")
        account = billing_account_for_org(organization=self.organization)
        is_default = bool(account) and account.default_payment_method_id == payment_method_id
        others = sorted(
            (pm for pm in methods if pm.pk != card.pk), key=lambda pm: (pm.created_at, pm.pk)
        )
        return self.render(
            request,
            "payment_method_remove.html",
            {
                "card": card,
                "is_default": is_default,
                # The service makes the newest remaining card the default.
                "replacement": others[-1] if is_default and others else None,
                "auto_recharge_stops": is_default
                and not others
                and bool(account and account.auto_recharge_enabled),
            },
        )

    def post(self, request, payment_method_id: str):
        try:
            payment_method_detach(
                organization=self.organization, payment_method_id=payment_method_id
            )
        except ApplicationError as exc:
            show_error(request, exc)
        else:
            messages.success(request, "Card removed.")
        return redirect("portal-billing:payment-methods")


class TopUpView(BillingPage):
    def get(self, request, form: TopUpForm | None = None, status: int = 200):
        top_ups = list(top_ups_for_org(organization=self.organization)[:50])
        for top_up in top_ups:
            top_up.amount_display = money(top_up.amount_minor, top_up.currency)
        account = billing_account_for_org(organization=self.organization)
        currency = account_currency(account)
        return self.render(
            request,
            "top_up.html",
            {
                "form": form or TopUpForm(currency=currency),
                "top_ups": top_ups,
                "currency": currency.upper(),
                "has_card": bool(account and account.default_payment_method_id),
            },
            status=status,
        )

    def post(self, request):
        account = billing_account_for_org(organization=self.organization)
        form = TopUpForm(request.POST, currency=account_currency(account))
        if form.is_valid():
            amount: Decimal = form.cleaned_data["amount"]
            try:
                top_up = once_or_refused(
                    request,
                    self.organization,
                    form.cleaned_data["once"],
                    lambda: top_up_create(organization=self.organization, amount=amount),
                )
            except ApplicationError as exc:
                _form_error(form, exc)
            else:
                if top_up is None:
                    messages.warning(
                        request,
                        "This top-up was already requested (the form was sent twice); it is "
                        "charged once. Its status is below.",
                    )
                    return redirect("portal-billing:top-up")
                messages.success(
                    request,
                    f"Top-up of {money(top_up.amount_minor, top_up.currency)} requested; "
                    "its status is below.",
                )
                return redirect("portal-billing:top-up")
        return self.get(request, form=form, status=400)


class UsageView(BillingPage):
    """Usage by reservation and UTC day, newest first, USAGE_PAGE_SIZE rows a page (keyset
    pages over billing.selectors.usage_page, as the API's), and the ledger, page by page."""

    USAGE_PAGE_SIZE = 200

    @replica_reads
    def get(self, request):
        form = UsagePageForm(request.GET or None)
        since = until = None
        if form.is_valid():
            since, until = form.cleaned_data["since"], form.cleaned_data["until"]
        usage, usage_pages = self._usage_page(request, since, until)
        for row in usage:
            # Usage entries take from the balance; the customer reads them as positive charges.
            row["amount_display"] = money(-row["amount_minor"], row["currency"])
            row["gpu_hours"] = (Decimal(row["gpu_seconds"]) / 3600).quantize(
                Decimal("0.01"), rounding=ROUND_HALF_UP
            )
            row["energy"] = usage_row_energy(row)
        ledger = Paginator(ledger_for_org(organization=self.organization), LEDGER_PAGE_SIZE)
        page = ledger.get_page(request.GET.get("page"))
        page.object_list = list(page.object_list)
        for entry in page.object_list:
            entry.amount_display = money(entry.amount_minor, entry.currency)
        return self.render(
            request,
            "usage.html",
            {
                "form": form,
                "usage": usage,
                "usage_pages": usage_pages,
                "page": page,
                **self._charts(usage, since, until),
            },
            status=400 if form.errors else 200,
        )

    def _usage_page(self, request, since, until) -> tuple[list[dict], dict]:
        """One page of usage rows and the positions of the pages beside it: ?usage_after= (or
        ?usage_before=) holds the day and reservation of the row the page follows (precedes)."""
        backwards = "usage_before" in request.GET
        at = _usage_position(request.GET.get("usage_before" if backwards else "usage_after"))
        backwards = backwards and at is not None
        size = self.USAGE_PAGE_SIZE
        rows = usage_page(
            organization=self.organization,
            since=since,
            until=until,
            after=at,
            backwards=backwards,
            limit=size + 1,
        )
        more = len(rows) > size
        rows = rows[:size][:: -1 if backwards else 1]
        has_older = more if not backwards else at is not None
        has_newer = at is not None if not backwards else more
        return rows, {
            "older": _usage_key(rows[-1]) if has_older and rows else None,
            "newer": _usage_key(rows[0]) if has_newer and rows else None,
        }

    CHART_DAYS = 30

    def _charts(self, usage: list[dict], since, until) -> dict:
        """Spend per day by GPU model and the balance at each day's end over the period (the
        last 30 days by default), GPU-hours per reservation from the usage rows; each chart
        has its table on the page."""
        until = until or timezone.now().date() + timedelta(days=1)
        since = since or until - timedelta(days=self.CHART_DAYS)
        currency = billing_account_get_or_create(organization=self.organization).currency
        days = [since + timedelta(days=n) for n in range((until - since).days)]
        spend = spend_by_day_and_model(organization=self.organization, since=since, until=until)
        models = sorted({row["gpu_model"] for row in spend})
        by_model = {m: dict.fromkeys(days, 0) for m in models}
        for row in spend:
            by_model[row["gpu_model"]][row["day"]] += row["amount_minor"]
        balances = balance_by_day(organization=self.organization, since=since, until=until)
        per_reservation: dict[str, Decimal] = {}
        for row in usage:
            key = row["reservation__public_id"] or "—"
            per_reservation[key] = per_reservation.get(key, Decimal(0)) + row["gpu_hours"]
        top = sorted(per_reservation.items(), key=lambda kv: kv[1], reverse=True)[:20]
        to_major = lambda minor: float(from_minor_units(minor, currency))  # noqa: E731
        return {
            # The first and the last day shown, both included (`until` is the day after).
            "chart_period": (since, until - timedelta(days=1)),
            "spend_rows": [
                (m, [from_minor_units(by_model[m][d], currency) for d in days]) for m in models
            ],
            "spend_total": from_minor_units(sum(r["amount_minor"] for r in spend), currency),
            "chart_days": days,
            "balances": [(d, from_minor_units(b, currency)) for d, b in balances],
            "reservation_hours": top,
            "chart_currency": currency.upper(),
            "charts": {
                "spend": {
                    "type": "bar",
                    "stacked": True,
                    "labels": [d.isoformat() for d in days],
                    "datasets": [
                        {"label": m, "data": [to_major(by_model[m][d]) for d in days]}
                        for m in models
                    ],
                },
                "balance": {
                    "type": "line",
                    "labels": [d.isoformat() for d, _ in balances],
                    "datasets": [
                        {
                            "label": f"Balance ({currency.upper()})",
                            "data": [to_major(b) for _, b in balances],
                        }
                    ],
                },
                "reservations": {
                    "type": "bar",
                    "labels": [r for r, _ in top],
                    "datasets": [{"label": "GPU-hours", "data": [float(h) for _, h in top]}],
                },
            },  # fmt: skip
        }


def _usage_key(row: dict) -> str:
    return f"{row['day'].isoformat()} {row['reservation__public_id'] or ''}"


def _usage_position(value: str | None) -> tuple[date, str] | None:
    """A usage page's position from its address; a malformed one is the first page."""
    day, _, reservation = (value or "").partition(" ")
    try:
        return date.fromisoformat(day), reservation
    except ValueError:
        return None


class InvoicesView(BillingPage):
    def get(self, request):
        invoices = list(invoices_for_org(organization=self.organization))
        for invoice in invoices:
            invoice.amount_due_display = money(invoice.amount_due_minor, invoice.currency)
            invoice.amount_paid_display = money(invoice.amount_paid_minor, invoice.currency)
            invoice.owed_display = money(
                invoice.amount_due_minor - invoice.amount_paid_minor, invoice.currency
            )
        # The one that blocks bookings (after the grace): the first to become past due.
        past_due = min(
            (i for i in invoices if i.past_due), key=lambda i: i.payment_failed_at, default=None
        )
        refused_from = past_due.bookings_refused_from if past_due else None
        return self.render(
            request,
            "invoices.html",
            {
                "invoices": invoices,
                "past_due": past_due,
                "refused_from": refused_from,
                "refused_now": refused_from is not None and refused_from <= timezone.now(),
            },
        )


def overview_panel(membership) -> dict:
    """The portal overview's Billing panel: balance, funding state and the latest notices."""
    organization = membership.organization
    account = billing_account_for_org(organization=organization)
    currency = account_currency(account)
    state = account.funding_state if account else FundingState.OK
    position = money_position(organization_id=organization.pk)
    label, meaning = funding_words(account, position.available)
    return {
        "balance": money(position.balance, currency),
        "accrued": money(position.accrued, currency),
        "held": money(position.held, currency),
        "available": money(position.available, currency),
        "postpaid": bool(account) and account.mode == BillingMode.POSTPAID,
        "state": state,
        "label": label,
        "meaning": meaning,
        "funded": label == FUNDING_LABEL[FundingState.OK],
        "grace_until": account.grace_until if account else None,
        "notices": list(notices_for_org(organization=organization)[:3]),
    }


# --- monthly statements: the ledger of a month, printable and as CSV -----------------------

STATEMENT_KIND_LABELS = {
    "top_up": "Top-ups",
    "usage": "Usage",
    "reserved_charge": "Reserved terms",
    "credit": "Credits",
    "term_refund": "Reserved-term refunds (time not delivered)",
    "sla_credit": "SLA credits",
    "refund": "Refunds to your card",
    "adjustment": "Adjustments",
    "resale_proceeds": "Resold time (what buyers were charged)",
    "resale_fee": "Resale fees",
}


def _statement(view, year: int, month: int):
    first_day = statement_month(year, month)
    if first_day is None:
        raise Http404("No statement for that month.")
    account = billing_account_for_org(organization=view.organization)
    currency = account_currency(account)
    return statement_for_month(organization=view.organization, month=first_day, currency=currency)


class StatementsView(BillingPage):
    """Every month with a statement, newest first."""

    def get(self, request):
        months = statement_months(organization=self.organization)
        return self.render(request, "statements.html", {"months": months})


class StatementView(BillingPage):
    """One month's statement as a page to read or print (ledger, usage, credits)."""

    def get(self, request, year: int, month: int):
        statement = _statement(self, year, month)
        c = statement.currency
        lines = [
            {
                "entry": line.entry,
                "amount": money(line.entry.amount_minor, c),
                "balance": money(line.balance_after_minor, c),
            }
            for line in statement.lines
        ]
        totals = [
            (STATEMENT_KIND_LABELS.get(kind, kind), money(amount, c))
            for kind, amount in sorted(statement.totals_minor.items())
        ]
        usage = [
            {
                **row,
                "gpu_hours": (Decimal(row["gpu_seconds"]) / 3600).quantize(
                    Decimal("0.01"), rounding=ROUND_HALF_UP
                ),
                "amount": money(row["amount_minor"], c),
            }
            for row in statement.usage
        ]
        return render(
            request,
            "portal/billing/statement.html",
            {
                "organization": self.organization,
                "statement": statement,
                "opening": money(statement.opening_minor, c),
                "closing": money(statement.closing_minor, c),
                "lines": lines,
                "totals": totals,
                "usage": usage,
            },
        )


class StatementCsvView(BillingPage):
    """One month's statement as CSV, streamed (billing.exports.statement_csv_lines)."""

    def get(self, request, year: int, month: int):
        first_day = statement_month(year, month)
        if first_day is None:
            raise Http404("No statement for that month.")
        currency = account_currency(billing_account_for_org(organization=self.organization))
        lines = statement_csv_lines(
            organization=self.organization, month=first_day, currency=currency
        )
        name = f"switchyard-statement-{self.organization.public_id}-{year:04d}-{month:02d}.csv"
        response = StreamingHttpResponse(lines, content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response
