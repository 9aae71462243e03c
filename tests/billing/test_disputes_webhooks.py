"""Card disputes: when Stripe withdraws a disputed top-up's money, the prepaid balance loses
it (once per dispute, whatever order or how often its events come), and gets it back once
when the dispute is won and the funds are reinstated. Deliveries are signed payloads as
Stripe sends them (localstripe has no disputes); the charge a dispute names is read from
localstripe where the payload lacks its PaymentIntent."""

import pytest

from billing.models import (
    BillingAccount,
    BillingNotice,
    FundingState,
    LedgerEntry,
    LedgerKind,
    TopUp,
    WebhookEvent,
)
from billing.selectors import balance_minor
from billing.services.ledger import ledger_entry_add
from billing.services.topups import top_up_succeed
from billing.services.webhooks import webhook_event_process
from marketplace.models import AuditEntry
from tests.billing.conftest import events_processed_at_once, make_reservation, paid_top_up
from tests.billing.test_webhooks import SECRET, deliver

WITHDRAWAL = {"id": "txn_w", "object": "balance_transaction", "amount": -10000, "fee": 1500,
              "currency": "usd", "reporting_category": "dispute"}  # fmt: skip
REINSTATEMENT = {"id": "txn_r", "object": "balance_transaction", "amount": 10000, "fee": 0,
                 "currency": "usd", "reporting_category": "dispute_reversal"}  # fmt: skip


@pytest.fixture
def spent_top_up(client, settings, org):
    """A card top-up of 100.00, 90.00 of it already spent on GPU time: 10.00 left."""
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    top_up = TopUp.objects.create(organization=org, amount_minor=10000, currency="usd",
                                  payment_method_id="pm_card_visa")  # fmt: skip
    assert top_up_succeed(top_up_id=top_up.pk, payment_intent_id="pi_disputed")
    ledger_entry_add(organization=org, kind=LedgerKind.USAGE, amount_minor=-9000,
                     currency="usd", idempotency_key="usage:spent")  # fmt: skip
    assert balance_minor(organization=org) == 1000
    return top_up


def dispute(status: str, *balance_transactions: dict, **fields) -> dict:
    return {"id": "dp_1", "object": "dispute", "amount": 10000, "currency": "usd",
            "charge": "ch_disputed", "payment_intent": "pi_disputed", "reason": "fraudulent",
            "status": status, "balance_transactions": list(balance_transactions), **fields}  # fmt: skip


def dispute_lines(org) -> list[tuple[str, int, str]]:
    return list(
        LedgerEntry.objects.filter(organization=org, idempotency_key__startswith="dispute:")
        .order_by("id")
        .values_list("kind", "amount_minor", "idempotency_key")
    )


@pytest.mark.django_db
def test_withdrawn_funds_of_a_disputed_top_up_leave_the_balance_once(client, org, spent_top_up):
    make_reservation(org)  # an on-demand reservation is running: a negative balance is grace

    created = deliver(client, "evt_dp_created", "charge.dispute.created",
                      dispute("needs_response", WITHDRAWAL))  # fmt: skip
    deliver(client, "evt_dp_withdrawn", "charge.dispute.funds_withdrawn",
            dispute("needs_response", WITHDRAWAL))  # fmt: skip
    deliver(client, "evt_dp_updated", "charge.dispute.created",
            dispute("under_review", WITHDRAWAL))  # fmt: skip
    assert webhook_event_process(event_id=created.pk) is False  # a re-run changes nothing

    assert dispute_lines(org) == [("adjustment", -10000, "dispute:dp_1:withdrawn")]
    assert balance_minor(organization=org) == -9000
    account = BillingAccount.objects.get(organization=org)
    assert account.funding_state == FundingState.GRACE
    notices = list(BillingNotice.objects.filter(organization=org).values_list("kind", flat=True))
    assert notices.count("dispute_funds_withdrawn") == 1 and "grace_started" in notices
    audit = AuditEntry.objects.get(organization=org, action="dispute.funds_withdrawn")
    assert (audit.actor, audit.object_type, audit.object_id) == (
        "stripe", "top_up", spent_top_up.public_id,
    )  # fmt: skip
    assert audit.changes["after"] == {"dispute": "dp_1", "amount": "100.00", "currency": "usd",
                                      "reason": "fraudulent", "status": "needs_response"}  # fmt: skip


@pytest.mark.django_db
def test_a_disputed_card_is_not_recharged_by_itself(client, org, spent_top_up):
    """The funding update after the withdrawal would recharge the very card that disputed."""
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, recharge_threshold_minor=500,
        recharge_amount_minor=5000,
    )  # fmt: skip
    deliver(client, "evt_dp_w", "charge.dispute.funds_withdrawn",
            dispute("needs_response", WITHDRAWAL))  # fmt: skip
    assert BillingAccount.objects.get(organization=org).auto_recharge_enabled is False
    assert not TopUp.objects.filter(organization=org).exclude(pk=spent_top_up.pk).exists()
    notice = BillingNotice.objects.get(organization=org, kind="dispute_funds_withdrawn")
    assert "Automatic recharge is turned off" in notice.message


@pytest.mark.django_db
def test_a_won_dispute_gives_the_money_back_once(client, org, spent_top_up):
    deliver(client, "evt_dp_w", "charge.dispute.funds_withdrawn",
            dispute("needs_response", WITHDRAWAL))  # fmt: skip
    assert BillingAccount.objects.get(organization=org).funding_state == FundingState.WARNING

    won = dispute("won", WITHDRAWAL, REINSTATEMENT)
    deliver(client, "evt_dp_r", "charge.dispute.funds_reinstated", won)
    deliver(client, "evt_dp_closed", "charge.dispute.closed", won)
    deliver(client, "evt_dp_r_again", "charge.dispute.funds_reinstated", won)

    assert dispute_lines(org) == [
        ("adjustment", -10000, "dispute:dp_1:withdrawn"),
        ("adjustment", 10000, "dispute:dp_1:reinstated"),
    ]
    assert balance_minor(organization=org) == 1000
    kinds = list(BillingNotice.objects.filter(organization=org).values_list("kind", flat=True))
    assert (kinds.count("dispute_funds_withdrawn"), kinds.count("dispute_funds_reinstated")) == (
        1,
        1,
    )


@pytest.mark.django_db
def test_events_out_of_order_leave_a_won_dispute_at_nothing_taken(client, org, spent_top_up):
    """The reinstatement is delivered first; the withdrawal's events arrive afterwards."""
    won = dispute("won", WITHDRAWAL, REINSTATEMENT)
    deliver(client, "evt_late_r", "charge.dispute.funds_reinstated", won)
    deliver(client, "evt_late_closed", "charge.dispute.closed", won)
    deliver(client, "evt_late_created", "charge.dispute.created", dispute("needs_response"))
    deliver(client, "evt_late_w", "charge.dispute.funds_withdrawn",
            dispute("needs_response", WITHDRAWAL))  # fmt: skip

    assert [(k, a) for k, a, _ in dispute_lines(org)] == [("adjustment", -10000),
                                                          ("adjustment", 10000)]  # fmt: skip
    assert balance_minor(organization=org) == 1000


@pytest.mark.django_db
def test_a_lost_dispute_keeps_the_money_taken(client, org, spent_top_up):
    deliver(client, "evt_lost_w", "charge.dispute.funds_withdrawn",
            dispute("needs_response", WITHDRAWAL))  # fmt: skip
    deliver(client, "evt_lost_closed", "charge.dispute.closed", dispute("lost", WITHDRAWAL))

    assert [a for _, a, _ in dispute_lines(org)] == [-10000]
    assert balance_minor(organization=org) == -9000


@pytest.mark.django_db
def test_an_inquiry_without_withdrawn_funds_moves_nothing(client, org, spent_top_up):
    deliver(client, "evt_inq", "charge.dispute.created", dispute("warning_needs_response"))
    deliver(client, "evt_inq_closed", "charge.dispute.closed", dispute("warning_closed"))

    assert dispute_lines(org) == []
    assert balance_minor(organization=org) == 1000
    assert not BillingNotice.objects.filter(kind__startswith="dispute").exists()


@pytest.mark.django_db
def test_a_dispute_of_a_charge_that_is_not_a_top_up_is_done_and_moves_nothing(
    client, org, spent_top_up
):
    event = deliver(client, "evt_foreign", "charge.dispute.funds_withdrawn",
                    dispute("needs_response", WITHDRAWAL, payment_intent="pi_someone_else"))  # fmt: skip

    assert event.processed_at is not None and event.error == ""
    assert dispute_lines(org) == []
    assert balance_minor(organization=org) == 1000


@pytest.mark.django_db
def test_a_dispute_in_another_currency_than_its_top_up_is_refused_and_moves_nothing(
    client, org, spent_top_up
):
    event = deliver(client, "evt_eur", "charge.dispute.funds_withdrawn",
                    dispute("needs_response", WITHDRAWAL, currency="eur"))  # fmt: skip

    assert event.processed_at is None and "does not fit top-up" in event.error
    assert dispute_lines(org) == []
    assert balance_minor(organization=org) == 1000


@pytest.mark.stripe
@pytest.mark.django_db
def test_a_dispute_naming_only_its_charge_is_mapped_through_the_charges_payment_intent(
    client, localstripe, org
):
    top_up, pi = paid_top_up(localstripe, org)

    deliver(client, "evt_by_charge", "charge.dispute.funds_withdrawn",
            dispute("needs_response", WITHDRAWAL, charge=pi.latest_charge.id, payment_intent=None))  # fmt: skip

    assert dispute_lines(org) == [("adjustment", -10000, "dispute:dp_1:withdrawn")]
    assert balance_minor(organization=org) == 0


@pytest.mark.django_db(transaction=True)
def test_two_deliveries_processed_at_once_take_the_money_once(client, org, spent_top_up):
    events = [
        WebhookEvent.objects.create(
            stripe_event_id=f"evt_race_{n}",
            type=type,
            payload={"data": {"object": dispute("needs_response", WITHDRAWAL)}},
        )  # fmt: skip
        for n, type in enumerate(["charge.dispute.created", "charge.dispute.funds_withdrawn"])
    ]
    outcomes = events_processed_at_once(events)

    assert outcomes == [True, True]
    assert dispute_lines(org) == [("adjustment", -10000, "dispute:dp_1:withdrawn")]
    assert balance_minor(organization=org) == -9000
    assert BillingNotice.objects.filter(kind="dispute_funds_withdrawn").count() == 1
