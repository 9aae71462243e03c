"""The output serializers the services share with the API: an event shows its object as the
API does (a reservation, a resale listing, an API key, a member), and a webhook delivery's body
is the event as the API shows it. This module imports no services that write (models, rules,
reads, the funding gate's question and pricing's pure total rule only), so the event writer and
the webhook sender import it at module top, as do the API's modules.
"""

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from config.api.serializers import AmountField, Serializer
from marketplace.funding import funding_gate
from marketplace.models import (
    ApiKeyScope,
    EventType,
    ListingStatus,
    ReservationStatus,
    Role,
    Term,
    Tier,
)
from marketplace.rules import PREEMPTIBLE_STATUSES
from marketplace.selectors.resale import listing_for_sale
from marketplace.selectors.reservations import (
    reservation_charged,
    reservation_elapsed_seconds,
    reservation_remaining_seconds,
)
from marketplace.services.pricing import period_total

__all__ = [
    "ReservationOutput",
    "SaleOutput",
    "ListingOutput",
    "ApiKeyOutput",
    "MemberOutput",
    "EventOutput",
]


class InterruptionOutput(Serializer):
    at = serializers.DateTimeField(help_text="When the reservation will be preempted.")
    reason = serializers.CharField()


class ChargedField(AmountField):
    """A reservation's charge so far, loaded for a whole page at once where the view can."""

    def get_attribute(self, instance):
        return self.amount_with_currency(instance, reservation_charged(instance))


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
    total = AmountField(source="total_amount")
    charged = ChargedField(
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


class SaleOutput(Serializer):
    """What sold (the listing was narrowed to it) and what it has brought so far, in the
    listing's currency."""

    sold_at = serializers.DateTimeField()
    total = AmountField(
        help_text="The sale price: asking price × GPUs × hours of the window, if the buyer uses "
        "all of it.",
    )
    fee_pct = serializers.DecimalField(max_digits=5, decimal_places=2)
    proceeds = AmountField(
        help_text="Credited to your balance so far: what the buyer has been charged."
    )
    fees = AmountField(help_text="The platform's fee on the proceeds so far.")
    net = AmountField()


class ListingOutput(Serializer):
    """A resale listing (a sold one is a sale). Context `settled`: {listing id: (proceeds,
    fees)} read for a whole page at once; without it a sold listing reads its own."""

    id = serializers.CharField(source="public_id")
    status = serializers.ChoiceField(
        choices=ListingStatus.choices,
        help_text="open (for sale until its window begins), sold, withdrawn, expired (its "
        "window began unsold; the seller keeps the time; marked within a minute), or returned "
        "(sold, but its buyer left before the window began: the time is the seller's again).",
    )
    for_sale = serializers.SerializerMethodField(
        help_text="Open, its window not begun and its organisation not suspended by staff: a "
        "buyer can book it now."
    )
    reservation = serializers.CharField(source="reservation.public_id")
    parent = serializers.CharField(source="parent.public_id", allow_null=True, default=None)
    site = serializers.CharField(source="site.slug")
    gpu_model = serializers.CharField(source="gpu_model.slug")
    node = serializers.CharField(source="node.hostname")
    gpu_count = serializers.IntegerField()
    tier = serializers.CharField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    price_per_gpu_hour = serializers.DecimalField(max_digits=12, decimal_places=4)
    currency = serializers.CharField()
    created_at = serializers.DateTimeField()
    withdrawn_at = serializers.DateTimeField(allow_null=True)
    expired_at = serializers.DateTimeField(allow_null=True)
    sale = serializers.SerializerMethodField()

    def get_for_sale(self, listing) -> bool:
        return listing_for_sale(listing)

    @extend_schema_field(SaleOutput(allow_null=True))
    def get_sale(self, listing) -> dict | None:
        if listing.status != ListingStatus.SOLD:
            return None
        settled = self.context.get("settled")
        if settled is None:
            settled = funding_gate().resale_settled(listing_ids=[listing.pk])
        proceeds, fees = settled.get(listing.pk, (0, 0))
        seconds = int((listing.ends_at - listing.starts_at).total_seconds())
        return SaleOutput(
            {
                "sold_at": listing.sold_at,
                "currency": listing.currency,
                "total": period_total(
                    price_per_gpu_hour=listing.price_per_gpu_hour,
                    gpu_count=listing.gpu_count,
                    seconds=seconds,
                    currency=listing.currency,
                ),
                "fee_pct": listing.fee_pct,
                "proceeds": proceeds,
                "fees": fees,
                "net": proceeds - fees,
            }
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
    object_type = serializers.CharField(
        help_text="reservation, listing, top_up, invoice, api_key, member…"
    )
    object_id = serializers.CharField(help_text="The object's id (res_…, lst_…, key_…, mem_…).")
    data = EventDataOutput(source="*")

    def get_object(self, event) -> str:
        return "event"
