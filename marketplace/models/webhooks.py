"""Webhook endpoints of an organisation, and the delivery of events to them.

A delivery row is written with its event, in the same transaction, for every enabled endpoint
subscribed to the event's type: that row is the outbox the sender works from, so an event is
delivered at least once. Each try is a WebhookAttempt (status, time, duration, an excerpt of
the answer).
"""

from datetime import datetime

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from marketplace import ids
from marketplace.models.core import Organization
from marketplace.models.events import Event, EventType

__all__ = ["WebhookEndpoint", "DeliveryStatus", "WebhookDelivery", "WebhookAttempt"]


class WebhookEndpoint(models.Model):
    public_id = models.CharField(
        max_length=32, unique=True, default=ids.webhook_endpoint_id, editable=False
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="webhook_endpoints"
    )
    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=200, blank=True, default="")
    event_types = models.JSONField(
        default=list, blank=True, help_text="The event types sent; empty: every type."
    )
    # What its subscription may not reach: set with event_types by a caller who may not see
    # these families (apis/events.py EVENT_FAMILY_LISTS), and added to when such a caller
    # changes the URL or rotates the secret, so a key cannot subscribe itself to them.
    withheld_event_families = models.JSONField(
        default=list,
        blank=True,
        help_text="Event type prefixes (api_key.) never sent to it, whatever event_types says.",
    )
    enabled = models.BooleanField(default=True)
    disabled_reason = models.TextField(blank=True, default="")
    # The signing secret must be readable to sign with (as Stripe's are); it is shown to the
    # customer once, at creation or rotation, and never again.
    secret = models.CharField(max_length=80)
    # The secrets replaced by rotations that still sign, oldest first, each until its own
    # expiry: [{"secret": "whsec_…", "expires_at": ISO 8601}].
    previous_secrets = models.JSONField(default=list, blank=True)
    failing_since = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Deliveries have failed since then, without a success: disabled after "
        "WEBHOOK_RETRY_FOR.",
    )
    last_success_at = models.DateTimeField(null=True, blank=True)
    # The sender's lease: one worker at a time sends to an endpoint, oldest event first.
    sending_until = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "enabled"], name="webhook_endpoint_org")]

    def __str__(self) -> str:
        return f"{self.public_id} {self.url}"

    def previous_secrets_signing(self, now: datetime | None = None) -> list[tuple[str, datetime]]:
        """The replaced secrets that still sign at now, with when each stops, oldest first."""
        now = now or timezone.now()
        kept = [
            (k["secret"], datetime.fromisoformat(k["expires_at"])) for k in self.previous_secrets
        ]
        return [(secret, until) for secret, until in kept if now < until]

    @property
    def withheld_event_types(self) -> list[str]:
        return [t for t in EventType.values if t.startswith(tuple(self.withheld_event_families))]

    @property
    def events_words(self) -> str:
        """What it is sent, in words: its types, or every event (less what it withholds)."""
        if self.event_types:
            return ", ".join(self.event_types)
        if self.withheld_event_families:
            families = ", ".join(f"{family}*" for family in self.withheld_event_families)
            return f"every event except {families} (set up with an API key)"
        return "every event"

    @property
    def previous_secret_expiries(self) -> list[datetime]:
        return [until for _, until in self.previous_secrets_signing()]

    @property
    def previous_secret_expires_at(self) -> datetime | None:
        """When the last replaced secret stops signing; None: none signs."""
        return max(self.previous_secret_expiries, default=None)


class DeliveryStatus(models.TextChoices):
    PENDING = "pending"  # not yet delivered; next_attempt_at says when it is tried (again)
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # retried for WEBHOOK_RETRY_FOR without success, or its endpoint disabled


class WebhookDelivery(models.Model):
    public_id = models.CharField(
        max_length=32, unique=True, default=ids.webhook_delivery_id, editable=False
    )
    endpoint = models.ForeignKey(
        WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries"
    )
    event = models.ForeignKey(Event, on_delete=models.CASCADE, related_name="deliveries")
    # The event's time, copied so the sender orders an endpoint's deliveries from one index.
    event_created_at = models.DateTimeField()
    status = models.CharField(
        max_length=10, choices=DeliveryStatus.choices, default=DeliveryStatus.PENDING
    )
    retry_from = models.DateTimeField(
        help_text="Tried until WEBHOOK_RETRY_FOR after this: the event's time, or a resend's."
    )
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["endpoint", "event"], name="webhook_delivery_once"),
            models.CheckConstraint(
                condition=Q(status__in=DeliveryStatus.values), name="webhook_delivery_status_valid"
            ),
        ]
        indexes = [
            models.Index(
                fields=["endpoint", "event_created_at", "id"],
                condition=Q(status="pending"),
                name="webhook_delivery_pending",
            ),
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="webhook_delivery_due",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.public_id} {self.status}"


class WebhookAttempt(models.Model):
    delivery = models.ForeignKey(
        WebhookDelivery, on_delete=models.CASCADE, related_name="attempt_set"
    )
    at = models.DateTimeField()
    duration_ms = models.PositiveIntegerField()
    succeeded = models.BooleanField()
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    response_excerpt = models.CharField(
        max_length=1000, blank=True, default="", help_text="The answer's first bytes, at most."
    )
    error = models.CharField(max_length=500, blank=True, default="")
    address = models.GenericIPAddressField(
        null=True, blank=True, help_text="The address actually connected to."
    )

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.delivery_id} at {self.at:%Y-%m-%d %H:%M:%S}"
