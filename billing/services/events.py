"""Billing's events, recorded through the marketplace's event writer in the caller's transaction.

The objects are shown as billing's API shows them (top-ups, the balance, invoices), through the
serializers it shares with the API (billing/serializers.py).
"""

from billing.models import Invoice, TopUp
from billing.serializers import BalanceOutput, InvoiceOutput, TopUpOutput, balance_data
from marketplace.models import EventType, Organization
from marketplace.services.events import event_record

__all__ = ["top_up_events_record", "balance_event_record", "invoice_event_record"]


def top_up_events_record(*, top_up: TopUp, succeeded: bool) -> None:
    """payment.succeeded and top_up.succeeded (the balance was credited), or payment.failed."""
    types = (
        [EventType.PAYMENT_SUCCEEDED, EventType.TOP_UP_SUCCEEDED]
        if succeeded
        else [EventType.PAYMENT_FAILED]
    )
    for type in types:
        event_record(
            organization_id=top_up.organization_id,
            type=type,
            object_type="top_up",
            object_id=top_up.public_id,
            obj=top_up,
            serializer=TopUpOutput,
        )


def balance_event_record(*, organization: Organization, type: str) -> None:
    """balance.low or funding.suspended, with the balance as GET billing/balance shows it."""
    event_record(
        organization_id=organization.pk,
        type=type,
        object_type="balance",
        object_id=organization.public_id,
        obj=balance_data(organization),
        serializer=BalanceOutput,
    )


def invoice_event_record(*, invoice: Invoice, type: str) -> None:
    event_record(
        organization_id=invoice.organization_id,
        type=type,
        object_type="invoice",
        object_id=invoice.stripe_invoice_id,
        obj=invoice,
        serializer=InvoiceOutput,
    )
