"""reconcile_billing reports every difference with Stripe (localstripe) and fails on any."""

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from billing.models import BillingAccount, LedgerKind, TopUp
from billing.selectors import balance_minor
from billing.services.ledger import ledger_entry_add
from billing.services.reconcile import billing_reconcile
from billing.services.refunds import refund_create, top_up_dispute_settle
from billing.services.topups import top_up_create
from tests.billing.conftest import paid_top_up, save_card, stripe_client

pytestmark = [pytest.mark.stripe, pytest.mark.django_db]


def test_it_passes_when_ledger_top_ups_and_refunds_match_and_reports_each_difference(
    localstripe, stripe_disputes, org, eager_celery, django_capture_on_commit_callbacks
):
    pm_id = save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    with django_capture_on_commit_callbacks(execute=True):
        top_up = top_up_create(organization=org, amount=Decimal("60.00"))
    top_up.refresh_from_db()
    with django_capture_on_commit_callbacks(execute=True):
        refund_create(top_up=top_up, amount=Decimal("10.00"), reason="test")
    out = StringIO()
    call_command("reconcile_billing", stdout=out)
    assert "Billing matches Stripe." in out.getvalue()

    # Stripe charged the customer behind our back, and a top-up lost its PaymentIntent.
    customer = BillingAccount.objects.get(organization=org).stripe_customer_id
    stray = stripe_client(localstripe).v1.payment_intents.create(
        {"amount": 999, "currency": "usd", "customer": customer, "payment_method": pm_id,
         "off_session": True, "confirm": True}
    )  # fmt: skip
    TopUp.objects.filter(pk=top_up.pk).update(amount_minor=6100)

    out = StringIO()
    with pytest.raises(CommandError) as error:
        call_command("reconcile_billing", stdout=out)

    lines = out.getvalue().splitlines()
    assert str(error.value) == "3 difference(s) between our records and Stripe"
    assert any(f"({stray.id}) with no successful top-up here" in line for line in lines)
    assert any(
        f"top-up {top_up.pk} is 6100 succeeded here, Stripe says 6000" in line for line in lines
    )
    assert any(
        f"top-up {top_up.pk} has ledger entries [6000], expected [6100]" in line for line in lines
    )


def _dispute(dispute_id: str, pi_id: str, status: str, *moves: int) -> dict:
    """A dispute of 60.00 as Stripe lists it, with a balance transaction per money move."""
    return {"id": dispute_id, "object": "dispute", "amount": 6000, "currency": "usd",
            "charge": "ch_x", "payment_intent": pi_id, "reason": "fraudulent", "status": status,
            "balance_transactions": [{"id": f"txn_{dispute_id}_{i}", "object": "balance_transaction",
                                      "amount": m, "currency": "usd"} for i, m in enumerate(moves)]}  # fmt: skip


def test_it_compares_disputes_with_what_stripe_did_with_the_money(
    localstripe, stripe_disputes, org
):
    top_up, pi = paid_top_up(localstripe, org, amount_minor=6000)
    # An inquiry that moved nothing, and a dispute whose funds Stripe withdrew and then gave
    # back when it was won: Stripe's word, with no webhook applied here yet.
    stripe_disputes.append(_dispute("dp_inquiry", pi.id, "warning_needs_response"))
    stripe_disputes.append(_dispute("dp_won", pi.id, "won", -6000, 6000))
    # And a line for a dispute Stripe does not have.
    ledger_entry_add(organization=org, kind=LedgerKind.ADJUSTMENT, amount_minor=-500,
                     currency="usd", idempotency_key="dispute:dp_ghost:withdrawn")  # fmt: skip

    differences = billing_reconcile()

    label = f"{org.public_id}: dispute dp_won of top-up {top_up.pk}"
    assert differences == [
        f"{label}: Stripe has the funds withdrawn (6000 usd) but there is no line for it here",
        f"{label}: Stripe has the funds reinstated (6000 usd) but there is no line for it here",
        f"organisation {org.pk}: the withdrawn line of -500 is of dispute dp_ghost, which Stripe "
        "does not have",
    ]

    # The webhooks come in: the won dispute's lines are Stripe's. A lost one, recorded here as
    # won, is a difference again.
    top_up_dispute_settle(top_up_id=top_up.pk, dispute_id="dp_won", amount_minor=6000,
                          currency="usd", withdrawn=True, reinstated=True)  # fmt: skip
    top_up_dispute_settle(top_up_id=top_up.pk, dispute_id="dp_lost", amount_minor=6000,
                          currency="usd", withdrawn=True, reinstated=True)  # fmt: skip
    stripe_disputes.append(_dispute("dp_lost", pi.id, "lost", -6000))
    balance = balance_minor(organization=org)

    differences = billing_reconcile()

    assert differences == [
        f"{org.public_id}: dispute dp_lost of top-up {top_up.pk}: the reinstated line of 6000 is "
        "here but Stripe has not reinstated the funds (lost)",
        f"organisation {org.pk}: the withdrawn line of -500 is of dispute dp_ghost, which Stripe "
        "does not have",
    ]
    assert balance_minor(organization=org) == balance  # reconciling moves no money
