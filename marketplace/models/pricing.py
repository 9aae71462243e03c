"""Staff-editable pricing inputs: rate cards and the pricing policy.

The price itself is computed by the pure function marketplace.services.pricing.price_quote.
"""

from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q

from inventory.models import GpuModel, Site

__all__ = ["RateCard", "PricingPolicy", "EnergyBasis", "BeyondHorizon"]

_PCT = [MinValueValidator(Decimal("0")), MaxValueValidator(Decimal("100"))]


class EnergyBasis(models.TextChoices):
    """Which span of the zone's power prices a tier is priced from."""

    HOUR = "hour", "The window's first hour (follows the hour's price)"
    WINDOW = "window", "The booked window, time-weighted"
    LONG = "long", "The window and the 30 days before it, time-weighted"


class BeyondHorizon(models.TextChoices):
    STATIC = "static", "The site's static energy price"
    LAST_KNOWN = "last_known", "The zone's last published price"


class RateCard(models.Model):
    """List price per GPU-hour of a GPU model; a row with a site overrides the model default."""

    gpu_model = models.ForeignKey(GpuModel, on_delete=models.CASCADE, related_name="rate_cards")
    site = models.ForeignKey(
        Site,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="rate_cards",
        help_text="Empty: the default for every site without its own rate.",
    )
    price_per_gpu_hour = models.DecimalField(
        max_digits=12, decimal_places=4, validators=[MinValueValidator(Decimal("0.0001"))]
    )
    currency = models.CharField(max_length=3, default="usd")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["gpu_model__slug", "site__slug"]
        constraints = [
            models.UniqueConstraint(
                fields=["gpu_model", "site"],
                condition=Q(site__isnull=False),
                name="ratecard_unique_model_site",
            ),
            models.UniqueConstraint(
                fields=["gpu_model"],
                condition=Q(site__isnull=True),
                name="ratecard_unique_model_default",
            ),
            models.CheckConstraint(
                condition=Q(price_per_gpu_hour__gt=0), name="ratecard_price_positive"
            ),
        ]

    def __str__(self) -> str:
        where = self.site.slug if self.site_id else "default"
        return f"{self.gpu_model.slug} @ {where}: {self.price_per_gpu_hour} {self.currency}/GPU-h"


class PricingPolicy(models.Model):
    """Discounts and the utilisation adjustment. The newest row is the one in force.

    price = list price × (1 − tier discount) × utilisation multiplier × energy multiplier,
    where the utilisation multiplier is 1 + slope × (utilisation − pivot) and the energy
    multiplier is 1 + pass-through × (the site's energy price ÷ the reference − 1); the result
    is then clamped to [floor, ceiling] × list price.
    """

    discount_1w_pct = models.DecimalField(max_digits=5, decimal_places=2, validators=_PCT)
    discount_1m_pct = models.DecimalField(max_digits=5, decimal_places=2, validators=_PCT)
    discount_3m_pct = models.DecimalField(max_digits=5, decimal_places=2, validators=_PCT)
    discount_1y_pct = models.DecimalField(max_digits=5, decimal_places=2, validators=_PCT)
    interruptible_discount_pct = models.DecimalField(
        max_digits=5, decimal_places=2, validators=_PCT
    )
    utilisation_pivot = models.DecimalField(
        max_digits=4,
        decimal_places=3,
        default=Decimal("0.600"),
        validators=[MinValueValidator(0), MaxValueValidator(1)],
        help_text="Utilisation (0 to 1) at which the adjustment is neutral.",
    )
    utilisation_slope = models.DecimalField(
        max_digits=5,
        decimal_places=3,
        default=Decimal("0.500"),
        validators=[MinValueValidator(0)],
        help_text="Multiplier change per unit of utilisation above or below the pivot.",
    )
    floor_multiplier = models.DecimalField(
        max_digits=5,
        decimal_places=3,
        validators=[MinValueValidator(Decimal("0.001"))],
        help_text="The final price is never below this × list price.",
    )
    ceiling_multiplier = models.DecimalField(
        max_digits=5,
        decimal_places=3,
        help_text="The final price is never above this × list price.",
    )
    energy_pass_through_pct = models.DecimalField(
        max_digits=5,
        decimal_places=2,
        default=Decimal("0"),
        validators=_PCT,
        help_text="Share of the list price that follows the site's energy price (0: off). "
        "At 20, a site whose power costs 10 % less than the reference sells 2 % cheaper.",
    )
    reference_energy_price_per_mwh = models.DecimalField(
        max_digits=10,
        decimal_places=2,
        default=Decimal("40.00"),
        validators=[MinValueValidator(Decimal("0.01"))],
        help_text="The energy price the list prices assume, in the rate cards' currency. "
        "Sites paying in another currency are not adjusted.",
    )
    energy_basis_on_demand = models.CharField(
        max_length=10, choices=EnergyBasis.choices, default=EnergyBasis.WINDOW
    )
    energy_basis_reserved = models.CharField(
        max_length=10, choices=EnergyBasis.choices, default=EnergyBasis.LONG
    )
    energy_basis_interruptible = models.CharField(
        max_length=10, choices=EnergyBasis.choices, default=EnergyBasis.HOUR
    )
    beyond_horizon = models.CharField(
        max_length=10,
        choices=BeyondHorizon.choices,
        default=BeyondHorizon.STATIC,
        help_text="The energy price of booked time after the zone's last published price.",
    )
    floor_margin_pct = models.DecimalField(
        max_digits=6,
        decimal_places=2,
        default=Decimal("20"),
        validators=[MinValueValidator(Decimal("0"))],
        help_text="The energy floor: no price per GPU-hour goes below the GPU-hour's energy cost "
        "(rated board power × PUE × power price) plus this share of it ...",
    )
    floor_margin_per_gpu_hour = models.DecimalField(
        max_digits=10,
        decimal_places=4,
        default=Decimal("0"),
        validators=[MinValueValidator(Decimal("0"))],
        help_text="... plus this amount per GPU-hour, in the rate cards' currency.",
    )
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "pricing policies"
        constraints = [
            models.CheckConstraint(
                condition=Q(floor_multiplier__gt=0)
                & Q(ceiling_multiplier__gte=F("floor_multiplier")),
                name="pricingpolicy_bounds_ordered",
            ),
            models.CheckConstraint(
                condition=Q(floor_margin_pct__gte=0) & Q(floor_margin_per_gpu_hour__gte=0),
                name="pricingpolicy_floor_margin_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return (
            f"Pricing policy of {self.created_at:%Y-%m-%d %H:%M}"
            if self.created_at
            else "Pricing policy"
        )
