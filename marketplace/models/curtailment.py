"""Grid curtailments: a site's grid operator asks it to shed load for a window.

A curtailment names a target (megawatts to shed, or all flexible load) and a window; the
service (marketplace.services.curtailment) picks the interruptible reservations whose draw
covers it (its victims, one row each), gives them notice and preempts them, and stops selling
the site's capacity for the window beyond what it over-shed. Demand-response calls from a
grid operator or aggregator (a configured source, signed) become curtailments with no person.
"""

import secrets

from django.conf import settings
from django.contrib.postgres.fields import DateTimeRangeField
from django.db import models
from django.db.models import F, Q

from inventory.models import PriceZone, Site

__all__ = [
    "Curtailment",
    "CurtailmentVictim",
    "CurtailmentTake",
    "DemandResponseSource",
    "DemandResponseEvent",
    "DemandResponseNonce",
]

_KW = {"max_digits": 12, "decimal_places": 3, "default": 0}


def _dr_secret() -> str:
    return "drs_" + secrets.token_urlsafe(32)


class DemandResponseSource(models.Model):
    """A grid operator or aggregator allowed to send demand-response calls (staff set it up)."""

    name = models.SlugField(max_length=64, unique=True, help_text="Sent as X-DR-Source.")
    description = models.CharField(max_length=200, blank=True, default="")
    # Readable: the HMAC is computed with it (as webhook secrets are); given to the operator once.
    secret = models.CharField(max_length=80, default=_dr_secret)
    # The secret before the last change, accepted until previous_secret_until (the operator's
    # systems switch over meanwhile); empty once it is no longer.
    previous_secret = models.CharField(max_length=80, blank=True, default="")
    previous_secret_until = models.DateTimeField(null=True, blank=True)
    sites = models.ManyToManyField(
        Site, blank=True, related_name="+", help_text="Sites this source may curtail."
    )
    zones = models.ManyToManyField(
        PriceZone,
        blank=True,
        related_name="+",
        help_text="Price zones this source may curtail (a call for a zone sheds its sites).",
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "demand-response source"

    def __str__(self) -> str:
        return self.name

    def secrets_accepted(self, now) -> list[str]:
        """The secrets a call may be signed with now: the current one, and the previous one
        while its overlap lasts."""
        accepted = [self.secret]
        if self.previous_secret and self.previous_secret_until and now < self.previous_secret_until:
            accepted.append(self.previous_secret)
        return accepted


class DemandResponseEvent(models.Model):
    """One demand-response call as its source last stated it (idempotent by source and
    event id; a later modification number replaces it)."""

    class Status(models.TextChoices):
        ACTIVE = "active"
        CANCELLED = "cancelled"

    source = models.ForeignKey(
        DemandResponseSource, on_delete=models.PROTECT, related_name="events"
    )
    event_id = models.CharField(max_length=200)
    modification_number = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    site = models.ForeignKey(
        Site, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    zone = models.ForeignKey(
        PriceZone, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    target_mw = models.DecimalField(
        max_digits=9, decimal_places=3, null=True, blank=True, help_text="Empty: all flexible load."
    )
    reason = models.TextField(blank=True, default="")
    body = models.JSONField(default=dict, help_text="The last call as received.")
    received_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-received_at", "-id"]
        verbose_name = "demand-response event"
        constraints = [
            models.UniqueConstraint(
                fields=["source", "event_id"], name="dr_event_unique_per_source"
            ),
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")), name="dr_event_period_valid"
            ),
            models.CheckConstraint(
                condition=Q(site__isnull=True, zone__isnull=False)
                | Q(site__isnull=False, zone__isnull=True),
                name="dr_event_site_or_zone",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.source}:{self.event_id}"


class DemandResponseNonce(models.Model):
    """A signature already accepted from a source: the same signed request again is a replay.
    Kept a little longer than the timestamp tolerance (older ones are stale anyway)."""

    source = models.ForeignKey(DemandResponseSource, on_delete=models.CASCADE, related_name="+")
    signature = models.CharField(max_length=64)
    seen_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["source", "signature"], name="dr_nonce_unique")
        ]

    def __str__(self) -> str:
        return f"{self.source_id}:{self.signature[:12]}"


class Curtailment(models.Model):
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="curtailments")
    shed_at = models.DateTimeField(help_text="Start of the window: when the load must be shed.")
    until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="End of the window, when the operator allows the load back; empty: until "
        "staff end it.",
    )
    target_mw = models.DecimalField(
        "target (MW)",
        max_digits=9,
        decimal_places=3,
        null=True,
        blank=True,
        help_text="Megawatts to shed; empty: all flexible (interruptible) load.",
    )
    reason = models.TextField(help_text="Shown to the customers whose reservations it ends.")
    announced_at = models.DateTimeField(auto_now_add=True)
    announced_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    demand_response_event = models.ForeignKey(
        DemandResponseEvent,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="curtailments",
        help_text="The call it was taken from, when no person announced it.",
    )
    # The plan (rewritten when a call is modified).
    preempt_at = models.DateTimeField(
        null=True, blank=True, help_text="When its victims are preempted (the notice's end)."
    )
    short_notice = models.BooleanField(
        default=False, help_text="The call gave less than the minimum notice; the notice says so."
    )
    shed_kw = models.DecimalField("shed (kW)", **_KW)
    short_kw = models.DecimalField(
        "short (kW)", **_KW, help_text="What the flexible load could not cover."
    )
    headroom_kw = models.DecimalField(
        "sellable in the window (kW)",
        **_KW,
        help_text="Shed beyond the target: new load that may still be sold in the window.",
    )
    # Unused since marketplace 0035 (sales in the window are CurtailmentTake rows): kept for one
    # release, so the release before it keeps answering while this one's migrations run; the
    # next release drops it.
    resold_kw = models.DecimalField("sold in the window since (kW)", **_KW)
    forced_reason = models.TextField(
        blank=True,
        default="",
        help_text="Staff forced on-demand and reserved work to cover a shortfall, and why.",
    )
    reservations_notified = models.PositiveIntegerField(
        default=0, help_text="Running (or starting before it): preempted at preempt_at."
    )
    reservations_preempted = models.PositiveIntegerField(
        default=0, help_text="Not started by then: preempted when planned, never charged."
    )
    gpu_hours_forgone = models.DecimalField(
        "GPU-hours forgone", max_digits=14, decimal_places=3, default=0
    )
    revenue_forgone = models.DecimalField(max_digits=14, decimal_places=2, default=0)
    currency = models.CharField(max_length=3, default="usd")
    called_off_at = models.DateTimeField(
        null=True, blank=True, help_text="The operator called it off (or staff ended it)."
    )

    class Meta:
        ordering = ["-announced_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(until__isnull=True) | Q(until__gt=F("shed_at")),
                name="curtailment_until_after_shed_at",
                violation_error_message="The window must end after it starts (until after "
                "shed_at).",
            ),
            models.CheckConstraint(
                condition=Q(target_mw__isnull=True) | Q(target_mw__gt=0),
                name="curtailment_target_positive",
                violation_error_message="The target must be a positive number of megawatts "
                "(empty: all flexible load).",
            ),
        ]
        indexes = [models.Index(fields=["site", "shed_at"], name="curtailment_site_shed_idx")]

    def __str__(self) -> str:
        return f"{self.site} from {self.shed_at:%Y-%m-%d %H:%M}"

    @property
    def shed_mw(self):
        return self.shed_kw / 1000

    @property
    def short_mw(self):
        return self.short_kw / 1000


class CurtailmentTake(models.Model):
    """Load sold in a curtailment's window after it was planned, out of what it shed beyond
    its target (headroom_kw): a booking's (or an extension's) draw over its own time in the
    window. Written by placement under the curtailment's row lock
    (marketplace.services.allocation.curtailment_headroom_take); when the reservation leaves
    the live statuses its take ends there (marketplace.services.transitions), so a cancelled
    booking gives its room back. What is sold at an instant is the sum of the takes whose
    period holds it (the SQL function marketplace_curtailment_sold_kw)."""

    curtailment = models.ForeignKey(Curtailment, on_delete=models.CASCADE, related_name="takes")
    reservation = models.ForeignKey(
        "marketplace.Reservation",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="curtailment_takes",
        help_text="Empty: sold before takes were recorded per booking (kept for the window).",
    )
    kw = models.DecimalField("draw (kW)", max_digits=12, decimal_places=3)
    period = DateTimeRangeField(help_text="The booking's time inside the window.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["curtailment_id", "id"]

    def __str__(self) -> str:
        return f"{self.kw} kW of {self.curtailment_id} for {self.reservation_id}"


class CurtailmentVictim(models.Model):
    """A reservation a curtailment sheds: its draw, how it was known, what it forgoes."""

    class Outcome(models.TextChoices):
        NOTICED = "noticed", "noticed (preempted at the curtailment's time)"
        PREEMPTED = "preempted", "preempted before it started"

    curtailment = models.ForeignKey(Curtailment, on_delete=models.CASCADE, related_name="victims")
    reservation = models.ForeignKey(
        "marketplace.Reservation", on_delete=models.PROTECT, related_name="curtailment_victims"
    )
    tier = models.CharField(max_length=20)
    draw_kw = models.DecimalField("draw (kW)", max_digits=12, decimal_places=3)
    draw_basis = models.CharField(
        max_length=20, help_text="measured (fresh GPU power readings), partly measured, or rated."
    )
    forced = models.BooleanField(default=False, help_text="A protected tier, forced by staff.")
    outcome = models.CharField(max_length=10, choices=Outcome.choices)
    gpu_hours_forgone = models.DecimalField(max_digits=14, decimal_places=3, default=0)
    revenue_forgone = models.DecimalField(max_digits=14, decimal_places=2, default=0)
    chosen_at = models.DateTimeField()
    withdrawn_at = models.DateTimeField(
        null=True, blank=True, help_text="Its notice was withdrawn (call off or re-plan)."
    )

    class Meta:
        ordering = ["curtailment_id", "id"]
        constraints = [
            # A reservation is shed by one curtailment at a time: two calls at once cannot
            # both count the same draw.
            models.UniqueConstraint(
                fields=["reservation"],
                condition=Q(withdrawn_at__isnull=True),
                name="curtailment_victim_once",
            )
        ]

    def __str__(self) -> str:
        return f"{self.reservation_id} in {self.curtailment_id}"
