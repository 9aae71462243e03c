"""The one place that talks to Stripe.

Written for Stripe's current API (pinned by settings.STRIPE_API_VERSION) through the official
library's StripeClient. Decimal amounts become integer minor units here and nowhere else.
Every write carries an idempotency key that the caller derives from our own record.

Errors are sorted into two kinds the outbox understands: TransientStripeError (network,
rate limit, 5xx: retry later) and PermanentStripeError (card declined, invalid request:
do not retry). CardDeclined is the permanent error of a refused charge.
"""

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import stripe
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from billing.money import to_minor_units

__all__ = [
    "TransientStripeError",
    "PermanentStripeError",
    "StripeNotConfigured",
    "CardDeclined",
    "StripeGateway",
    "build_client",
    "get_gateway",
]


class TransientStripeError(Exception):
    pass


class PermanentStripeError(Exception):
    def __init__(self, message: str, *, code: str = "", payment_intent_id: str = ""):
        super().__init__(message)
        self.code = code
        self.payment_intent_id = payment_intent_id


class CardDeclined(PermanentStripeError):
    pass


class StripeNotConfigured(ImproperlyConfigured):
    """STRIPE_SECRET_KEY is empty: this deployment takes no card payments."""


def build_client(*, http_client: stripe.HTTPClient | None = None) -> stripe.StripeClient:
    if not settings.STRIPE_SECRET_KEY:
        raise StripeNotConfigured("STRIPE_SECRET_KEY is not set: billing through Stripe is off")
    base = {"api": settings.STRIPE_API_BASE} if settings.STRIPE_API_BASE else None
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY,
        stripe_version=settings.STRIPE_API_VERSION,
        base_addresses=base,
        # The outbox retries with backoff across minutes; within one call a single quick
        # retry covers a dropped connection without holding a worker.
        max_network_retries=1,
        # Not the library's 80 s: a card call runs while its request waits (and its
        # Idempotency-Key stays in flight), so both tries end well within a minute.
        http_client=http_client or stripe.RequestsClient(timeout=settings.STRIPE_TIMEOUT_SECONDS),
    )


def _translate(exc: stripe.StripeError) -> Exception:
    if isinstance(exc, stripe.CardError):
        error = exc.error
        pi = getattr(error, "payment_intent", None) if error is not None else None
        return CardDeclined(
            exc.user_message or str(exc),
            code=exc.code or "card_declined",
            payment_intent_id=(pi.get("id", "") if isinstance(pi, dict) else getattr(pi, "id", ""))
            if pi
            else "",
        )
    if isinstance(exc, stripe.APIConnectionError | stripe.RateLimitError):
        return TransientStripeError(str(exc))
    if exc.http_status is None or exc.http_status >= 500:
        return TransientStripeError(str(exc))
    if exc.http_status == 402:
        return CardDeclined(exc.user_message or str(exc), code=exc.code or "card_declined")
    if exc.http_status == 409:  # idempotency key in use by a concurrent request: retry
        return TransientStripeError(str(exc))
    return PermanentStripeError(str(exc), code=exc.code or "")


def _options(idempotency_key: str | None) -> dict:
    return {"idempotency_key": idempotency_key} if idempotency_key else {}


@dataclass
class StripeGateway:
    client: stripe.StripeClient

    def _call(self, fn, *args) -> Any:
        try:
            result = fn(*args)
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return result.to_dict() if hasattr(result, "to_dict") else result

    # --- customers and payment methods ------------------------------------------------
    def customer_create(
        self, *, name: str, email: str, organization_public_id: str, idempotency_key: str
    ) -> dict:
        params = {"name": name, "metadata": {"organization": organization_public_id}}
        if email:
            params["email"] = email
        return self._call(self.client.v1.customers.create, params, _options(idempotency_key))

    def customer_set_default_payment_method(
        self, *, customer_id: str, payment_method_id: str, idempotency_key: str
    ) -> dict:
        params = {"invoice_settings": {"default_payment_method": payment_method_id}}
        return self._call(
            self.client.v1.customers.update, customer_id, params, _options(idempotency_key)
        )

    def setup_intent_create(self, *, customer_id: str, idempotency_key: str) -> dict:
        params = {"customer": customer_id, "usage": "off_session", "payment_method_types": ["card"]}
        return self._call(self.client.v1.setup_intents.create, params, _options(idempotency_key))

    def setup_intent_retrieve(self, *, setup_intent_id: str) -> dict:
        return self._call(self.client.v1.setup_intents.retrieve, setup_intent_id)

    def payment_method_retrieve(self, *, payment_method_id: str) -> dict:
        return self._call(self.client.v1.payment_methods.retrieve, payment_method_id)

    def payment_method_attach(
        self, *, payment_method_id: str, customer_id: str, idempotency_key: str
    ) -> dict:
        return self._call(
            self.client.v1.payment_methods.attach,
            payment_method_id,
            {"customer": customer_id},
            _options(idempotency_key),
        )

    def payment_method_detach(self, *, payment_method_id: str, idempotency_key: str) -> dict:
        return self._call(
            self.client.v1.payment_methods.detach, payment_method_id, {}, _options(idempotency_key)
        )

    # --- money ------------------------------------------------------------------------
    def payment_intent_create_off_session(
        self,
        *,
        customer_id: str,
        payment_method_id: str,
        amount: Decimal,
        currency: str,
        metadata: dict[str, str],
        idempotency_key: str,
    ) -> dict:
        params = {
            "amount": to_minor_units(amount, currency),
            "currency": currency,
            "customer": customer_id,
            "payment_method": payment_method_id,
            "off_session": True,
            "confirm": True,
            "metadata": metadata,
        }
        return self._call(self.client.v1.payment_intents.create, params, _options(idempotency_key))

    def refund_create(
        self,
        *,
        payment_intent_id: str,
        amount: Decimal,
        currency: str,
        metadata: dict[str, str],
        idempotency_key: str,
    ) -> dict:
        params = {
            "payment_intent": payment_intent_id,
            "amount": to_minor_units(amount, currency),
            "metadata": metadata,
        }
        return self._call(self.client.v1.refunds.create, params, _options(idempotency_key))

    def meter_event_create(
        self,
        *,
        event_name: str,
        identifier: str,
        customer_id: str,
        value: int,
        timestamp: datetime,
        idempotency_key: str,
    ) -> dict:
        """One Billing Meter event. `value` is a whole quantity: for postpaid billing, money in
        minor units (the meter's price is 1 minor unit per unit), never a float."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"meter value must be int, not {type(value).__name__}")
        params = {
            "event_name": event_name,
            "identifier": identifier,
            # Stripe reads the payload as strings: the customer mapping key and the value key.
            "payload": {"stripe_customer_id": customer_id, "value": str(value)},
            "timestamp": int(timestamp.timestamp()),
        }
        return self._call(
            self.client.v1.billing.meter_events.create, params, _options(idempotency_key)
        )

    def customer_balance_credit(
        self,
        *,
        customer_id: str,
        amount: Decimal,
        currency: str,
        description: str,
        metadata: dict[str, str],
        idempotency_key: str,
    ) -> dict:
        """A credit on the customer's balance (Stripe applies it to the next invoice):
        POST /v1/customers/{id}/balance_transactions with a negative amount."""
        minor = to_minor_units(amount, currency)
        if minor <= 0:
            raise ValueError(f"a credit is a positive amount, not {amount}")
        params = {
            "amount": -minor,
            "currency": currency,
            "description": description,
            "metadata": metadata,
        }
        return self._call(
            self.client.v1.customers.balance_transactions.create,
            customer_id,
            params,
            _options(idempotency_key),
        )

    # --- reads for reconciliation -----------------------------------------------------
    def payment_intents_all(self, *, created_gte: int | None = None) -> list[dict]:
        """Every PaymentIntent (auto-paginated), optionally created at or after a Unix time."""
        params: dict = {"limit": 100}
        if created_gte is not None:
            params["created"] = {"gte": created_gte}
        try:
            page = self.client.v1.payment_intents.list(params)
            return [pi.to_dict() for pi in page.auto_paging_iter()]
        except stripe.StripeError as exc:
            raise _translate(exc) from exc

    def disputes_all(self) -> list[dict]:
        """Every dispute (auto-paginated), each with its balance transactions (the money
        Stripe withdrew and reinstated)."""
        try:
            page = self.client.v1.disputes.list({"limit": 100})
            return [dispute.to_dict() for dispute in page.auto_paging_iter()]
        except stripe.StripeError as exc:
            raise _translate(exc) from exc

    def payment_intent_retrieve(self, *, payment_intent_id: str) -> dict:
        return self._call(self.client.v1.payment_intents.retrieve, payment_intent_id)

    def refund_retrieve(self, *, refund_id: str) -> dict:
        return self._call(self.client.v1.refunds.retrieve, refund_id)

    def charge_retrieve(self, *, charge_id: str) -> dict:
        return self._call(self.client.v1.charges.retrieve, charge_id)

    def refunds_for_payment_intent(self, *, payment_intent_id: str) -> list[dict]:
        try:
            page = self.client.v1.refunds.list({"payment_intent": payment_intent_id, "limit": 100})
            return [refund.to_dict() for refund in page.auto_paging_iter()]
        except stripe.StripeError as exc:
            raise _translate(exc) from exc

    def construct_event(self, *, payload: bytes, signature: str, secret: str) -> dict:
        """Verify a webhook's signature and parse it; raises stripe.SignatureVerificationError."""
        return self.client.construct_event(payload, signature, secret).to_dict()


_gateway_override: StripeGateway | None = None


def get_gateway() -> StripeGateway:
    """The gateway built from settings (read at call time, so tests can point it elsewhere)."""
    if _gateway_override is not None:
        return _gateway_override
    return StripeGateway(build_client())


def set_gateway_override(gateway: StripeGateway | None) -> None:
    """Tests only: route every call through a given gateway (e.g. a recording HTTP client)."""
    global _gateway_override
    _gateway_override = gateway
