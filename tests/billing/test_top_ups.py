"""Top-ups, declines, automatic recharge and refunds against a real localstripe."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import (
    BillingAccount,
    BillingNotice,
    LedgerEntry,
    LedgerKind,
    OutboxMessage,
    OutboxStatus,
    PaymentMethod,
    Refund,
    RefundStatus,
    TopUp,
    TopUpStatus,
)
from billing.selectors import balance_minor
from billing.services.ledger import ledger_entry_add
from billing.services.outbox import outbox_send
from billing.services.refunds import refund_create
from billing.services.topups import auto_recharge_check, top_up_create
from billing.stripe_gateway import get_gateway
from config.errors import PaymentRequired
from marketplace.services.organizations import organization_suspend, organization_unsuspend
from tests.billing.conftest import save_card, stripe_client

pytestmark = [pytest.mark.stripe, pytest.mark.django_db]


def test_it_saves_a_card_through_a_setup_intent_and_makes_it_default(localstripe, org):
    pm_id = save_card(localstripe, org)

    pm = PaymentMethod.objects.get(organization=org)
    assert (pm.stripe_payment_method_id, pm.brand, pm.last4) == (pm_id, "visa", "4242")
    account = BillingAccount.objects.get(organization=org)
    assert account.default_payment_method_id == pm_id
    assert account.stripe_customer_id.startswith("cus_")
    remote = stripe_client(localstripe).v1.payment_methods.retrieve(pm_id)
    assert remote.customer == account.stripe_customer_id


def test_it_returns_what_stripe_js_needs_to_confirm_a_card(localstripe, org):
    from billing.services.payment_methods import setup_intent_create

    result = setup_intent_create(organization=org)

    assert result["client_secret"].startswith(result["setup_intent_id"] + "_secret_")
    assert result["publishable_key"] == "pk_test_switchyard"


def test_a_top_up_charges_the_card_once_and_credits_the_balance(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)

    with django_capture_on_commit_callbacks(execute=True):
        top_up = top_up_create(organization=org, amount=Decimal("60.00"))

    top_up.refresh_from_db()
    assert top_up.status == TopUpStatus.SUCCEEDED
    assert top_up.stripe_payment_intent_id.startswith("pi_")
    assert balance_minor(organization=org) == 6000
    entry = LedgerEntry.objects.get(organization=org)
    assert (entry.kind, entry.amount_minor, entry.idempotency_key) == (
        LedgerKind.TOP_UP,
        6000,
        f"top_up:{top_up.pk}",
    )
    pi = stripe_client(localstripe).v1.payment_intents.retrieve(top_up.stripe_payment_intent_id)
    assert (pi.amount, pi.currency, pi.status, pi.metadata["top_up"]) == (
        6000,
        "usd",
        "succeeded",
        str(top_up.pk),
    )
    message = OutboxMessage.objects.get()
    assert (message.status, message.attempts, message.stripe_object_id) == (
        OutboxStatus.SENT,
        1,
        pi.id,
    )


def test_a_declined_card_fails_the_top_up_and_adds_nothing(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org, card="pm_card_chargeCustomerFail")
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=True)

    with django_capture_on_commit_callbacks(execute=True):
        top_up = top_up_create(organization=org, amount=Decimal("25.00"))

    top_up.refresh_from_db()
    assert top_up.status == TopUpStatus.FAILED
    assert "declined" in top_up.failure_reason
    assert balance_minor(organization=org) == 0
    assert not LedgerEntry.objects.filter(organization=org).exists()
    message = OutboxMessage.objects.get()
    assert message.status == OutboxStatus.FAILED
    assert message.last_error.startswith("card_declined")


def test_a_top_up_queued_before_a_suspension_is_never_sent_and_says_why(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)
    top_up = top_up_create(organization=org, amount=Decimal("60.00"))  # queued, not sent yet
    organization_suspend(organization=org, reason="Card reported stolen.", actor_label="staff:x")
    message = OutboxMessage.objects.get(kind="payment_intent.create")

    assert outbox_send(message_id=message.pk) == OutboxStatus.FAILED

    stripe = stripe_client(localstripe)
    assert stripe.v1.payment_intents.list().data == []  # Stripe was never asked
    top_up.refresh_from_db()
    assert top_up.status == TopUpStatus.FAILED
    assert top_up.failure_reason.startswith("Switchyard staff suspended the organisation before")
    assert top_up.stripe_payment_intent_id == ""
    assert balance_minor(organization=org) == 0
    message.refresh_from_db()
    assert (message.attempts, message.stripe_object_id) == (1, "")
    assert message.last_error.startswith("refused: Switchyard staff suspended")
    notice = BillingNotice.objects.get(organization=org, kind="top_up_failed")
    assert "was not charged for a top-up of 60.00 USD: Switchyard staff suspended" in (
        notice.message
    )

    # Lifted: that one stays failed (never sent later); a new one charges the card.
    organization_unsuspend(organization=org, actor_label="staff:x")
    assert outbox_send(message_id=message.pk) == OutboxStatus.FAILED
    with django_capture_on_commit_callbacks(execute=True):
        again = top_up_create(organization=org, amount=Decimal("60.00"))
    again.refresh_from_db()
    assert again.status == TopUpStatus.SUCCEEDED
    assert [pi.id for pi in stripe.v1.payment_intents.list().data] == [
        again.stripe_payment_intent_id
    ]
    assert balance_minor(organization=org) == 6000


def test_a_retry_after_a_try_that_may_have_reached_stripe_is_sent_despite_a_suspension(
    localstripe, org, eager_celery
):
    """A first try that failed on the network may still have charged the card: refusing the
    retry would record "not charged" beside a charge that went through. It is sent again with
    the same idempotency key, and the top-up records what Stripe answers."""
    save_card(localstripe, org)
    top_up = top_up_create(organization=org, amount=Decimal("60.00"))
    message = OutboxMessage.objects.get(kind="payment_intent.create")
    # The first try's claim was made (and its call, as far as we know, too).
    OutboxMessage.objects.filter(pk=message.pk).update(
        attempts=1, next_attempt_at=timezone.now() - timedelta(seconds=1)
    )
    organization_suspend(organization=org, reason="Card reported stolen.", actor_label="staff:x")

    assert outbox_send(message_id=message.pk) == OutboxStatus.SENT

    top_up.refresh_from_db()
    assert top_up.status == TopUpStatus.SUCCEEDED and top_up.stripe_payment_intent_id
    assert balance_minor(organization=org) == 6000


def test_it_refuses_a_top_up_without_a_card(localstripe, org):
    with pytest.raises(PaymentRequired) as error:
        top_up_create(organization=org, amount=Decimal("25.00"))

    assert error.value.code == "no_payment_method"
    assert not TopUp.objects.exists()
    assert not OutboxMessage.objects.exists()


def test_auto_recharge_fires_once_per_drop_below_the_threshold(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, recharge_threshold_minor=5000, recharge_amount_minor=10000
    )
    ledger_entry_add(
        organization=org, kind=LedgerKind.ADJUSTMENT, amount_minor=-1000, currency="usd",
        idempotency_key="test:debt",
    )  # fmt: skip

    with django_capture_on_commit_callbacks(execute=True):
        first = auto_recharge_check(organization=org)
    # The balance was −10.00: the recharge is 100.00, which lifts it to 90.00.
    first.refresh_from_db()
    assert (first.automatic, first.status, first.amount_minor) == (True, "succeeded", 10000)
    assert balance_minor(organization=org) == 9000
    assert BillingAccount.objects.get(organization=org).recharge_armed is True

    # Usage takes it below the threshold again: exactly one more recharge, not two.
    ledger_entry_add(
        organization=org, kind=LedgerKind.ADJUSTMENT, amount_minor=-5000, currency="usd",
        idempotency_key="test:usage",
    )  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True):
        second = auto_recharge_check(organization=org)
        third = auto_recharge_check(organization=org)
    assert second is not None and third is None
    assert TopUp.objects.filter(organization=org, automatic=True).count() == 2
    assert balance_minor(organization=org) == 14000


def test_a_failed_auto_recharge_is_not_retried_until_the_balance_recovers(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org, card="pm_card_chargeCustomerFail")
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=True)

    with django_capture_on_commit_callbacks(execute=True):
        first = auto_recharge_check(organization=org)
        again = auto_recharge_check(organization=org)

    first.refresh_from_db()
    assert first.status == TopUpStatus.FAILED
    assert again is None
    assert TopUp.objects.count() == 1
    assert balance_minor(organization=org) == 0


def test_a_new_default_card_re_arms_the_recharge_its_predecessor_declined(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    """The declined recharge left the account disarmed until its balance recovered, which it
    could not do alone: with a working card saved and made the default it went on to grace
    and suspension. The new card is charged by the next check, once."""
    from billing.services.payment_methods import payment_method_set_default

    declining = save_card(localstripe, org, card="pm_card_chargeCustomerFail")
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=True)
    with django_capture_on_commit_callbacks(execute=True):
        declined = auto_recharge_check(organization=org)
    declined.refresh_from_db()
    assert declined.status == TopUpStatus.FAILED

    working = save_card(localstripe, org)  # saved, not yet the default: nothing changes
    assert BillingAccount.objects.get(organization=org).default_payment_method_id == declining
    assert auto_recharge_check(organization=org) is None
    payment_method_set_default(organization=org, payment_method_id=working)
    with django_capture_on_commit_callbacks(execute=True):
        recharge = auto_recharge_check(organization=org)
        again = auto_recharge_check(organization=org)

    recharge.refresh_from_db()
    assert (recharge.payment_method_id, recharge.status) == (working, TopUpStatus.SUCCEEDED)
    assert again is None
    assert balance_minor(organization=org) == recharge.amount_minor
    # Making the declining card the default again does not re-arm a charge to it.
    BillingAccount.objects.filter(organization=org).update(recharge_armed=False)
    TopUp.objects.filter(pk=recharge.pk).update(status=TopUpStatus.FAILED)
    payment_method_set_default(organization=org, payment_method_id=declining)
    assert BillingAccount.objects.get(organization=org).recharge_armed is False


def test_a_refund_goes_through_the_refunds_api_and_leaves_the_balance(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    with django_capture_on_commit_callbacks(execute=True):
        top_up = top_up_create(organization=org, amount=Decimal("40.00"))
    top_up.refresh_from_db()

    with django_capture_on_commit_callbacks(execute=True):
        refund = refund_create(top_up=top_up, amount=Decimal("15.00"), reason="customer asked")

    refund.refresh_from_db()
    assert refund.status == RefundStatus.SUCCEEDED
    assert refund.stripe_refund_id.startswith("re_")
    assert balance_minor(organization=org) == 2500
    remote = get_gateway().refunds_for_payment_intent(
        payment_intent_id=top_up.stripe_payment_intent_id
    )
    assert [(r["id"], r["amount"]) for r in remote] == [(refund.stripe_refund_id, 1500)]
    assert Refund.objects.count() == 1
