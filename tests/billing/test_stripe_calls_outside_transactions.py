"""No Stripe call while a database transaction is open or a row is locked.

A Stripe call can take seconds (or time out after many); a transaction held open across it
keeps its row locks and a pooled connection that long. The outbox sender and the webhook
processor claim, call Stripe with no transaction open, then record; the synchronous card
calls (setting the default card) call Stripe first, then record. Checked against a real
localstripe, with every gateway call watched: is a transaction open, and can another
connection lock the row right now?
"""

import threading
from decimal import Decimal

import pytest
from django.db import connection, transaction

from billing.models import BillingAccount, OutboxMessage, OutboxStatus, WebhookEvent
from billing.services.outbox import outbox_send
from billing.services.payment_methods import payment_method_set_default
from billing.services.topups import top_up_create
from billing.services.webhooks import webhook_event_process
from billing.stripe_gateway import get_gateway
from tests.billing.conftest import save_card, stripe_client

pytestmark = [pytest.mark.stripe, pytest.mark.django_db(transaction=True)]


def _lockable(table: str, pk: int) -> bool:
    """Whether another connection can lock the row at once (FOR UPDATE NOWAIT)."""
    result = []

    def run():
        try:
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(f"SELECT 1 FROM {table} WHERE id = %s FOR UPDATE NOWAIT", [pk])
            result.append(True)
        except Exception:  # noqa: BLE001 — LockNotAvailable: the row is locked
            result.append(False)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


class WatchedGateway:
    """The real gateway; each call notes whether a transaction is open and the row is free."""

    def __init__(self, table: str, pk: int):
        self.inner, self.table, self.pk, self.calls = get_gateway(), table, pk, []

    def __getattr__(self, name):
        method = getattr(self.inner, name)

        def call(*args, **kwargs):
            self.calls.append((name, connection.in_atomic_block, _lockable(self.table, self.pk)))
            return method(*args, **kwargs)

        return call


@pytest.fixture
def funded_org(localstripe, org):
    save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    return org


def test_the_outbox_calls_stripe_with_no_transaction_open_and_the_row_unlocked(funded_org):
    top_up_create(organization=funded_org, amount=Decimal("40.00"))
    message = OutboxMessage.objects.get()
    gateway = WatchedGateway("billing_outboxmessage", message.pk)

    assert outbox_send(message_id=message.pk, gateway=gateway) == OutboxStatus.SENT

    assert gateway.calls == [("payment_intent_create_off_session", False, True)]
    message.refresh_from_db()
    assert (message.status, message.attempts) == (OutboxStatus.SENT, 1)


def test_a_claimed_message_is_not_sent_by_a_second_sender(funded_org):
    top_up_create(organization=funded_org, amount=Decimal("40.00"))
    message = OutboxMessage.objects.get()
    seen = []

    class SecondSenderArrives(WatchedGateway):
        def __getattr__(self, name):
            method = super().__getattr__(name)

            def call(*args, **kwargs):
                # While the first sender waits for Stripe, another delivery of the task runs.
                seen.append(outbox_send(message_id=message.pk, gateway=get_gateway()))
                return method(*args, **kwargs)

            return call

    gateway = SecondSenderArrives("billing_outboxmessage", message.pk)
    assert outbox_send(message_id=message.pk, gateway=gateway) == OutboxStatus.SENT
    assert seen == [""]  # busy: it neither sent nor counted an attempt
    message.refresh_from_db()
    assert message.attempts == 1


def test_the_webhook_processor_reads_stripe_before_it_locks_the_event(
    localstripe, funded_org, monkeypatch
):
    account = BillingAccount.objects.get(organization=funded_org)
    client = stripe_client(localstripe)
    intent = client.v1.setup_intents.create({"customer": account.stripe_customer_id})
    confirmed = client.v1.setup_intents.confirm(intent.id, {"payment_method": "pm_card_visa"})
    event = WebhookEvent.objects.create(
        stripe_event_id="evt_watched",
        type="setup_intent.succeeded",
        payload={"data": {"object": {"id": confirmed.id, "customer": account.stripe_customer_id,
                                     "payment_method": confirmed.payment_method}}},
    )  # fmt: skip
    gateway = WatchedGateway("billing_webhookevent", event.pk)
    monkeypatch.setattr("billing.services.webhooks.get_gateway", lambda: gateway)

    assert webhook_event_process(event_id=event.pk) is True

    assert gateway.calls == [("payment_method_retrieve", False, True)]
    event.refresh_from_db()
    assert event.processed_at is not None and event.error == ""


def test_setting_the_default_card_calls_stripe_with_the_account_unlocked(localstripe, funded_org):
    second = save_card(localstripe, funded_org)  # the fixture's card stays the default
    account = BillingAccount.objects.get(organization=funded_org)
    assert account.default_payment_method_id not in ("", second)
    gateway = WatchedGateway("billing_billingaccount", account.pk)

    payment_method_set_default(organization=funded_org, payment_method_id=second, gateway=gateway)

    assert gateway.calls == [("customer_set_default_payment_method", False, True)]
    account.refresh_from_db()
    assert account.default_payment_method_id == second
    customer = stripe_client(localstripe).v1.customers.retrieve(account.stripe_customer_id)
    assert customer.invoice_settings.default_payment_method == second


def test_a_card_call_through_the_api_with_an_idempotency_key_opens_no_transaction(
    localstripe, funded_org, monkeypatch
):
    """The API stores an Idempotency-Key's response with the action's writes, in one
    transaction; a card call waits on Stripe, so there the response is stored right after."""
    from marketplace.models import IdempotencyRecord, Membership
    from tests.clients import HttpsAPIClient

    second = save_card(localstripe, funded_org)
    account = BillingAccount.objects.get(organization=funded_org)
    gateway = WatchedGateway("billing_billingaccount", account.pk)
    monkeypatch.setattr("billing.services.payment_methods.get_gateway", lambda: gateway)
    client = HttpsAPIClient()
    client.force_authenticate(Membership.objects.get(organization=funded_org).user)
    url = f"/api/v1/billing/payment-methods/{second}/default"

    first = client.post(url, HTTP_IDEMPOTENCY_KEY="default-1")
    replay = client.post(url, HTTP_IDEMPOTENCY_KEY="default-1")

    assert first.status_code == replay.status_code == 204
    assert replay["Idempotent-Replayed"] == "true"
    assert gateway.calls == [("customer_set_default_payment_method", False, True)]
    assert IdempotencyRecord.objects.get(key="default-1").response_status == 204
