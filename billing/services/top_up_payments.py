"""A top-up's payment settled: the PaymentIntent the outbox creates off-session, its result,
and the webhook's word on it. Crediting the balance (topups) is followed by the funding
state's update (funding), so this module sits above both and neither imports the other back.
"""

from django.db import transaction

from billing.models import BillingAccount, OutboxMessage, TopUp
from billing.money import from_minor_units
from billing.services.funding import funding_state_update
from billing.services.outbox import OutboxHandler, OutboxRefused, outbox_handler
from billing.services.topups import top_up_fail, top_up_succeed
from billing.stripe_gateway import StripeGateway

__all__ = ["PaymentIntentCreate", "top_up_credit"]


@transaction.atomic
def top_up_credit(*, top_up_id: int, payment_intent_id: str) -> bool:
    """Credit a top-up once (top_up_succeed), then move the organisation's funding state by
    its new balance (a suspended account may be restored). True if this call credited it."""
    credited = top_up_succeed(top_up_id=top_up_id, payment_intent_id=payment_intent_id)
    if credited:
        organization = TopUp.objects.select_related("organization").get(pk=top_up_id).organization
        funding_state_update(organization=organization)
    return credited


@outbox_handler("payment_intent.create")
class PaymentIntentCreate(OutboxHandler):
    def send(self, gateway: StripeGateway, message: OutboxMessage) -> dict:
        top_up = TopUp.objects.select_related("organization").get(pk=message.payload["top_up_id"])
        if top_up.organization.suspended_at is not None and message.attempts <= 1:
            # Queued before staff suspended it (a stolen card, say): read as late as the call
            # allows (no row is locked across a call to Stripe). Only on the first try: after
            # one that may have reached Stripe, the call is made again with the same
            # idempotency key, so that Stripe's answer (that charge, or none) is what the
            # top-up records, never "not charged" beside a charge that went through.
            raise OutboxRefused(
                "Switchyard staff suspended the organisation before it was sent to your card "
                "(top up again once the suspension is lifted)"
            )
        account = BillingAccount.objects.get(organization=top_up.organization)
        return gateway.payment_intent_create_off_session(
            customer_id=account.stripe_customer_id,
            payment_method_id=top_up.payment_method_id,
            amount=from_minor_units(top_up.amount_minor, top_up.currency),
            currency=top_up.currency,
            metadata={"top_up": str(top_up.pk), "organization": top_up.organization.public_id},
            idempotency_key=message.idempotency_key,
        )

    def succeeded(self, message: OutboxMessage, result: dict) -> None:
        top_up_id = message.payload["top_up_id"]
        status = result.get("status")
        if status == "succeeded":
            top_up_credit(top_up_id=top_up_id, payment_intent_id=result["id"])
        elif status in ("requires_action", "requires_payment_method", "canceled"):
            # Off-session: nobody is there to authenticate; the customer must top up on-session.
            top_up_fail(
                top_up_id=top_up_id, reason=f"payment {status}", payment_intent_id=result["id"]
            )
        else:  # processing: the webhook settles it
            TopUp.objects.filter(pk=top_up_id).update(stripe_payment_intent_id=result["id"])

    def failed(self, message: OutboxMessage, error: str) -> None:
        top_up_fail(
            top_up_id=message.payload["top_up_id"],
            reason=error,
            payment_intent_id=message.stripe_object_id,
        )
