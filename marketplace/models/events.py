"""Events: what changed, for integrators (GET /api/v1/events and webhooks).

An event is written in the same transaction as the change it reports (an outbox), so none is
lost when the change commits and none is invented when it rolls back. `data` is the object as
the API showed it at that moment.

`created_at` is stamped when the row is built, but the row becomes visible only when its
transaction commits, so `created_at` order is not the order events become visible in. `txid`
(the writing transaction's id) is what a forward poll orders by: see selectors/events.py.
"""

from django.db import models
from django.utils import timezone

from marketplace import ids
from marketplace.models.core import Organization

__all__ = ["EventType", "Event", "SnapshotXmin", "TransactionIdField"]


class EventType(models.TextChoices):
    RESERVATION_CREATED = "reservation.created"
    RESERVATION_SCHEDULED = "reservation.scheduled"
    RESERVATION_PROVISIONING = "reservation.provisioning"
    RESERVATION_ACTIVE = "reservation.active"
    RESERVATION_INTERRUPTION_SCHEDULED = "reservation.interruption_scheduled"
    RESERVATION_INTERRUPTION_WITHDRAWN = "reservation.interruption_withdrawn"
    RESERVATION_PREEMPTED = "reservation.preempted"
    RESERVATION_EXTENDED = "reservation.extended"
    RESERVATION_CANCELLED = "reservation.cancelled"
    RESERVATION_COMPLETED = "reservation.completed"
    RESERVATION_FAILED = "reservation.failed"
    RESERVATION_MOVED = "reservation.moved"
    LISTING_CREATED = "listing.created"
    LISTING_SOLD = "listing.sold"
    LISTING_WITHDRAWN = "listing.withdrawn"
    LISTING_EXPIRED = "listing.expired"
    LISTING_RETURNED = "listing.returned"
    PAYMENT_SUCCEEDED = "payment.succeeded"
    PAYMENT_FAILED = "payment.failed"
    TOP_UP_SUCCEEDED = "top_up.succeeded"
    BALANCE_LOW = "balance.low"
    FUNDING_SUSPENDED = "funding.suspended"
    INVOICE_FINALIZED = "invoice.finalized"
    INVOICE_PAID = "invoice.paid"
    INVOICE_PAYMENT_FAILED = "invoice.payment_failed"
    API_KEY_CREATED = "api_key.created"
    API_KEY_REVOKED = "api_key.revoked"
    MEMBER_ADDED = "member.added"
    MEMBER_REMOVED = "member.removed"


class TransactionIdField(models.Field):
    """A PostgreSQL xid8 (a 64-bit transaction id that never wraps), read as an int.

    Sent to PostgreSQL as text, which it casts to xid8 (there is no xid8 = bigint operator)."""

    empty_strings_allowed = False
    description = "PostgreSQL transaction id (xid8)"
    # Set by the database (a trigger), so an insert reads it back, the ORM's and model_insert.
    db_returning = True

    def db_type(self, connection) -> str:
        return "xid8"

    def from_db_value(self, value, expression, connection):
        return None if value is None else int(value)

    def to_python(self, value):
        return None if value is None else int(value)

    def get_prep_value(self, value):
        return None if value is None else str(int(value))


class SnapshotXmin(models.Func):
    """The oldest transaction still in flight as this statement's snapshot sees it: every
    transaction below it has ended, so no row with a lower txid can still appear."""

    template = "pg_snapshot_xmin(pg_current_snapshot())"
    output_field = TransactionIdField()


class Event(models.Model):
    public_id = models.CharField(max_length=32, unique=True, default=ids.event_id, editable=False)
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="events")
    type = models.CharField(max_length=64, choices=EventType.choices)
    object_type = models.CharField(max_length=32, help_text="reservation, top_up, invoice, …")
    object_id = models.CharField(max_length=64, help_text="The object's public id.")
    data = models.JSONField(help_text="The object as the API showed it when the event happened.")
    created_at = models.DateTimeField(default=timezone.now)
    # Set by the database on insert, whatever the INSERT says (a trigger, migration 0037):
    # None on an instance until it is read back. Events written before it have 0.
    txid = TransactionIdField(
        editable=False, help_text="The id of the transaction that wrote the event (xid8)."
    )

    class Meta:
        indexes = [
            models.Index(fields=["organization", "txid", "id"], name="event_org_txid"),
            models.Index(fields=["organization", "-created_at", "-id"], name="event_org_created"),
            models.Index(fields=["organization", "object_id"], name="event_org_object"),
            models.Index(fields=["created_at"], name="event_created"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(type__in=EventType.values), name="event_type_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.public_id} {self.type}"
