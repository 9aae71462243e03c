"""Compare our records of money with Stripe's and list every difference.

Checked per organisation with a Stripe customer:
- every successful top-up has a succeeded PaymentIntent of the same amount and customer, and
  exactly one top_up ledger entry of that amount;
- every failed top-up's PaymentIntent (if one exists) did not succeed;
- every succeeded PaymentIntent of the customer is a successful top-up of ours;
- the refunds Stripe has for each top-up are exactly our refunds that are not failed, with the
  same amounts, each with its refund ledger entry;
- every dispute of a top-up's payment has the lines of what Stripe did with its money (a
  withdrawal, a reinstatement: top_up_dispute_settle), and no dispute line is of a dispute
  Stripe does not have or did not move that money;
and, globally, no outbox message has been pending for more than an hour, and the figures the
database keeps by triggers equal their records: every organisation's balance the sum of its
ledger (billing 0007), its open holds' sum what its open holds still commit (billing 0009).
"""

from datetime import timedelta

from django.db import connection
from django.db.models import Q
from django.utils import timezone

from billing.models import (
    BillingAccount,
    LedgerEntry,
    OutboxMessage,
    OutboxStatus,
    Refund,
    RefundStatus,
    TopUp,
    TopUpStatus,
)
from billing.stripe_gateway import StripeGateway, get_gateway

__all__ = ["billing_reconcile", "kept_figures_differences"]


def billing_reconcile(*, gateway: StripeGateway | None = None) -> list[str]:
    gateway = gateway or get_gateway()
    differences: list[str] = []
    intents_by_customer: dict[str, dict[str, dict]] = {}
    for pi in gateway.payment_intents_all():
        intents_by_customer.setdefault(pi.get("customer") or "", {})[pi["id"]] = pi

    for account in BillingAccount.objects.exclude(stripe_customer_id="").select_related(
        "organization"
    ):
        org = account.organization
        label = f"{org.public_id} ({account.stripe_customer_id})"
        intents = intents_by_customer.get(account.stripe_customer_id, {})
        top_ups = TopUp.objects.filter(organization=org).exclude(stripe_payment_intent_id="")
        ours = {t.stripe_payment_intent_id: t for t in top_ups}
        for top_up in TopUp.objects.filter(organization=org, status=TopUpStatus.SUCCEEDED):
            pi = intents.get(top_up.stripe_payment_intent_id)
            if pi is None:
                differences.append(f"{label}: top-up {top_up.pk} succeeded here but Stripe has no "
                                   f"PaymentIntent {top_up.stripe_payment_intent_id or '(none)'}")  # fmt: skip
                continue
            if pi.get("status") != "succeeded" or pi.get("amount") != top_up.amount_minor:
                differences.append(f"{label}: top-up {top_up.pk} is {top_up.amount_minor} succeeded "
                                   f"here, Stripe says {pi.get('amount')} {pi.get('status')}")  # fmt: skip
            entries = list(LedgerEntry.objects.filter(idempotency_key=f"top_up:{top_up.pk}")
                           .values_list("amount_minor", flat=True))  # fmt: skip
            if entries != [top_up.amount_minor]:
                differences.append(f"{label}: top-up {top_up.pk} has ledger entries {entries}, "
                                   f"expected [{top_up.amount_minor}]")  # fmt: skip
            differences.extend(_refund_differences(label, top_up, gateway))
        for top_up in top_ups.filter(status=TopUpStatus.FAILED):
            pi = intents.get(top_up.stripe_payment_intent_id)
            if pi is not None and pi.get("status") == "succeeded":
                differences.append(f"{label}: top-up {top_up.pk} failed here but Stripe charged "
                                   f"{pi['amount']} ({pi['id']})")  # fmt: skip
        for pi_id, pi in intents.items():
            top_up = ours.get(pi_id)
            if pi.get("status") == "succeeded" and (
                top_up is None or top_up.status != TopUpStatus.SUCCEEDED
            ):
                differences.append(f"{label}: Stripe charged {pi.get('amount')} {pi.get('currency')} "
                                   f"({pi_id}) with no successful top-up here")  # fmt: skip

    differences.extend(_dispute_differences(gateway))
    stuck = OutboxMessage.objects.filter(
        status=OutboxStatus.PENDING, created_at__lt=timezone.now() - timedelta(hours=1)
    )
    for message in stuck:
        differences.append(f"outbox {message.pk} ({message.kind}, {message.idempotency_key}) pending "
                           f"since {message.created_at:%Y-%m-%d %H:%M} UTC: {message.last_error}")  # fmt: skip
    differences.extend(kept_figures_differences())
    return differences


# Each kept figure beside the sum of its records, where they differ (organisations with neither
# have no row on either side).
_KEPT_FIGURES_SQL = """
SELECT organization_id, 'balance', coalesce(k.kept, 0), coalesce(r.records, 0)
FROM (SELECT organization_id, amount_minor AS kept FROM billing_balance) k
FULL JOIN (SELECT organization_id, sum(amount_minor) AS records FROM billing_ledgerentry
           GROUP BY organization_id) r USING (organization_id)
WHERE coalesce(k.kept, 0) <> coalesce(r.records, 0)
UNION ALL
SELECT organization_id, 'open holds total', coalesce(k.kept, 0), coalesce(r.records, 0)
FROM (SELECT organization_id, sum(amount_minor) AS kept FROM billing_openholdsdelta
      GROUP BY organization_id) k
FULL JOIN (SELECT organization_id, sum(amount_minor - charged_minor) AS records
           FROM billing_hold WHERE status = 'open' GROUP BY organization_id) r
     USING (organization_id)
WHERE coalesce(k.kept, 0) <> coalesce(r.records, 0)
ORDER BY 1, 2
"""


def kept_figures_differences() -> list[str]:
    """The balances and open holds' sums the triggers keep that differ from their records (a
    bulk write with triggers off, say): what the funding gate would misread."""
    with connection.cursor() as cur:
        cur.execute(_KEPT_FIGURES_SQL)
        return [
            f"organisation {org_id}: its {figure} is kept as {kept} but its records sum to "
            f"{records}"
            for org_id, figure, kept, records in cur.fetchall()
        ]


def _refund_differences(label: str, top_up: TopUp, gateway: StripeGateway) -> list[str]:
    differences = []
    remote = {r["id"]: r for r in gateway.refunds_for_payment_intent(
        payment_intent_id=top_up.stripe_payment_intent_id) if r.get("status") != "failed"}  # fmt: skip
    local = Refund.objects.filter(top_up=top_up).filter(~Q(status=RefundStatus.FAILED))
    seen = set()
    for refund in local:
        r = remote.get(refund.stripe_refund_id)
        if r is None:
            differences.append(
                f"{label}: refund {refund.pk} of top-up {top_up.pk} is not at Stripe"
            )
            continue
        seen.add(r["id"])
        if r.get("amount") != refund.amount_minor:
            differences.append(f"{label}: refund {refund.pk} is {refund.amount_minor} here, "
                               f"{r.get('amount')} at Stripe")  # fmt: skip
        if not LedgerEntry.objects.filter(idempotency_key=f"refund:{refund.pk}",
                                          amount_minor=-refund.amount_minor).exists():  # fmt: skip
            differences.append(f"{label}: refund {refund.pk} has no ledger entry")
    for refund_id, r in remote.items():
        if refund_id not in seen:
            differences.append(f"{label}: Stripe refunded {r.get('amount')} ({refund_id}) of top-up "
                               f"{top_up.pk} with no refund here")  # fmt: skip
    return differences


# What Stripe did with a dispute's money, as the webhooks apply it (billing.services.webhooks).
def _dispute_moves(dispute: dict) -> set[str]:
    moves = [int(t.get("amount") or 0) for t in dispute.get("balance_transactions") or []
             if isinstance(t, dict)]  # fmt: skip
    reinstated = any(m > 0 for m in moves)
    withdrawn = reinstated or any(m < 0 for m in moves) or dispute.get("status") == "lost"
    return {step for step, done in (("withdrawn", withdrawn), ("reinstated", reinstated)) if done}


def _dispute_differences(gateway: StripeGateway) -> list[str]:
    """Each dispute's lines (keys dispute:<id>:withdrawn and :reinstated) beside what Stripe
    did with its money: a webhook lost, or a line written for money Stripe never moved."""
    differences = []
    lines: dict[str, dict[str, LedgerEntry]] = {}
    for entry in LedgerEntry.objects.filter(idempotency_key__startswith="dispute:"):
        dispute_id, _, step = entry.idempotency_key.removeprefix("dispute:").rpartition(":")
        lines.setdefault(dispute_id, {})[step] = entry
    for dispute in gateway.disputes_all():
        pi_id = _id(dispute.get("payment_intent"))
        if not pi_id and dispute.get("charge"):
            charge = gateway.charge_retrieve(charge_id=_id(dispute["charge"]))
            pi_id = _id(charge.get("payment_intent"))
        ours = lines.pop(dispute["id"], {})
        top_ups = TopUp.objects.filter(stripe_payment_intent_id=pi_id).exclude(
            stripe_payment_intent_id=""
        )
        top_up = top_ups.select_related("organization").first()
        if top_up is None:
            continue  # not a top-up's payment (a charge of ours with no top-up is listed above)
        label = f"{top_up.organization.public_id}: dispute {dispute['id']} of top-up {top_up.pk}"
        amount = int(dispute.get("amount") or 0)
        for step, sign in (("withdrawn", -1), ("reinstated", 1)):
            done, entry = step in _dispute_moves(dispute), ours.get(step)
            if done and entry is None:
                differences.append(f"{label}: Stripe has the funds {step} ({amount} "
                                   f"{dispute.get('currency')}) but there is no line for it here")  # fmt: skip
            elif entry is not None and not done:
                differences.append(f"{label}: the {step} line of {entry.amount_minor} is here "
                                   f"but Stripe has not {step} the funds ({dispute.get('status')})")  # fmt: skip
            elif entry is not None and entry.amount_minor != sign * amount:
                differences.append(f"{label}: the {step} line is {entry.amount_minor} here, "
                                   f"{sign * amount} at Stripe")  # fmt: skip
    for dispute_id, ours in sorted(lines.items()):
        for step, entry in sorted(ours.items()):
            differences.append(f"organisation {entry.organization_id}: the {step} line of "
                               f"{entry.amount_minor} is of dispute {dispute_id}, which Stripe "
                               "does not have")  # fmt: skip
    return differences


def _id(value) -> str:
    """An id Stripe gives as a string, or as the object when expanded."""
    return (value.get("id") if isinstance(value, dict) else value) or ""
