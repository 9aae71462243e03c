"""Refunds pay out only what is available, one decision at a time, and their ledger lines
follow Stripe's last word on them, whatever order its webhooks arrive in."""

import threading
from decimal import Decimal
from types import SimpleNamespace
from unittest.mock import patch

import pytest
from django.db import connection

from billing.models import (
    BillingAccount,
    LedgerEntry,
    OutboxMessage,
    Refund,
    RefundStatus,
    TopUp,
    TopUpStatus,
    WebhookEvent,
)
from billing.selectors import balance_minor
from billing.services.holds import money_position
from billing.services.refunds import refund_create, refund_mark_failed
from billing.services.topups import top_up_succeed
from billing.services.webhooks import webhook_event_process
from config.errors import Conflict, ValidationFailed
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow


@pytest.fixture
def capacity(db):
    """36.00 per GPU-hour: an on-demand booking of 2 GPUs holds its first hour, 72.00."""
    model = GpuModelFactory()
    make_rate(model, "36.0000")
    make_policy()
    make_nodes(SiteFactory(), model, 1)
    return model


def paid_top_up(org, amount_minor: int, n: int = 1) -> TopUp:
    top_up = TopUp.objects.create(organization=org, amount_minor=amount_minor, currency="usd",
                                  payment_method_id="pm_card_visa")  # fmt: skip
    assert top_up_succeed(top_up_id=top_up.pk, payment_intent_id=f"pi_{org.pk}_{n}")
    top_up.refresh_from_db()
    assert top_up.status == TopUpStatus.SUCCEEDED
    return top_up


def book_72(org, model) -> None:
    reservation_create(organization=org, gpu_model=model.slug, gpu_count=2, tier="on_demand",
                       starts_at=tomorrow(), ends_at=tomorrow(10))  # fmt: skip
    assert money_position(organization_id=org.pk).held == 7200


def new_org():
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org, currency="usd")
    return org


@pytest.mark.django_db
def test_a_refund_cannot_pay_out_money_held_for_a_booking(capacity):
    org = new_org()
    top_up = paid_top_up(org, 10000)
    book_72(org, capacity)

    with pytest.raises(Conflict) as error:
        refund_create(top_up=top_up, amount=Decimal("100.00"), reason="probe")

    assert error.value.code == "insufficient_balance"
    assert error.value.field == "amount"
    assert error.value.message == (
        "At most 28.00 USD can be refunded now: the balance is 100.00 USD, of which 72.00 USD "
        "is used or held for bookings; the refund is 100.00 USD."
    )
    assert not Refund.objects.exists() and not OutboxMessage.objects.exists()
    assert money_position(organization_id=org.pk) == (10000, 0, 7200)

    refund_create(top_up=top_up, amount=Decimal("28.00"), reason="what is left")

    assert money_position(organization_id=org.pk) == (7200, 0, 7200)
    assert money_position(organization_id=org.pk).available == 0


@pytest.mark.django_db
@pytest.mark.parametrize("amount", ["10.005", "0.001"])
def test_a_refund_finer_than_a_cent_is_refused_not_rounded(capacity, amount):
    """10.005 USD would have been refunded as 10.01, another amount than the one asked for
    (0.001 as nothing at all)."""
    org = new_org()
    top_up = paid_top_up(org, 10000)

    with pytest.raises(ValidationFailed) as error:
        refund_create(top_up=top_up, amount=Decimal(amount), reason="probe")

    assert (error.value.code, error.value.field) == ("amount_precision", "amount")
    assert error.value.message == "Amounts in USD are given to at most 2 decimal places."
    assert not Refund.objects.exists() and not OutboxMessage.objects.exists()
    assert money_position(organization_id=org.pk) == (10000, 0, 0)


@pytest.mark.django_db(transaction=True)
def test_two_refunds_at_once_cannot_together_exceed_what_is_available(capacity):
    """Two top-ups of 100.00, 72.00 held: 128.00 available. Two staff refund 100.00 of each
    top-up at the same moment (different top-up rows, so only the account lock serialises
    them): one is paid, the other refused."""
    org = new_org()
    top_ups = [paid_top_up(org, 10000, n) for n in (1, 2)]
    book_72(org, capacity)
    barrier = threading.Barrier(2)
    outcomes = []

    def refund(top_up):
        try:
            barrier.wait()
            refund_create(top_up=top_up, amount=Decimal("100.00"), reason="race")
            outcomes.append("ok")
        except Conflict as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=refund, args=(t,)) for t in top_ups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sorted(outcomes) == ["insufficient_balance", "ok"]
    assert Refund.objects.count() == 1
    assert money_position(organization_id=org.pk) == (10000, 0, 7200)


def _refund_event(refund: Refund, status: str, n: int) -> bool:
    """A refund.updated delivered while Stripe's refund is `status` (the processor reads it back
    through the gateway's refund_retrieve, stubbed here: localstripe cannot fail a refund)."""
    remote = {"id": f"re_{refund.pk}", "object": "refund", "status": status,
              "amount": refund.amount_minor, "metadata": {"refund": str(refund.pk)}}  # fmt: skip
    event = WebhookEvent.objects.create(
        stripe_event_id=f"evt_refund_{refund.pk}_{n}",
        type="refund.updated",
        payload={"data": {"object": remote}},
    )
    stripe = SimpleNamespace(refund_retrieve=lambda *, refund_id: remote)
    with patch("billing.services.webhooks.get_gateway", lambda: stripe):
        return webhook_event_process(event_id=event.pk)


def _lines(org) -> list[tuple[str, int]]:
    return list(
        LedgerEntry.objects.filter(organization=org, kind__in=["refund", "adjustment"])
        .order_by("id")
        .values_list("kind", "amount_minor")
    )


@pytest.fixture
def refund_of_40(db):
    org = new_org()
    top_up = paid_top_up(org, 10000)
    refund = refund_create(top_up=top_up, amount=Decimal("40.00"), reason="customer asked")
    return org, refund


def test_a_success_after_a_failure_takes_the_money_again_once(refund_of_40):
    """The failure was our request to Stripe giving up; Stripe made the refund after all.
    (A failure of Stripe's own is final: tests/billing/test_refunds_out_of_band_stale_status.py.)"""
    org, refund = refund_of_40

    refund_mark_failed(refund_id=refund.pk, reason="timeout")
    assert balance_minor(organization=org) == 10000
    assert _refund_event(refund, "succeeded", 2)
    assert _refund_event(refund, "succeeded", 3)  # told again: nothing more moves

    refund.refresh_from_db()
    assert (refund.status, refund.stripe_refund_id) == (RefundStatus.SUCCEEDED, f"re_{refund.pk}")
    assert _lines(org) == [("refund", -4000), ("adjustment", 4000), ("refund", -4000)]
    assert balance_minor(organization=org) == 6000  # the 40.00 is on the card, not here too


def test_each_change_of_stripes_word_moves_the_money_once(refund_of_40):
    org, refund = refund_of_40

    # Stripe fails a refund that had succeeded; a "succeeded" after that is an older word.
    for n, status in enumerate(["succeeded", "failed", "failed", "succeeded", "failed"]):
        assert _refund_event(refund, status, n)

    refund.refresh_from_db()
    assert refund.status == RefundStatus.FAILED
    assert _lines(org) == [("refund", -4000), ("adjustment", 4000)]
    assert balance_minor(organization=org) == 10000
    assert sorted(
        LedgerEntry.objects.filter(organization=org, kind__in=["refund", "adjustment"]).values_list(
            "idempotency_key", flat=True
        )
    ) == sorted([f"refund:{refund.pk}", f"refund_reversal:{refund.pk}"])
