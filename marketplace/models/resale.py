"""Resale of reserved time: a term's holder lists whole GPUs of its allocation for a future
window, at an asking price; a buyer reserves them (marketplace.services.resale)."""

from decimal import Decimal

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q

from inventory.models import GpuModel, Node, Site
from marketplace import ids
from marketplace.models.core import Organization, Reservation, Tier

__all__ = ["ListingStatus", "RESALE_TIERS", "RESALE_TIER_CHOICES", "ResaleListing", "ResaleFee"]

# The tiers a listing may be offered at: the buyer's time is metered as it is used.
RESALE_TIERS = (Tier.ON_DEMAND, Tier.INTERRUPTIBLE)
RESALE_TIER_CHOICES = [(t.value, t.label) for t in RESALE_TIERS]


class ListingStatus(models.TextChoices):
    OPEN = "open"
    SOLD = "sold"
    WITHDRAWN = "withdrawn"
    # Its window began unsold: the seller keeps the time (beat marks it within a minute).
    EXPIRED = "expired"
    # Sold, then given back whole: its buyer left before the window began, so the time went
    # back to the seller's term and nothing was sold (services.resale.resale_unused_return).
    RETURNED = "returned"


# A listing that was bought: a sale (sold), or one its buyer gave back whole (returned).
_BOUGHT_STATUSES = (ListingStatus.SOLD, ListingStatus.RETURNED)


class ResaleListing(models.Model):
    """Whole GPUs of one node of a reserved term, offered for a window inside the term.

    Sold in parts: a sale narrows this row to what the buyer took (GPUs and window) and
    lists what is left as new open listings (parent = this one), so a sold row is a sale. A
    buyer that leaves early gives the rest of the window back to the seller: the row is
    narrowed again to the time the buyer held, or is `returned` if it held none of it.
    """

    public_id = models.CharField(max_length=32, unique=True, default=ids.listing_id, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="resale_listings"
    )
    reservation = models.ForeignKey(
        Reservation,
        on_delete=models.PROTECT,
        related_name="resale_listings",
        help_text="The seller's reserved term the GPUs come from.",
    )
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="remainders",
        help_text="The listing this one is what was left of after a partial sale.",
    )
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="+")
    gpu_model = models.ForeignKey(GpuModel, on_delete=models.PROTECT, related_name="+")
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="+")
    gpu_ids = ArrayField(models.BigIntegerField(), help_text="The listed GPUs, in index order.")
    gpu_count = models.PositiveIntegerField()
    tier = models.CharField(max_length=20, choices=Tier.choices)
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    currency = models.CharField(max_length=3)
    price_per_gpu_hour = models.DecimalField(max_digits=12, decimal_places=4)
    status = models.CharField(
        max_length=10, choices=ListingStatus.choices, default=ListingStatus.OPEN
    )
    buyer_reservation = models.OneToOneField(
        Reservation,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="resale_purchase",
    )
    fee_pct = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        null=True,
        blank=True,
        help_text="The platform's fee on this sale, fixed when it sold.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    sold_at = models.DateTimeField(null=True, blank=True)
    withdrawn_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(
        null=True, blank=True, help_text="When it was found unsold with its window begun."
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")), name="resale_listing_period_valid"
            ),
            models.CheckConstraint(
                condition=Q(gpu_count__gte=1), name="resale_listing_gpu_count_positive"
            ),
            models.CheckConstraint(
                condition=Q(price_per_gpu_hour__gt=0), name="resale_listing_price_positive"
            ),
            models.CheckConstraint(
                condition=Q(tier__in=[t.value for t in RESALE_TIERS]),
                name="resale_listing_tier_valid",
            ),
            models.CheckConstraint(
                condition=Q(status__in=ListingStatus.values), name="resale_listing_status_valid"
            ),
            # Bought (sold, or returned by its buyer) exactly when it has a buyer, with the
            # fee it sold at.
            models.CheckConstraint(
                condition=(
                    Q(status__in=_BOUGHT_STATUSES)
                    & Q(buyer_reservation__isnull=False)
                    & Q(fee_pct__isnull=False)
                    & Q(sold_at__isnull=False)
                )
                | (~Q(status__in=_BOUGHT_STATUSES) & Q(buyer_reservation__isnull=True)),
                name="resale_listing_sold_has_buyer",
            ),
        ]
        indexes = [
            models.Index(
                fields=["site", "gpu_model", "starts_at"],
                condition=Q(status="open"),
                name="resale_listing_open_idx",
            ),
            # The expiry sweep: open listings whose window has begun.
            models.Index(
                fields=["starts_at"],
                condition=Q(status="open"),
                name="resale_listing_open_start_idx",
            ),
            models.Index(fields=["organization", "-created_at"]),
        ]

    def __str__(self) -> str:
        return self.public_id


class ResaleFee(models.Model):
    """The platform's fee on resales, in per cent of the sale price; the newest row is in
    force (a sale keeps the fee it sold at)."""

    fee_pct = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        validators=[MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("100"))],
        help_text="Per cent of what the buyer is charged that the platform keeps.",
    )
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(fee_pct__gte=0) & Q(fee_pct__lte=100), name="resale_fee_pct_range"
            ),
        ]

    def __str__(self) -> str:
        return f"resale fee {self.fee_pct} %"
