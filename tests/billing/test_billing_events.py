"""Billing's events: payments and top-ups, the balance running low and out, invoices."""

import json
from datetime import timedelta
from decimal import Decimal

import pytest

from billing.models import BillingAccount, FundingState, LedgerKind, WebhookEvent
from billing.services.ledger import ledger_entry_add
from billing.services.metering import usage_meter_run
from billing.services.topups import top_up_create
from billing.tasks import webhook_process
from marketplace.models import Event
from tests.billing.conftest import T0, make_reservation, save_card
from tests.billing.test_webhooks import SECRET, URL, sign

pytestmark = pytest.mark.django_db


def _events(org):
    return list(Event.objects.filter(organization=org).order_by("created_at", "id"))


@pytest.mark.stripe
def test_a_paid_top_up_records_the_payment_and_the_top_up(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)
    with django_capture_on_commit_callbacks(execute=True):
        top_up = top_up_create(organization=org, amount=Decimal("60.00"))

    events = [e for e in _events(org) if e.object_type == "top_up"]
    assert [e.type for e in events] == ["payment.succeeded", "top_up.succeeded"]
    # The platform's sequence is not shown: the same opaque id in the event and its object.
    assert top_up.public_id.startswith("tu_")
    assert {e.object_id for e in events} == {top_up.public_id}
    assert events[1].data == {
        **events[1].data,
        "id": top_up.public_id,
        "amount": "60.00",
        "currency": "usd",
        "status": "succeeded",
        "automatic": False,
    }


@pytest.mark.stripe
def test_a_declined_top_up_records_a_failed_payment_only(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org, card="pm_card_chargeCustomerFail")
    with django_capture_on_commit_callbacks(execute=True):
        top_up_create(organization=org, amount=Decimal("25.00"))

    (event,) = [e for e in _events(org) if e.object_type == "top_up"]
    assert event.type == "payment.failed"
    assert event.data["status"] == "failed" and "declined" in event.data["failure_reason"]


def test_the_balance_running_low_and_out_are_events(org, settings):
    settings.BILLING_LOW_BALANCE_GRACE = timedelta(minutes=30)
    BillingAccount.objects.filter(organization=org).update(recharge_threshold_minor=1000)
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=1500, currency="usd",
                     idempotency_key="c1")  # fmt: skip
    make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0, hours=24,
                     starts_at=T0)  # fmt: skip

    usage_meter_run(now=T0 + timedelta(minutes=150))  # 6.00 left: below the 10.00 threshold
    usage_meter_run(now=T0 + timedelta(minutes=250))  # 0.00: grace
    usage_meter_run(now=T0 + timedelta(minutes=280))  # grace over: suspended

    funding = [e for e in _events(org) if e.object_type == "balance"]
    # 150 minutes accrued, two hours of it booked: 15.00 − 7.20 in the ledger, 1.80 accrued.
    low, suspended = funding
    assert (low.type, low.data["funding_state"]) == ("balance.low", FundingState.WARNING)
    assert (low.data["balance"], low.data["accrued"], low.data["available"]) == (
        "7.80",
        "1.80",
        "6.00",
    )
    assert (suspended.type, suspended.data["funding_state"]) == (
        "funding.suspended", FundingState.SUSPENDED,
    )  # fmt: skip
    # The release booked its usage up to the moment it happened: nothing left accrued.
    assert suspended.data["accrued"] == "0.00"
    assert suspended.data["balance"] == suspended.data["available"]
    assert {e.object_id for e in funding} == {org.public_id}


def test_an_invoice_finalized_and_paid_are_events_once_each(client, settings, org):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    BillingAccount.objects.filter(organization=org).update(stripe_customer_id="cus_inv")

    def deliver(event_id, event_type, status, paid):
        invoice = {"id": "in_123", "object": "invoice", "customer": "cus_inv", "status": status,
                   "currency": "usd", "amount_due": 4321, "amount_paid": paid,
                   "hosted_invoice_url": "", "period_start": 1793491200,
                   "period_end": 1796083200}  # fmt: skip
        payload = json.dumps({"id": event_id, "object": "event", "type": event_type,
                              "data": {"object": invoice}}).encode()  # fmt: skip
        client.post(
            URL, payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(payload)
        )
        webhook_process(WebhookEvent.objects.get(stripe_event_id=event_id).pk)

    deliver("evt_created", "invoice.created", "draft", 0)
    deliver("evt_fin", "invoice.finalized", "open", 0)
    deliver("evt_paid", "invoice.paid", "paid", 4321)
    deliver("evt_paid_again", "invoice.payment_succeeded", "paid", 4321)

    events = _events(org)
    assert [(e.type, e.object_id) for e in events] == [
        ("invoice.finalized", "in_123"),
        ("invoice.paid", "in_123"),
    ]
    assert (events[1].data["status"], events[1].data["amount_paid"]) == ("paid", "43.21")
