"""reconcile_billing reports every difference with Stripe (localstripe) and fails on any."""

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from billing.models import BillingAccount, TopUp
from billing.services.refunds import refund_create
from billing.services.topups import top_up_create
from tests.billing.conftest import save_card, stripe_client

pytestmark = [pytest.mark.stripe, pytest.mark.django_db]


def test_it_passes_when_ledger_top_ups_and_refunds_match_and_reports_each_difference(
    localstripe, org, eager_celery, django_capture_on_commit_callbacks
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
