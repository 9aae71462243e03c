"""Refunds Switchyard did not make (from the Stripe Dashboard) are recorded as if staff had
made them: a refund row and its refund line, once per Stripe refund, the balance going
negative if it must. Refunds are made in localstripe; the deliveries are signed payloads,
and the processor reads the refunds' current state back from localstripe."""

import pytest

from billing.models import (
    BillingAccount,
    BillingNotice,
    FundingState,
    LedgerEntry,
    LedgerKind,
    Refund,
    RefundStatus,
    WebhookEvent,
)
from billing.selectors import balance_minor
from billing.services.ledger import ledger_entry_add
from marketplace.models import AuditEntry
from tests.billing.conftest import events_processed_at_once, paid_top_up, save_card, stripe_client
from tests.billing.test_webhooks import deliver

pytestmark = [pytest.mark.stripe]


@pytest.fixture
def paid(localstripe, org):
    """A top-up of 100.00 paid at localstripe and credited, 90.00 of it spent: 10.00 left."""
    top_up, pi = paid_top_up(localstripe, org)
    ledger_entry_add(organization=org, kind=LedgerKind.USAGE, amount_minor=-9000,
                     currency="usd", idempotency_key="usage:spent")  # fmt: skip
    return top_up, pi


def dashboard_refund(localstripe, pi, amount: int) -> dict:
    """A refund made in the Stripe Dashboard: no metadata of ours."""
    return (
        stripe_client(localstripe)
        .v1.refunds.create({"payment_intent": pi.id, "amount": amount})
        .to_dict()
    )


def charge_refunded(pi) -> dict:
    # The current API sends the charge without its refunds.
    return {"id": pi.latest_charge.id, "object": "charge", "payment_intent": pi.id,
            "amount": 10000, "amount_refunded": 3000, "currency": "usd", "refunded": False}  # fmt: skip


def refund_lines(org) -> list[tuple[str, int]]:
    return list(
        LedgerEntry.objects.filter(organization=org, kind__in=["refund", "adjustment"])
        .order_by("id")
        .values_list("kind", "amount_minor")
    )


@pytest.mark.django_db
def test_a_dashboard_refund_is_recorded_once_and_the_balance_may_go_negative(
    client, localstripe, org, paid
):
    top_up, pi = paid
    remote = dashboard_refund(localstripe, pi, 3000)

    event = deliver(client, "evt_charge_refunded", "charge.refunded", charge_refunded(pi))
    deliver(client, "evt_refund_created", "refund.created", remote)
    deliver(client, "evt_refund_updated", "refund.updated", remote)
    deliver(client, "evt_charge_refunded_again", "charge.refunded", charge_refunded(pi))

    assert event.processed_at is not None and event.error == ""
    refund = Refund.objects.get()
    assert (refund.top_up, refund.amount_minor, refund.currency, refund.status,
            refund.stripe_refund_id, refund.created_by) == (
        top_up, 3000, "usd", RefundStatus.SUCCEEDED, remote["id"], None,
    )  # fmt: skip
    assert refund.reason == "Refunded at Stripe, not through Switchyard"
    assert refund_lines(org) == [("refund", -3000)]
    assert LedgerEntry.objects.filter(idempotency_key=f"refund:{refund.pk}").exists()
    assert balance_minor(organization=org) == -2000
    assert BillingAccount.objects.get(organization=org).funding_state == FundingState.WARNING
    assert BillingNotice.objects.filter(organization=org, kind="refund").count() == 1
    audit = AuditEntry.objects.get(organization=org, action="refund.create")
    assert (audit.actor, audit.object_id) == ("stripe", top_up.public_id)
    assert audit.changes["after"] == {"refund": "30.00", "currency": "usd",
                                      "reason": refund.reason, "stripe_refund": remote["id"]}  # fmt: skip


@pytest.mark.django_db
def test_each_dashboard_refund_of_a_charge_is_recorded(client, localstripe, org, paid):
    top_up, pi = paid
    first = dashboard_refund(localstripe, pi, 3000)
    deliver(client, "evt_first", "refund.created", first)
    second = dashboard_refund(localstripe, pi, 2500)
    deliver(client, "evt_both", "charge.refunded", charge_refunded(pi))

    assert sorted(Refund.objects.values_list("stripe_refund_id", "amount_minor")) == sorted(
        [(first["id"], 3000), (second["id"], 2500)]
    )
    assert balance_minor(organization=org) == 1000 - 5500


@pytest.mark.django_db
def test_a_refund_of_a_charge_that_is_not_a_top_up_records_nothing(client, localstripe, org):
    pm_id = save_card(localstripe, org)
    account = BillingAccount.objects.get(organization=org)
    pi = stripe_client(localstripe).v1.payment_intents.create(
        {
            "amount": 10000,
            "currency": "usd",
            "customer": account.stripe_customer_id,
            "payment_method": pm_id,
            "off_session": True,
            "confirm": True,
        }  # fmt: skip
    )
    remote = dashboard_refund(localstripe, pi, 3000)

    event = deliver(client, "evt_foreign_refund", "refund.created", remote)

    assert event.processed_at is not None and event.error == ""
    assert not Refund.objects.exists() and not LedgerEntry.objects.filter(organization=org).exists()


@pytest.mark.django_db(transaction=True)
def test_two_events_about_one_dashboard_refund_at_once_record_it_once(localstripe, org, paid):
    top_up, pi = paid
    remote = dashboard_refund(localstripe, pi, 3000)
    events = [
        WebhookEvent.objects.create(stripe_event_id="evt_race_charge", type="charge.refunded",
                                    payload={"data": {"object": charge_refunded(pi)}}),
        WebhookEvent.objects.create(stripe_event_id="evt_race_refund", type="refund.created",
                                    payload={"data": {"object": remote}}),
    ]  # fmt: skip
    outcomes = events_processed_at_once(events)

    assert outcomes == [True, True]
    assert Refund.objects.count() == 1
    assert refund_lines(org) == [("refund", -3000)]
    assert balance_minor(organization=org) == -2000
