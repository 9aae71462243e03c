"""Billing under /api/v1/billing/: balance, ledger, usage, invoices, payment methods, top-ups.

Same base view as the marketplace API (auth, organisation from the key or membership, roles,
Idempotency-Key on POST). Reading is open to every member; money actions need an owner,
admin or billing member. Amounts are strings in major units with the currency beside them.
"""

from datetime import date
from functools import partial

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.pagination import Cursor
from rest_framework.response import Response

from billing.models import LedgerKind
from billing.selectors import (
    account_currency,
    billing_account_for_org,
    invoices_for_org,
    ledger_for_org,
    payment_methods_for_org,
    statement_for_month,
    statement_month,
    top_ups_for_org,
    usage_page,
    usage_row_energy,
)
from billing.serializers import (
    BalanceOutput,
    InvoiceOutput,
    MoneyField,
    TopUpOutput,
    balance_data,
    money_text,
)
from billing.services.accounts import billing_settings_update
from billing.services.payment_methods import (
    payment_method_attach,
    payment_method_detach,
    payment_method_set_default,
    setup_intent_create,
)
from billing.services.topups import top_up_create
from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import IDEMPOTENCY_KEY_PARAMETER, errors
from config.api.serializers import Serializer
from config.api.views import ApiView, validated_input
from config.errors import NotFound
from config.replica import replica_reads
from marketplace.models import Role

TAGS = ["Billing"]
MONEY_ROLES = frozenset({Role.OWNER, Role.ADMIN, Role.BILLING})


class BalanceApi(ApiView):
    @extend_schema(tags=TAGS, operation_id="billing_balance", summary="Balance and funding state",
                   responses={200: BalanceOutput, **errors(403)})  # fmt: skip
    def get(self, request):
        return self.get_response_for(self.organization)

    @staticmethod
    def get_response_for(org) -> Response:
        return Response(BalanceOutput(balance_data(org)).data)


class BillingSettingsInput(Serializer):
    currency = serializers.CharField(
        required=False,
        help_text="The currency to be billed in (lower case), one of the balance's "
        "`currency_choices`, while `currency_changeable` (409 currency_locked once money has "
        "moved; 400 currency_not_sold for one nothing is sold in). The amounts sent with it, "
        "and the recharge settings kept, are in it.",
    )
    auto_recharge_enabled = serializers.BooleanField(required=False)
    # Limits of the account's currency (balance's top_up_min and top_up_max; 400
    # amount_out_of_range outside them); 12 digits hold the largest in any currency.
    recharge_threshold = serializers.DecimalField(
        max_digits=12, decimal_places=2, required=False, help_text="0 to top_up_max."
    )
    recharge_amount = serializers.DecimalField(
        max_digits=12, decimal_places=2, required=False, help_text="top_up_min to top_up_max."
    )
    monthly_spend_limit = serializers.DecimalField(
        max_digits=12, decimal_places=2, required=False, allow_null=True,
        help_text="null removes the limit.",
    )  # fmt: skip


class BillingSettingsApi(ApiView):
    write_roles = MONEY_ROLES
    moves_money = True

    @extend_schema(tags=TAGS, operation_id="billing_settings_update", request=BillingSettingsInput,
                   summary="Billing currency, automatic recharge and the monthly spend limit",
                   responses={200: BalanceOutput, **errors(400, 403, 409)})  # fmt: skip
    def patch(self, request):
        data = validated_input(BillingSettingsInput, request.data)
        billing_settings_update(organization=self.organization, **data)
        return BalanceApi().get_response_for(self.organization)


class LedgerEntryOutput(Serializer):
    id = serializers.CharField(source="public_id", help_text="led_…")
    kind = serializers.ChoiceField(choices=LedgerKind.choices)
    amount = MoneyField(source="amount_minor")
    currency = serializers.CharField()
    reservation = serializers.CharField(
        source="reservation.public_id", allow_null=True, default=None
    )
    period_start = serializers.DateTimeField(allow_null=True)
    period_end = serializers.DateTimeField(allow_null=True)
    gpu_seconds = serializers.IntegerField()
    description = serializers.CharField()
    created_at = serializers.DateTimeField()


class LedgerListApi(ApiView):
    pagination_class = NewestFirstCursorPagination

    @replica_reads
    @extend_schema(tags=TAGS, operation_id="billing_ledger", summary="Ledger entries, newest first",
                   responses={200: LedgerEntryOutput(many=True), **errors(400, 403)})  # fmt: skip
    def get(self, request):
        return self.paginated_response(
            ledger_for_org(organization=self.organization), LedgerEntryOutput
        )


class UsageInput(Serializer):
    since = serializers.DateField(required=False, help_text="First UTC day (inclusive).")
    until = serializers.DateField(required=False, help_text="Last UTC day (exclusive).")

    def validate(self, attrs):
        # An empty period is a mistake to say, not an empty answer to give.
        if attrs.get("since") and attrs.get("until") and attrs["until"] <= attrs["since"]:
            raise serializers.ValidationError(
                {"until": "until (exclusive) must be after since."}, code="period_invalid"
            )
        return attrs


class UsageOutput(Serializer):
    reservation = serializers.CharField(source="reservation__public_id")
    day = serializers.DateField()
    gpu_seconds = serializers.IntegerField()
    amount = serializers.SerializerMethodField()
    currency = serializers.CharField()
    kwh = serializers.SerializerMethodField(
        help_text="Estimated energy of these GPU-seconds (marketplace.services.energy)."
    )
    kg_co2e = serializers.SerializerMethodField(
        help_text="Estimated emissions (market-based); null when the site's grid intensity is "
        "unknown."
    )

    def get_amount(self, row) -> str:
        return money_text(-row["amount_minor"], row["currency"])

    def get_kwh(self, row) -> str | None:
        energy = usage_row_energy(row)
        return None if energy is None else str(energy.kwh)

    def get_kg_co2e(self, row) -> str | None:
        energy = usage_row_energy(row)
        return None if energy is None or energy.kg_co2e is None else str(energy.kg_co2e)


class UsageCursorPagination(NewestFirstCursorPagination):
    """The API's cursor pages (?limit=, next and previous links) over usage rows, which are
    sums by reservation and day rather than records: a cursor holds the day and reservation
    of the row it follows (a keyset), so a page costs the same however deep it is and usage
    booked between pages moves no row to another page."""

    def paginate_usage(self, fetch, request) -> list[dict]:
        """One page of fetch(after=, backwards=, limit=) (billing.selectors.usage_page)."""
        self.request, self.base_url = request, request.build_absolute_uri()
        self.page_size = self.get_page_size(request)
        self.cursor = self.decode_cursor(request)
        backwards = bool(self.cursor and self.cursor.reverse)
        after = _usage_position(self.cursor.position) if self.cursor else None
        rows = fetch(after=after, backwards=backwards, limit=self.page_size + 1)
        more = len(rows) > self.page_size
        self.page = rows[: self.page_size][:: -1 if backwards else 1]
        # Forwards, the rows after this page are there if more came; backwards, those before.
        self.has_next = more if not backwards else after is not None
        self.has_previous = after is not None if not backwards else more
        self.after = after
        return self.page

    def get_next_link(self):
        if not self.has_next:
            return None
        at = _usage_key(self.page[-1]) if self.page else self.after
        return self.encode_cursor(Cursor(offset=0, reverse=False, position=at))

    def get_previous_link(self):
        if not self.has_previous:
            return None
        at = _usage_key(self.page[0]) if self.page else self.after
        return self.encode_cursor(Cursor(offset=0, reverse=True, position=at))


def _usage_key(row: dict) -> str:
    return f"{row['day'].isoformat()} {row['reservation__public_id'] or ''}"


def _usage_position(position: str | None) -> tuple[date, str] | None:
    if position is None:
        return None
    day, _, reservation = position.partition(" ")
    try:
        return date.fromisoformat(day), reservation
    except ValueError:
        raise serializers.ValidationError(
            {"cursor": "Invalid cursor; use the next or previous link as given."},
            code="invalid_cursor",
        ) from None


class UsageApi(ApiView):
    query_serializer = UsageInput
    pagination_class = UsageCursorPagination

    @replica_reads
    @extend_schema(
        tags=TAGS,
        operation_id="billing_usage",
        summary="Usage by reservation and UTC day (charged amounts, positive), newest first",
        description="A cursor page at a time, as every list (?limit=, the next and previous "
        "links); usage.csv streams the whole period at once.",
        responses={200: UsageOutput(many=True), **errors(400, 403)},
    )
    def get(self, request):
        data = self.query_input()
        page = self.paginator.paginate_usage(
            partial(
                usage_page,
                organization=self.organization,
                since=data.get("since"),
                until=data.get("until"),
            ),
            request,
        )
        return self.get_paginated_response(UsageOutput(page, many=True).data)


class StatementLineOutput(Serializer):
    created_at = serializers.DateTimeField(source="entry.created_at")
    kind = serializers.ChoiceField(source="entry.kind", choices=LedgerKind.choices)
    description = serializers.CharField(source="entry.description")
    reservation = serializers.CharField(
        source="entry.reservation.public_id", allow_null=True, default=None
    )
    gpu_seconds = serializers.IntegerField(source="entry.gpu_seconds")
    amount = serializers.SerializerMethodField()
    balance_after = serializers.SerializerMethodField()

    def get_amount(self, line) -> str:
        return money_text(line.entry.amount_minor, line.entry.currency)

    def get_balance_after(self, line) -> str:
        return money_text(line.balance_after_minor, line.entry.currency)


class StatementUsageOutput(Serializer):
    reservation = serializers.CharField()
    gpu_seconds = serializers.IntegerField()
    amount = serializers.CharField(help_text="Charged (positive).")


class StatementOutput(Serializer):
    month = serializers.CharField(help_text="YYYY-MM (UTC).")
    currency = serializers.CharField()
    opening_balance = serializers.CharField()
    closing_balance = serializers.CharField()
    totals = serializers.DictField(
        child=serializers.CharField(), help_text="By ledger kind, signed as in the ledger."
    )
    usage = StatementUsageOutput(many=True, help_text="Charges by reservation.")
    lines = StatementLineOutput(many=True, help_text="Every ledger line, oldest first.")


class StatementApi(ApiView):
    @extend_schema(tags=TAGS, operation_id="billing_statement",
                   summary="A month's statement (UTC): opening and closing balance, totals, usage "
                   "by reservation and every ledger line",
                   responses={200: StatementOutput, **errors(403, 404)})  # fmt: skip
    def get(self, request, year: int, month: int):
        first_day = statement_month(year, month)
        if first_day is None:
            raise NotFound("No statement for that month.", field="month")
        # A read writes nothing: without an account yet, the statement is in the default currency.
        account = billing_account_for_org(organization=self.organization)
        c = account_currency(account)
        statement = statement_for_month(organization=self.organization, month=first_day, currency=c)
        data = {
            "month": f"{year:04d}-{month:02d}",
            "currency": c,
            "opening_balance": money_text(statement.opening_minor, c),
            "closing_balance": money_text(statement.closing_minor, c),
            "totals": {k: money_text(v, c) for k, v in sorted(statement.totals_minor.items())},
            "usage": [
                {
                    "reservation": row["reservation"],
                    "gpu_seconds": row["gpu_seconds"],
                    "amount": money_text(row["amount_minor"], c),
                }
                for row in statement.usage
            ],
            "lines": statement.lines,
        }
        return Response(StatementOutput(data).data)


class InvoiceListApi(ApiView):
    @extend_schema(tags=TAGS, operation_id="billing_invoices", summary="Invoices (postpaid)",
                   responses={200: InvoiceOutput(many=True), **errors(403)})  # fmt: skip
    def get(self, request):
        return Response(
            InvoiceOutput(invoices_for_org(organization=self.organization), many=True).data
        )


class PaymentMethodOutput(Serializer):
    id = serializers.CharField(source="stripe_payment_method_id")
    brand = serializers.CharField()
    last4 = serializers.CharField()
    exp_month = serializers.IntegerField(allow_null=True)
    exp_year = serializers.IntegerField(allow_null=True)
    is_default = serializers.BooleanField()


class PaymentMethodAttachInput(Serializer):
    payment_method = serializers.RegexField(
        r"^pm_[A-Za-z0-9_]+$", max_length=64, help_text="pm_… confirmed with Stripe.js."
    )
    setup_intent = serializers.RegexField(
        r"^seti_[A-Za-z0-9_]+$",
        max_length=64,
        required=False,
        default="",
        help_text="The seti_… from this organisation's setup-intent that confirmed the card. "
        "Needed unless Stripe already attached the card to this organisation's customer; a "
        "card set up by anyone else is refused (404 no_such_payment_method).",
    )


class PaymentMethodListApi(ApiView):
    write_roles = MONEY_ROLES
    moves_money = True
    calls_stripe = True

    @extend_schema(tags=TAGS, operation_id="billing_payment_method_attach",
                   summary="Save a card confirmed with Stripe.js (the first becomes the default)",
                   request=PaymentMethodAttachInput,
                   responses={201: PaymentMethodOutput, **errors(400, 402, 403, 404, 503)})  # fmt: skip
    def post(self, request):
        data = validated_input(PaymentMethodAttachInput, request.data)
        pm = payment_method_attach(
            organization=self.organization,
            payment_method_id=data["payment_method"],
            setup_intent_id=data["setup_intent"],
        )
        account = billing_account_for_org(organization=self.organization)
        pm.is_default = account.default_payment_method_id == pm.stripe_payment_method_id
        return Response(PaymentMethodOutput(pm).data, status=status.HTTP_201_CREATED)

    @extend_schema(tags=TAGS, operation_id="billing_payment_methods",
                   summary="Saved cards", responses={200: PaymentMethodOutput(many=True), **errors(403)})  # fmt: skip
    def get(self, request):
        account = billing_account_for_org(organization=self.organization)
        default = account.default_payment_method_id if account else ""
        methods = payment_methods_for_org(organization=self.organization)
        for pm in methods:
            pm.is_default = pm.stripe_payment_method_id == default
        return Response(PaymentMethodOutput(methods, many=True).data)


class SetupIntentOutput(Serializer):
    setup_intent_id = serializers.CharField()
    client_secret = serializers.CharField(
        allow_null=True,
        help_text="For Stripe.js confirmCardSetup. Null in an idempotent replay: secrets are "
        "never stored for replays (start another SetupIntent).",
    )
    publishable_key = serializers.CharField()
    stripe_js_url = serializers.CharField()


class SetupIntentApi(ApiView):
    write_roles = MONEY_ROLES
    moves_money = True
    calls_stripe = True
    # The SetupIntent's client_secret confirms a card for the organisation: never stored for
    # an idempotent replay (which answers it as null).
    idempotency_redacted_fields = ("client_secret",)

    @extend_schema(tags=TAGS, operation_id="billing_setup_intent_create", request=None,
                   summary="Start saving a card (confirm it with Stripe.js confirmCardSetup)",
                   responses={201: SetupIntentOutput, **errors(403, 503)})  # fmt: skip
    def post(self, request):
        result = setup_intent_create(organization=self.organization)
        return Response(SetupIntentOutput(result).data, status=status.HTTP_201_CREATED)


class PaymentMethodDefaultApi(ApiView):
    write_roles = MONEY_ROLES
    moves_money = True
    calls_stripe = True

    @extend_schema(tags=TAGS, operation_id="billing_payment_method_set_default", request=None,
                   summary="Make a saved card the default", responses={204: None, **errors(403, 404, 503)})  # fmt: skip
    def post(self, request, payment_method_id: str):
        payment_method_set_default(
            organization=self.organization, payment_method_id=payment_method_id
        )
        return Response(status=status.HTTP_204_NO_CONTENT)


class PaymentMethodDetailApi(ApiView):
    write_roles = MONEY_ROLES
    moves_money = True

    @extend_schema(tags=TAGS, operation_id="billing_payment_method_detach",
                   summary="Remove a saved card", responses={204: None, **errors(403, 404, 503)})  # fmt: skip
    def delete(self, request, payment_method_id: str):
        payment_method_detach(organization=self.organization, payment_method_id=payment_method_id)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TopUpInput(Serializer):
    amount = serializers.DecimalField(
        max_digits=12,
        decimal_places=2,
        help_text='e.g. "50.00", in the account\'s currency, from its top_up_min to its top_up_max '
        "(GET billing/balance); else 400 amount_out_of_range.",
    )


class TopUpListApi(ApiView):
    write_roles = MONEY_ROLES
    moves_money = True
    pagination_class = NewestFirstCursorPagination

    @extend_schema(tags=TAGS, operation_id="billing_top_ups", summary="Top-ups, newest first",
                   responses={200: TopUpOutput(many=True), **errors(403)})  # fmt: skip
    def get(self, request):
        return self.paginated_response(top_ups_for_org(organization=self.organization), TopUpOutput)

    @extend_schema(
        tags=TAGS,
        operation_id="billing_top_up_create",
        summary="Charge the default card and add to the balance (settles asynchronously)",
        parameters=[IDEMPOTENCY_KEY_PARAMETER],
        request=TopUpInput,
        responses={202: TopUpOutput, **errors(400, 402, 403)},
    )
    def post(self, request):
        data = validated_input(TopUpInput, request.data)
        top_up = top_up_create(organization=self.organization, amount=data["amount"])
        return Response(TopUpOutput(top_up).data, status=status.HTTP_202_ACCEPTED)
