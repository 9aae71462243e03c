"""The output serializers the services share with the API: an event shows its object as the
API does (a reservation, an API key, a member), and a webhook delivery's body is the event as
the API shows it. This module imports no services (models, rules and reads only), so the
event writer and the webhook sender import it at module top, as do the API's modules.
"""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from config.api.serializers import Serializer
from marketplace.models import ApiKeyScope, EventType, ReservationStatus, Role, Term, Tier
from marketplace.rules import PREEMPTIBLE_STATUSES
from marketplace.selectors.reservations import (
    reservation_charged,
    reservation_elapsed_seconds,
    reservation_remaining_seconds,
)

__all__ = ["ReservationOutput", "ApiKeyOutput", "MemberOutput", "EventOutput"]


class InterruptionOutput(Serializer):
    at = serializers.DateTimeField(help_text="When the reservation will be preempted.")
    reason = serializers.CharField()


class ChargedField(serializers.DecimalField):
    """A reservation's charge so far, loaded for a whole page at once where the view can."""

    def get_attribute(self, instance):
        return reservation_charged(instance)


class ReservationOutput(Serializer):
    id = serializers.CharField(source="public_id")
    status = serializers.ChoiceField(choices=ReservationStatus.choices)
    status_reason = serializers.CharField()
    interruption = serializers.SerializerMethodField(
        help_text="Interruptible reservations: the notice of a coming preemption (a grid "
        "curtailment of the site), until it happens; null otherwise."
    )
    gpu_model = serializers.CharField(source="gpu_model.slug")
    site = serializers.CharField(source="site.slug")
    gpu_count = serializers.IntegerField()
    tier = serializers.ChoiceField(choices=Tier.choices)
    term = serializers.ChoiceField(choices=Term.choices)
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    currency = serializers.CharField()
    price_per_gpu_hour = serializers.DecimalField(max_digits=12, decimal_places=4)
    total = serializers.DecimalField(source="total_amount", max_digits=14, decimal_places=2)
    charged = ChargedField(
        max_digits=14,
        decimal_places=2,
        read_only=True,
        help_text="Charged so far: usage and commitments less refunds and credits (the booked "
        "total is `total`). While it runs, the cost so far (usage is metered every minute); "
        "once it has ended, the final amount.",
    )
    elapsed_seconds = serializers.SerializerMethodField(
        help_text="How long it has run (or ran), outages included; null before it starts."
    )
    remaining_seconds = serializers.SerializerMethodField(
        help_text="Time left while it is active; null otherwise."
    )
    quote = serializers.CharField(source="quote.public_id", allow_null=True, default=None)
    activated_at = serializers.DateTimeField(allow_null=True)
    released_at = serializers.DateTimeField(allow_null=True)
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()

    def get_elapsed_seconds(self, reservation) -> int | None:
        return reservation_elapsed_seconds(reservation)

    def get_remaining_seconds(self, reservation) -> int | None:
        return reservation_remaining_seconds(reservation)

    @extend_schema_field(InterruptionOutput(allow_null=True))
    def get_interruption(self, reservation) -> dict | None:
        # Shown until the preemption happens (or the reservation ends first).
        if reservation.preempt_at is None or reservation.status not in PREEMPTIBLE_STATUSES:
            return None
        return InterruptionOutput(
            {"at": reservation.preempt_at, "reason": reservation.preempt_reason}
        ).data


class ApiKeyOutput(Serializer):
    id = serializers.CharField(source="public_id")
    name = serializers.CharField()
    prefix = serializers.CharField(help_text="The visible start of the secret, to recognise it.")
    scopes = serializers.ListField(child=serializers.ChoiceField(choices=ApiKeyScope.choices))
    created_by = serializers.CharField(source="created_by.username", allow_null=True, default=None)
    created_at = serializers.DateTimeField()
    last_used_at = serializers.DateTimeField(
        allow_null=True, help_text="Updated at most once a minute."
    )
    revoked_at = serializers.DateTimeField(allow_null=True)


class UserOutput(Serializer):
    username = serializers.CharField()
    email = serializers.EmailField()


class MemberOutput(Serializer):
    id = serializers.CharField(source="public_id")
    user = UserOutput()
    role = serializers.ChoiceField(choices=Role.choices)
    created_at = serializers.DateTimeField()


class EventDataOutput(Serializer):
    object = serializers.JSONField(
        source="data", help_text="The object as the API showed it when the event happened."
    )


class EventOutput(Serializer):
    """Also the body of every webhook delivery."""

    id = serializers.CharField(source="public_id")
    object = serializers.SerializerMethodField()
    type = serializers.ChoiceField(choices=EventType.choices)
    created = serializers.DateTimeField(source="created_at")
    organization = serializers.CharField(source="organization.public_id")
    object_type = serializers.CharField(help_text="reservation, top_up, invoice, api_key, member…")
    object_id = serializers.CharField(help_text="The object's id (res_…, key_…, mem_…).")
    data = EventDataOutput(source="*")

    def get_object(self, event) -> str:
        return "event"
