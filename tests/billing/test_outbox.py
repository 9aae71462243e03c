"""The outbox survives a Stripe outage and a lost task, and never sends twice."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import BillingAccount, LedgerEntry, OutboxMessage, OutboxStatus, TopUpStatus
from billing.selectors import balance_minor
from billing.services.outbox import outbox_backoff, outbox_send
from billing.services.topups import top_up_create
from billing.tasks import outbox_flush
from tests.billing.conftest import save_card, stripe_client

pytestmark = [pytest.mark.stripe, pytest.mark.django_db]


def test_a_message_written_while_stripe_is_down_stays_pending_and_is_sent_once_when_it_is_back(
    localstripe, org, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    # No eager Celery here: the on_commit hook queues to Redis, where no worker listens, the
    # way a lost task would. The sweeper (outbox_flush) is what must deliver it.
    with django_capture_on_commit_callbacks(execute=True):
        top_up = top_up_create(organization=org, amount=Decimal("80.00"))
    localstripe.stop()
    try:
        assert outbox_flush() == 1
        message = OutboxMessage.objects.get()
        assert (message.status, message.attempts) == (OutboxStatus.PENDING, 1)
        assert message.last_error.startswith("transient:")
        assert message.next_attempt_at > timezone.now() + timedelta(seconds=25)
        top_up.refresh_from_db()
        assert top_up.status == TopUpStatus.PENDING
        assert balance_minor(organization=org) == 0
        # Not due yet: a second sweep leaves it alone.
        assert outbox_flush() == 0
        assert OutboxMessage.objects.get().attempts == 1
    finally:
        localstripe.start()

    OutboxMessage.objects.update(next_attempt_at=timezone.now())
    assert outbox_flush() == 1
    assert outbox_flush() == 0

    message = OutboxMessage.objects.get()
    assert (message.status, message.attempts) == (OutboxStatus.SENT, 2)
    top_up.refresh_from_db()
    assert top_up.status == TopUpStatus.SUCCEEDED
    assert balance_minor(organization=org) == 8000
    assert LedgerEntry.objects.filter(organization=org).count() == 1
    account = BillingAccount.objects.get(organization=org)
    charges = [
        pi
        for pi in stripe_client(localstripe).v1.payment_intents.list({"limit": 100}).data
        if pi.customer == account.stripe_customer_id
    ]
    assert [(pi.id, pi.amount) for pi in charges] == [(top_up.stripe_payment_intent_id, 8000)]


def test_a_sent_message_is_not_sent_again(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    with django_capture_on_commit_callbacks(execute=True):
        top_up_create(organization=org, amount=Decimal("80.00"))
    message = OutboxMessage.objects.get()

    assert outbox_send(message_id=message.pk) == OutboxStatus.SENT

    assert OutboxMessage.objects.get().attempts == 1
    assert balance_minor(organization=org) == 8000


def test_backoff_doubles_and_is_capped_at_an_hour():
    assert [outbox_backoff(n).total_seconds() for n in (1, 2, 3, 8, 30)] == [
        30,
        60,
        120,
        3600,
        3600,
    ]
