"""Grid curtailments: a site's grid operator asks it to shed load from a given time.

Interruptible reservations there are preempted at that time, with notice until then; the
other tiers are protected. See marketplace.services.curtailment.
"""

from django.conf import settings
from django.db import models
from django.db.models import F, Q

from inventory.models import Site

__all__ = ["Curtailment"]


class Curtailment(models.Model):
    site = models.ForeignKey(Site, on_delete=models.PROTECT, related_name="curtailments")
    shed_at = models.DateTimeField(help_text="When the site must have shed its interruptible load.")
    until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the operator allows the load back, if known. Reservations starting "
        "after it are not preempted; staff return the site to service.",
    )
    reason = models.TextField(help_text="Shown to the customers whose reservations it ends.")
    announced_at = models.DateTimeField(auto_now_add=True)
    announced_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reservations_notified = models.PositiveIntegerField(
        default=0, help_text="Running (or starting before shed_at): preempted at shed_at."
    )
    reservations_preempted = models.PositiveIntegerField(
        default=0, help_text="Not started by shed_at: preempted when announced, never charged."
    )
    called_off_at = models.DateTimeField(
        null=True, blank=True, help_text="The operator called it off before shed time."
    )

    class Meta:
        ordering = ["-announced_at", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(until__isnull=True) | Q(until__gt=F("shed_at")),
                name="curtailment_until_after_shed_at",
            )
        ]

    def __str__(self) -> str:
        return f"{self.site} from {self.shed_at:%Y-%m-%d %H:%M}"
