"""The Stripe outbox: every Stripe write is a row first, sent after commit, retried with backoff.

A service that needs a Stripe write calls outbox_enqueue inside its own transaction; the row
commits (or not) with the change that needs it. On commit the sender task is queued; if Redis
is down or the worker dies, billing.tasks.outbox_flush finds the due row later. The sender
claims the row in one statement (so two workers never send the same message at once), calls
Stripe with no transaction open, then records the result under the row lock; Stripe's
idempotency key (ours, derived from the record) makes a resend after a crash return the
first result instead of charging twice.
"""

import logging
from collections.abc import Callable
from datetime import timedelta

from django.core.exceptions import ObjectDoesNotExist
from django.db import transaction
from django.utils import timezone

from billing.models import OutboxMessage, OutboxStatus
from billing.stripe_gateway import (
    PermanentStripeError,
    StripeGateway,
    TransientStripeError,
    get_gateway,
)
from config.celery import task_enqueue
from config.outbox import outbox_backoff as _backoff
from config.outbox import outbox_claim

__all__ = [
    "OutboxHandler",
    "OutboxRefused",
    "outbox_handler",
    "outbox_enqueue",
    "outbox_send",
    "outbox_due_ids",
    "outbox_backoff",
    "MAX_ATTEMPTS",
    "CLAIM_LEASE",
]

logger = logging.getLogger(__name__)
SEND_TASK = "billing.tasks.outbox_send"

MAX_ATTEMPTS = 25  # with the capped backoff below, about a day of retrying


class OutboxRefused(Exception):
    """Raised by a handler's send, before calling Stripe, when our own records say the write
    must not be made (a top-up of an organisation staff suspended since): the message fails
    at once with this reason (handler.failed), and is never sent."""


class OutboxHandler:
    """How to send one kind of message and what its result means for our records."""

    def send(self, gateway: StripeGateway, message: OutboxMessage) -> dict:
        """Call Stripe (no transaction open) and return its answer; OutboxRefused instead of
        calling it when the write must no longer be made."""
        raise NotImplementedError

    def succeeded(self, message: OutboxMessage, result: dict) -> None:
        """Runs in the sender's transaction after a successful call."""

    def failed(self, message: OutboxMessage, error: str) -> None:
        """Runs in the sender's transaction after a terminal failure."""


_HANDLERS: dict[str, OutboxHandler] = {}


def outbox_handler(kind: str) -> Callable[[type[OutboxHandler]], type[OutboxHandler]]:
    def register(cls: type[OutboxHandler]) -> type[OutboxHandler]:
        _HANDLERS[kind] = cls()
        return cls

    return register


def outbox_backoff(attempts: int) -> timedelta:
    """30 s, 1 min, 2 min, … capped at one hour."""
    return _backoff(attempts, first=timedelta(seconds=30), cap=timedelta(hours=1))


def outbox_enqueue(*, kind: str, payload: dict, idempotency_key: str) -> OutboxMessage:
    """Record a Stripe write in the caller's transaction; it is sent after commit.

    The same key twice returns the first message (a repeat of the business action is a
    repeat of the same Stripe write, not a second one).
    """
    if kind not in _HANDLERS:
        raise ValueError(f"no outbox handler for {kind!r}")
    message, created = OutboxMessage.objects.get_or_create(
        idempotency_key=idempotency_key,
        defaults={"kind": kind, "payload": payload, "next_attempt_at": timezone.now()},
    )
    if created:
        transaction.on_commit(lambda: _enqueue_quietly(message.pk))
    return message


def _enqueue_quietly(message_id: int) -> None:
    # The row is already committed: if the broker is down, outbox_flush sends it later.
    try:
        task_enqueue(SEND_TASK, [message_id])
    except Exception:  # noqa: BLE001 — any broker failure is recoverable by the sweeper
        logger.warning("could not queue outbox message %s; the sweeper will send it", message_id)


# How long a claimed message is left to its sender before another may send it again (with
# the same idempotency key, so Stripe answers with the first result). Far above the Stripe
# client's own timeout.
CLAIM_LEASE = timedelta(minutes=5)


def outbox_send(*, message_id: int, gateway: StripeGateway | None = None) -> str:
    """Send one due message. Returns its status afterwards ("" if busy or not found).

    Claim → call → record: the claim is one autocommitted UPDATE (the attempt counted and the
    message pushed out of every sender's reach for CLAIM_LEASE); the Stripe call runs with
    no transaction open and no row locked; the result is recorded in a short transaction
    under the row lock. A sender that dies after the call leaves the message to be sent again
    once the lease lapses, with the same idempotency key.
    """
    claimed = outbox_claim(OutboxMessage, message_id=message_id, lease=CLAIM_LEASE)
    if claimed is None:
        current = OutboxMessage.objects.filter(pk=message_id).values_list("status", flat=True)
        status = current.first()
        # Pending but not claimable: another sender has it, or it is not due yet.
        return "" if status is None or status == OutboxStatus.PENDING else status
    message = OutboxMessage.objects.get(pk=message_id)
    handler = _HANDLERS[message.kind]
    outcome: tuple[str, object]
    try:
        outcome = ("sent", handler.send(gateway or get_gateway(), message))
    except TransientStripeError as exc:
        outcome = ("transient", exc)
    except PermanentStripeError as exc:
        outcome = ("permanent", exc)
    except ObjectDoesNotExist as exc:
        outcome = ("missing", exc)
    except OutboxRefused as exc:
        outcome = ("refused", exc)
    return _outbox_record(message_id=message_id, outcome=outcome)


@transaction.atomic
def _outbox_record(*, message_id: int, outcome: tuple[str, object]) -> str:
    message = OutboxMessage.objects.select_for_update().get(pk=message_id)
    if message.status != OutboxStatus.PENDING:
        return message.status  # recorded by a sender whose lease had lapsed
    handler = _HANDLERS[message.kind]
    kind, value = outcome
    if kind == "transient":
        message.last_error = f"transient: {value}"[:2000]
        if message.attempts >= MAX_ATTEMPTS:
            message.status = OutboxStatus.FAILED
            handler.failed(message, message.last_error)
        else:
            message.next_attempt_at = timezone.now() + outbox_backoff(message.attempts)
        logger.warning("outbox %s attempt %s failed: %s", message.pk, message.attempts, value)
    elif kind == "permanent":
        message.status = OutboxStatus.FAILED
        message.last_error = f"{value.code or 'error'}: {value}"[:2000]
        # A declined PaymentIntent still exists at Stripe: keep its id for reconciliation.
        message.stripe_object_id = value.payment_intent_id[:64]
        handler.failed(message, str(value))
    elif kind == "refused":  # Stripe was not called: nothing to reconcile
        message.status = OutboxStatus.FAILED
        message.last_error = f"refused: {value}"[:2000]
        handler.failed(message, str(value))
    elif kind == "missing":
        # The record the message was written for is gone: nothing to send, ever.
        message.status = OutboxStatus.FAILED
        message.last_error = f"record missing: {value}"[:2000]
    else:
        message.status = OutboxStatus.SENT
        message.sent_at = timezone.now()
        message.last_error = ""
        message.stripe_object_id = str(value.get("id", ""))[:64]
        handler.succeeded(message, value)
    message.save()
    return message.status


def outbox_due_ids(*, limit: int = 100) -> list[int]:
    """Ids of pending messages that are due, oldest first (for the sweeper)."""
    return list(
        OutboxMessage.objects.filter(
            status=OutboxStatus.PENDING, next_attempt_at__lte=timezone.now()
        )
        .order_by("next_attempt_at", "id")
        .values_list("id", flat=True)[:limit]
    )
