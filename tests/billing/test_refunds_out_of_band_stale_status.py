"""A refund's status is taken from Stripe's current state of the refund, read back before it
is applied, never from the event's payload: a stale "succeeded" delivered after Stripe
failed the refund moves no money. Stripe's current state comes from localstripe where it
can play it (its refunds always succeed); a refund Stripe failed is played by a stub of the
gateway's refund_retrieve (localstripe cannot fail a refund)."""

from decimal import Decimal
from types import SimpleNamespace

import pytest

from billing.models import (
    BillingAccount,
    LedgerEntry,
    OutboxMessage,
    Refund,
    RefundStatus,
    TopUp,
    WebhookEvent,
)
from billing.selectors import balance_minor
from billing.services.outbox import outbox_send
from billing.services.refunds import refund_create
from billing.services.topups import top_up_succeed
from billing.services.webhooks import webhook_event_process
from billing.stripe_gateway import PermanentStripeError, get_gateway
from tests.billing.conftest import paid_top_up


class StripeSays:
    """The gateway's refund_retrieve, answering with Stripe's current state of a refund."""

    def __init__(self, status: str):
        self.status, self.retrieved = status, []

    def refund_retrieve(self, *, refund_id: str) -> dict:
        self.retrieved.append(refund_id)
        return {"id": refund_id, "object": "refund", "status": self.status, "amount": 4000,
                "currency": "usd", "payment_intent": "pi_refunded",
                "failure_reason": "expired_or_canceled_card" if self.status == "failed" else None,
                "metadata": {"refund": refund_id.removeprefix("re_")}}  # fmt: skip


def event(refund: Refund, status: str, n: int, type: str = "refund.updated") -> WebhookEvent:
    return WebhookEvent.objects.create(
        stripe_event_id=f"evt_{refund.pk}_{n}",
        type=type,
        payload={"data": {"object": {"id": f"re_{refund.pk}", "object": "refund",
                                     "status": status, "amount": refund.amount_minor,
                                     "metadata": {"refund": str(refund.pk)}}}},
    )  # fmt: skip


def lines(org) -> list[tuple[str, int]]:
    return list(
        LedgerEntry.objects.filter(organization=org, kind__in=["refund", "adjustment"])
        .order_by("id")
        .values_list("kind", "amount_minor")
    )


@pytest.fixture
def refund_of_40(org):
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    top_up = TopUp.objects.create(organization=org, amount_minor=10000, currency="usd",
                                  payment_method_id="pm_card_visa")  # fmt: skip
    assert top_up_succeed(top_up_id=top_up.pk, payment_intent_id="pi_refunded")
    return refund_create(top_up=top_up, amount=Decimal("40.00"), reason="customer asked")


@pytest.mark.django_db
@pytest.mark.parametrize("type", ["refund.updated", "charge.refund.updated"])
def test_a_stale_success_after_stripe_failed_the_refund_moves_no_money(
    org, refund_of_40, monkeypatch, type
):
    stripe = StripeSays("failed")
    monkeypatch.setattr("billing.services.webhooks.get_gateway", lambda: stripe)
    assert webhook_event_process(event_id=event(refund_of_40, "failed", 1, type).pk)
    assert balance_minor(organization=org) == 10000

    # A delivery of an earlier "succeeded" arrives late; Stripe's refund is still failed.
    assert webhook_event_process(event_id=event(refund_of_40, "succeeded", 2, type).pk)

    assert stripe.retrieved == [f"re_{refund_of_40.pk}"] * 2
    refund_of_40.refresh_from_db()
    assert (refund_of_40.status, refund_of_40.stripe_refund_id) == (
        RefundStatus.FAILED, f"re_{refund_of_40.pk}",
    )  # fmt: skip
    assert lines(org) == [("refund", -4000), ("adjustment", 4000)]
    assert balance_minor(organization=org) == 10000


@pytest.mark.django_db
def test_a_success_read_before_a_failure_and_applied_after_it_moves_no_money(
    org, refund_of_40, monkeypatch
):
    """One delivery reads "succeeded" from Stripe; while it waits, the refund fails at Stripe
    and a second delivery reads and applies that. Stripe's failure is final, so the first
    delivery's older read is not applied over it."""
    stripe = StripeSays("succeeded")
    later = event(refund_of_40, "failed", 2)

    class FailsWhileTheFirstWaits(StripeSays):
        def refund_retrieve(self, *, refund_id):
            answer = stripe.refund_retrieve(refund_id=refund_id)  # read: succeeded
            stripe.status = "failed"  # then Stripe fails it and tells us again
            monkeypatch.setattr("billing.services.webhooks.get_gateway", lambda: stripe)
            assert webhook_event_process(event_id=later.pk)
            return answer

    monkeypatch.setattr(
        "billing.services.webhooks.get_gateway", lambda: FailsWhileTheFirstWaits("succeeded")
    )
    assert webhook_event_process(event_id=event(refund_of_40, "succeeded", 1).pk)

    refund_of_40.refresh_from_db()
    assert refund_of_40.status == RefundStatus.FAILED
    assert lines(org) == [("refund", -4000), ("adjustment", 4000)]
    assert balance_minor(organization=org) == 10000


@pytest.mark.django_db
def test_a_failed_fetch_leaves_the_event_for_the_sweeper_and_moves_nothing(
    org, refund_of_40, monkeypatch
):
    class StripeDown:
        def refund_retrieve(self, *, refund_id):
            raise PermanentStripeError("No such refund", code="resource_missing")

    monkeypatch.setattr("billing.services.webhooks.get_gateway", lambda: StripeDown())
    row = event(refund_of_40, "failed", 1)

    assert webhook_event_process(event_id=row.pk) is False

    row.refresh_from_db()
    assert row.processed_at is None and "No such refund" in row.error
    refund_of_40.refresh_from_db()
    assert refund_of_40.status == RefundStatus.PENDING
    assert lines(org) == [("refund", -4000)]


@pytest.mark.stripe
@pytest.mark.django_db
def test_an_event_claiming_a_failure_stripe_does_not_have_moves_no_money(localstripe, org):
    """localstripe's refund succeeded; a payload saying "failed" is not believed."""
    top_up, pi = paid_top_up(localstripe, org)
    refund = refund_create(top_up=top_up, amount=Decimal("40.00"), reason="customer asked")
    message = OutboxMessage.objects.get(kind="refund.create")
    outbox_send(message_id=message.pk, gateway=get_gateway())
    refund.refresh_from_db()
    assert refund.status == RefundStatus.SUCCEEDED and refund.stripe_refund_id

    forged = WebhookEvent.objects.create(
        stripe_event_id="evt_says_failed", type="refund.updated",
        payload={"data": {"object": {"id": refund.stripe_refund_id, "object": "refund",
                                     "status": "failed", "amount": 4000,
                                     "metadata": {"refund": str(refund.pk)}}}},
    )  # fmt: skip
    assert webhook_event_process(event_id=forged.pk)

    refund.refresh_from_db()
    assert refund.status == RefundStatus.SUCCEEDED
    assert lines(org) == [("refund", -4000)]
    assert balance_minor(organization=org) == 6000


@pytest.mark.django_db
def test_a_refund_our_request_gave_up_on_that_stripe_made_after_all_is_taken_once(
    org, refund_of_40, monkeypatch
):
    """Our outbox recorded a failure (Stripe's answer was an error), yet Stripe made the
    refund: its current state says succeeded, so the money is taken again, once."""
    from billing.services.refunds import refund_mark_failed

    refund_mark_failed(refund_id=refund_of_40.pk, reason="timeout")
    assert balance_minor(organization=org) == 10000
    monkeypatch.setattr("billing.services.webhooks.get_gateway", lambda: StripeSays("succeeded"))

    assert webhook_event_process(event_id=event(refund_of_40, "succeeded", 1).pk)
    assert webhook_event_process(event_id=event(refund_of_40, "succeeded", 2).pk)

    refund_of_40.refresh_from_db()
    assert (refund_of_40.status, refund_of_40.stripe_refund_id) == (
        RefundStatus.SUCCEEDED, f"re_{refund_of_40.pk}",
    )  # fmt: skip
    assert lines(org) == [("refund", -4000), ("adjustment", 4000), ("refund", -4000)]
    assert balance_minor(organization=org) == 6000


@pytest.mark.django_db
def test_a_dashboard_refund_read_as_succeeded_but_failed_meanwhile_moves_no_money(org, monkeypatch):
    """The same race for a refund made in the Stripe Dashboard (none of ours): the failure is
    applied first and recorded, so the older "succeeded" read finds it failed."""
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    top_up = TopUp.objects.create(organization=org, amount_minor=10000, currency="usd",
                                  payment_method_id="pm_card_visa")  # fmt: skip
    assert top_up_succeed(top_up_id=top_up.pk, payment_intent_id="pi_refunded")
    remote = {"id": "re_dashboard", "object": "refund", "status": "succeeded", "amount": 4000,
              "currency": "usd", "payment_intent": "pi_refunded", "metadata": {}}  # fmt: skip
    stripe = SimpleNamespace(refund_retrieve=lambda *, refund_id: dict(remote))
    later = WebhookEvent.objects.create(stripe_event_id="evt_dash_2", type="refund.updated",
                                        payload={"data": {"object": remote}})  # fmt: skip

    def read_then_fail(*, refund_id):
        answer = dict(remote)  # read: succeeded
        remote.update(status="failed", failure_reason="lost_or_stolen_card")
        monkeypatch.setattr("billing.services.webhooks.get_gateway", lambda: stripe)
        assert webhook_event_process(event_id=later.pk)
        return answer

    monkeypatch.setattr("billing.services.webhooks.get_gateway",
                        lambda: SimpleNamespace(refund_retrieve=read_then_fail))  # fmt: skip
    first = WebhookEvent.objects.create(stripe_event_id="evt_dash_1", type="refund.created",
                                        payload={"data": {"object": remote}})  # fmt: skip
    assert webhook_event_process(event_id=first.pk)

    refund = Refund.objects.get()
    assert (refund.status, refund.stripe_refund_id) == (RefundStatus.FAILED, "re_dashboard")
    assert lines(org) == []
    assert balance_minor(organization=org) == 10000
