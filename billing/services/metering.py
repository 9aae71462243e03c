"""The metering run: usage lines for every reservation that may owe, holds of ended ones
released, then funding state."""

from datetime import datetime, timedelta

from django.utils import timezone

from billing.services.credits import cancellation_settle, cancellations_due
from billing.services.funding import funding_state_update
from billing.services.holds import holds_release_ended
from billing.services.usage import reservations_meter, reservations_to_meter
from marketplace.models import Organization, Reservation

__all__ = ["usage_meter_run"]

# Reservations released within this window are metered once more (late outages, last seconds).
RECENTLY_RELEASED = timedelta(days=2)
BATCH = 500


def usage_meter_run(*, now: datetime | None = None) -> int:
    now = now or timezone.now()
    ids = reservations_to_meter(now=now, since=now - RECENTLY_RELEASED)
    written = 0
    for i in range(0, len(ids), BATCH):
        written += reservations_meter(reservation_ids=ids[i : i + BATCH], now=now)
    settled = cancellations_due()
    for reservation_id in settled:
        cancellation_settle(reservation_id=reservation_id)
    # Charged up to their end just above: what ended reservations still hold is released.
    holds_release_ended()
    org_ids = set(
        Reservation.objects.filter(pk__in=[*ids, *settled]).values_list(
            "organization_id", flat=True
        )
    )
    for organization in Organization.objects.filter(pk__in=org_ids).order_by("pk"):
        funding_state_update(organization=organization, now=now)
    return written
