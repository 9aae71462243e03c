"""Billing's part of /api/v1/."""

from django.urls import path

from billing import apis, export_views
from billing.webhooks_view import stripe_webhook

urlpatterns = [
    path("webhooks/stripe", stripe_webhook, name="stripe-webhook"),
    path("billing/balance", apis.BalanceApi.as_view(), name="billing-balance"),
    path("billing/settings", apis.BillingSettingsApi.as_view(), name="billing-settings"),
    path("billing/ledger", apis.LedgerListApi.as_view(), name="billing-ledger"),
    path("billing/usage", apis.UsageApi.as_view(), name="billing-usage"),
    path("billing/usage.csv", export_views.UsageCsvApi.as_view(), name="billing-usage-csv"),
    path("billing/ledger.csv", export_views.LedgerCsvApi.as_view(), name="billing-ledger-csv"),
    path("billing/invoices", apis.InvoiceListApi.as_view(), name="billing-invoices"),
    path(
        "billing/statements/<int:year>-<int:month>",
        apis.StatementApi.as_view(),
        name="billing-statement",
    ),
    path(
        "billing/payment-methods",
        apis.PaymentMethodListApi.as_view(),
        name="billing-payment-methods",
    ),
    path(
        "billing/payment-methods/setup-intent",
        apis.SetupIntentApi.as_view(),
        name="billing-setup-intent",
    ),
    path(
        "billing/payment-methods/<str:payment_method_id>/default",
        apis.PaymentMethodDefaultApi.as_view(),
        name="billing-payment-method-default",
    ),
    path(
        "billing/payment-methods/<str:payment_method_id>",
        apis.PaymentMethodDetailApi.as_view(),
        name="billing-payment-method",
    ),
    path("billing/top-ups", apis.TopUpListApi.as_view(), name="billing-top-ups"),
]
