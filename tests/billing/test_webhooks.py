"""Stripe webhooks: real signed deliveries from localstripe to a live server, bad signatures,
replays. Processing normally runs in a Celery task queued on commit; here the test calls the
task function directly (synchronously) after the delivery has been stored."""

import hashlib
import hmac
import json
import time

import pytest
from django.urls import reverse

from billing.models import BillingAccount, LedgerEntry, TopUp, TopUpStatus, WebhookEvent
from billing.selectors import balance_minor
from billing.services.accounts import billing_account_get_or_create
from billing.tasks import webhook_process
from tests.billing.conftest import save_card, stripe_client
from tests.factories import MembershipFactory

SECRET = "whsec_switchyard_test"
URL = "/api/v1/webhooks/stripe"


def sign(payload: bytes, secret: str = SECRET, at: int | None = None) -> str:
    at = at or int(time.time())
    mac = hmac.new(secret.encode(), b"%d.%s" % (at, payload), hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


def wait_for_event(event_type: str, object_id: str, timeout: float = 15.0) -> WebhookEvent:
    """The delivery about this object (an earlier test's late delivery may arrive too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        event = WebhookEvent.objects.filter(
            type=event_type, payload__data__object__id=object_id
        ).first()
        if event is not None:
            return event
        time.sleep(0.2)
    raise AssertionError(f"no {event_type} delivered within {timeout}s")


@pytest.fixture
def webhooks_to_live_server(localstripe, live_server):
    localstripe.register_webhook(url=live_server.url + URL, secret=SECRET)
    yield
    # Deliveries must not reach the live server from later tests: point them at nothing.
    localstripe.register_webhook(url="http://127.0.0.1:9/", secret=SECRET)


@pytest.mark.stripe
@pytest.mark.django_db(transaction=True)
def test_a_signed_payment_succeeded_delivery_credits_a_top_up_whose_result_was_lost(
    localstripe, webhooks_to_live_server
):
    org = MembershipFactory(user__password="!").organization
    billing_account_get_or_create(organization=org)
    pm_id = save_card(localstripe, org)
    account = BillingAccount.objects.get(organization=org)
    account.auto_recharge_enabled = False
    account.save()
    # The sender charged the card, then crashed before recording the result: only Stripe knows.
    top_up = TopUp.objects.create(
        organization=org, amount_minor=7000, currency="usd", payment_method_id=pm_id
    )
    pi = stripe_client(localstripe).v1.payment_intents.create(
        {
            "amount": 7000,
            "currency": "usd",
            "customer": account.stripe_customer_id,
            "payment_method": pm_id,
            "off_session": True,
            "confirm": True,
            "metadata": {"top_up": str(top_up.pk)},
        }
    )

    event = wait_for_event("payment_intent.succeeded", pi.id)
    assert event.processed_at is None
    assert balance_minor(organization=org) == 0

    assert webhook_process(event.pk) is True
    assert webhook_process(event.pk) is False  # a second run of the task changes nothing

    top_up.refresh_from_db()
    assert (top_up.status, top_up.stripe_payment_intent_id) == (TopUpStatus.SUCCEEDED, pi.id)
    assert balance_minor(organization=org) == 7000
    assert LedgerEntry.objects.filter(organization=org).count() == 1
    event.refresh_from_db()
    assert event.processed_at is not None and event.error == ""


@pytest.mark.django_db
def test_a_bad_signature_gets_400_and_stores_nothing(client, settings):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    payload = json.dumps({"id": "evt_1", "object": "event", "type": "payment_intent.succeeded",
                          "data": {"object": {"id": "pi_1", "object": "payment_intent"}}}).encode()  # fmt: skip

    forged = client.post(URL, payload, content_type="application/json",
                         HTTP_STRIPE_SIGNATURE=sign(payload, secret="whsec_wrong"))  # fmt: skip
    unsigned = client.post(URL, payload, content_type="application/json")
    stale = client.post(URL, payload, content_type="application/json",
                        HTTP_STRIPE_SIGNATURE=sign(payload, at=int(time.time()) - 3600))  # fmt: skip

    assert [forged.status_code, unsigned.status_code, stale.status_code] == [400, 400, 400]
    assert forged.json()["error"]["code"] == "invalid_signature"
    assert not WebhookEvent.objects.exists()


@pytest.mark.django_db
def test_a_replayed_event_is_stored_once_and_processed_once(client, settings, org):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    top_up = TopUp.objects.create(
        organization=org, amount_minor=2500, currency="usd", payment_method_id="pm_x"
    )
    payload = json.dumps(
        {
            "id": "evt_replayed",
            "object": "event",
            "type": "payment_intent.succeeded",
            "created": int(time.time()),
            "data": {
                "object": {
                    "id": "pi_replayed",
                    "object": "payment_intent",
                    "status": "succeeded",
                    "amount": 2500,
                    "amount_received": 2500,
                    "currency": "usd",
                    "metadata": {"top_up": str(top_up.pk)},
                }
            },
        }  # fmt: skip
    ).encode()

    first = client.post(
        URL, payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(payload)
    )
    event = WebhookEvent.objects.get()
    webhook_process(event.pk)
    second = client.post(
        URL, payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(payload)
    )
    webhook_process(event.pk)

    assert (first.status_code, first.json()["duplicate"]) == (200, False)
    assert (second.status_code, second.json()["duplicate"]) == (200, True)
    assert WebhookEvent.objects.count() == 1
    assert balance_minor(organization=org) == 2500
    assert LedgerEntry.objects.filter(organization=org).count() == 1
    assert reverse("stripe-webhook") == URL


@pytest.mark.django_db
def test_invoice_events_are_mirrored_with_their_hosted_link(client, settings, org):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    BillingAccount.objects.filter(organization=org).update(stripe_customer_id="cus_inv")

    def deliver(event_id, event_type, status, paid):
        invoice = {"id": "in_123", "object": "invoice", "customer": "cus_inv", "status": status,
                   "currency": "usd", "amount_due": 4321, "amount_paid": paid,
                   "hosted_invoice_url": "https://invoice.stripe.com/i/acct_1/test_in_123",
                   "period_start": 1793491200, "period_end": 1796083200}  # fmt: skip
        payload = json.dumps({"id": event_id, "object": "event", "type": event_type,
                              "data": {"object": invoice}}).encode()  # fmt: skip
        client.post(
            URL, payload, content_type="application/json", HTTP_STRIPE_SIGNATURE=sign(payload)
        )
        webhook_process(WebhookEvent.objects.get(stripe_event_id=event_id).pk)

    deliver("evt_fin", "invoice.finalized", "open", 0)
    deliver("evt_paid", "invoice.paid", "paid", 4321)

    from billing.models import Invoice

    invoice = Invoice.objects.get()
    assert (invoice.organization, invoice.status, invoice.amount_due_minor, invoice.amount_paid_minor) == (
        org, "paid", 4321, 4321,
    )  # fmt: skip
    assert invoice.hosted_invoice_url == "https://invoice.stripe.com/i/acct_1/test_in_123"
    assert invoice.period_start.isoformat() == "2026-11-01T00:00:00+00:00"

    # Stripe does not promise order: a finalized event arriving after the payment (a retry
    # of an earlier delivery) does not make the paid invoice open again, nor tell the
    # customer it was finalized after it was paid.
    from marketplace.models import Event

    events_before = Event.objects.filter(organization=org).count()
    deliver("evt_fin_late", "invoice.finalized", "open", 0)
    invoice.refresh_from_db()
    assert (invoice.status, invoice.amount_paid_minor) == ("paid", 4321)
    assert Event.objects.filter(organization=org).count() == events_before


def deliver(client, event_id: str, event_type: str, obj: dict) -> WebhookEvent:
    payload = json.dumps({"id": event_id, "object": "event", "type": event_type,
                          "data": {"object": obj}}).encode()  # fmt: skip
    response = client.post(URL, payload, content_type="application/json",
                           HTTP_STRIPE_SIGNATURE=sign(payload))  # fmt: skip
    assert response.status_code == 200
    event = WebhookEvent.objects.get(stripe_event_id=event_id)
    webhook_process(event.pk)
    event.refresh_from_db()
    return event


@pytest.mark.django_db
def test_payment_method_events_keep_the_card_mirror_and_the_default_in_step(client, settings, org):
    from billing.models import PaymentMethod

    settings.STRIPE_WEBHOOK_SECRET = SECRET
    BillingAccount.objects.filter(organization=org).update(stripe_customer_id="cus_pm")
    card = {"id": "pm_evt", "object": "payment_method", "type": "card", "customer": "cus_pm",
            "card": {"brand": "mastercard", "last4": "4444", "exp_month": 3, "exp_year": 2031}}  # fmt: skip

    deliver(client, "evt_att", "payment_method.attached", card)
    pm = PaymentMethod.objects.get()
    assert (pm.organization, pm.brand, pm.last4, pm.exp_year) == (org, "mastercard", "4444", 2031)
    assert BillingAccount.objects.get(organization=org).default_payment_method_id == "pm_evt"

    event = deliver(client, "evt_det", "payment_method.detached", {**card, "customer": None})

    assert event.processed_at is not None
    assert PaymentMethod.objects.get().detached_at is not None
    assert BillingAccount.objects.get(organization=org).default_payment_method_id == ""


@pytest.mark.django_db
def test_a_payment_failed_event_fails_the_pending_top_up_without_crediting(client, settings, org):
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    top_up = TopUp.objects.create(organization=org, amount_minor=5000, currency="usd",
                                  payment_method_id="pm_x")  # fmt: skip

    deliver(client, "evt_fail", "payment_intent.payment_failed",
            {"id": "pi_fail", "object": "payment_intent", "status": "requires_payment_method",
             "amount": 5000, "amount_received": 0, "currency": "usd",
             "metadata": {"top_up": str(top_up.pk)},
             "last_payment_error": {"code": "card_declined", "message": "Your card was declined."}})  # fmt: skip

    top_up.refresh_from_db()
    assert (top_up.status, top_up.failure_reason) == (TopUpStatus.FAILED, "Your card was declined.")
    assert balance_minor(organization=org) == 0
    assert not LedgerEntry.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"amount": 1, "amount_received": 1}, "amount"),
        ({"currency": "eur"}, "currency"),
        ({"customer": "cus_someone_else"}, "customer"),
        ({"id": "pi_second"}, "payment intent"),
    ],
)
def test_a_payment_that_only_names_a_top_up_in_its_metadata_credits_nothing(
    client, settings, org, change, why, caplog
):
    """Metadata names a top-up, but the payment is not the one it asked for (another amount,
    currency or customer, or a second PaymentIntent): neither credited nor failed."""
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    BillingAccount.objects.filter(organization=org).update(stripe_customer_id="cus_ours")
    top_up = TopUp.objects.create(
        organization=org,
        amount_minor=2500,
        currency="usd",
        payment_method_id="pm_x",
        stripe_payment_intent_id="pi_ours",
    )
    pi = {"id": "pi_ours", "object": "payment_intent", "status": "succeeded", "amount": 2500,
          "amount_received": 2500, "currency": "usd", "customer": "cus_ours",
          "metadata": {"top_up": str(top_up.pk)}}  # fmt: skip

    deliver(client, "evt_wrong_ok", "payment_intent.succeeded", {**pi, **change})
    deliver(client, "evt_wrong_failed", "payment_intent.payment_failed", {**pi, **change,
            "status": "requires_payment_method", "last_payment_error": {"message": "no"}})  # fmt: skip

    top_up.refresh_from_db()
    assert top_up.status == TopUpStatus.PENDING
    assert balance_minor(organization=org) == 0
    assert "differ; nothing applied" in caplog.text and why in caplog.text

    deliver(client, "evt_right", "payment_intent.succeeded", pi)  # the real one still credits
    top_up.refresh_from_db()
    assert top_up.status == TopUpStatus.SUCCEEDED
    assert balance_minor(organization=org) == 2500
