"""The portal's Billing pages, under /billing/ (config.urls)."""

from django.urls import path

from billing import export_views, portal

app_name = "portal-billing"

urlpatterns = [
    path("", portal.OverviewView.as_view(), name="overview"),
    path("payment-methods", portal.PaymentMethodsView.as_view(), name="payment-methods"),
    path("payment-methods/new", portal.PaymentMethodNewView.as_view(), name="payment-method-new"),
    path(
        "payment-methods/<str:payment_method_id>/default",
        portal.PaymentMethodDefaultView.as_view(),
        name="payment-method-default",
    ),
    path(
        "payment-methods/<str:payment_method_id>/remove",
        portal.PaymentMethodRemoveView.as_view(),
        name="payment-method-remove",
    ),
    path("top-ups", portal.TopUpView.as_view(), name="top-up"),
    path("usage", portal.UsageView.as_view(), name="usage"),
    path("usage.csv", export_views.UsageCsvPortalView.as_view(), name="usage-csv"),
    path("ledger.csv", export_views.LedgerCsvPortalView.as_view(), name="ledger-csv"),
    path("invoices", portal.InvoicesView.as_view(), name="invoices"),
    path("statements", portal.StatementsView.as_view(), name="statements"),
    path("statements/<int:year>-<int:month>", portal.StatementView.as_view(), name="statement"),
    path(
        "statements/<int:year>-<int:month>.csv",
        portal.StatementCsvView.as_view(),
        name="statement-csv",
    ),
]
