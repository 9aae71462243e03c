"""Reservation reads, scoped to one organisation (another organisation's rows are NotFound)."""

from datetime import datetime
from decimal import Decimal

from django.db.models import Prefetch, QuerySet
from django.utils import timezone

from config.errors import NotFound
from marketplace.funding import funding_gate
from marketplace.models import (
    Allocation,
    Organization,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    ReservationTransition,
)

__all__ = [
    "reservation_list_for_org",
    "reservation_get_for_org",
    "reservations_charged_load",
    "reservation_charged",
    "reservation_elapsed_seconds",
    "reservation_remaining_seconds",
    "reservation_active_again_at",
]


def reservation_active_again_at(outage: ReservationOutage) -> datetime | None:
    """When the outage's reservation next became active after the outage began (a restarted
    or moved workload running again), or None: where such an outage ends."""
    return (
        ReservationTransition.objects.filter(
            reservation_id=outage.reservation_id,
            to_status=ReservationStatus.ACTIVE,
            at__gt=outage.started_at,
        )
        .order_by("at")
        .values_list("at", flat=True)
        .first()
    )


def reservation_list_for_org(*, organization: Organization) -> QuerySet[Reservation]:
    """The organisation's reservations, newest first, with site and model joined in. Lists
    filter it with marketplace.filters.ReservationFilter (the API and the portal alike)."""
    return (
        Reservation.objects.filter(organization=organization)
        .select_related("site", "gpu_model", "quote", "organization")
        .order_by("-created_at", "-id")
    )


def reservation_get_for_org(*, organization: Organization, public_id: str) -> Reservation:
    """One reservation with its history, allocations (GPU and node) and outages loaded, as
    lists: `transition_list`, `allocation_list`, `outage_list` (reservation_create hands a new
    reservation back with the same three, from the rows it wrote)."""
    reservation = (
        Reservation.objects.filter(organization=organization, public_id=public_id)
        .select_related("site", "gpu_model", "quote", "organization")
        .prefetch_related(
            Prefetch(
                "transitions",
                queryset=ReservationTransition.objects.order_by("at", "id"),
                to_attr="transition_list",
            ),
            Prefetch(
                "allocations",
                queryset=Allocation.objects.select_related("gpu", "node").order_by(
                    "node_id", "gpu__index", "id"
                ),
                to_attr="allocation_list",
            ),
            Prefetch(
                "outages",
                queryset=ReservationOutage.objects.order_by("started_at", "id"),
                to_attr="outage_list",
            ),
        )
        .first()
    )
    if reservation is None:
        raise NotFound("No such reservation.", field="reservation")
    return reservation


# --- what a reservation has cost so far (charged, not booked) ------------------------------


def reservations_charged_load(reservations) -> None:
    """Set `charged_amount` on each reservation that lacks it: what it has been charged so far
    (usage and commitments less refunds and credits), asked of billing in one question."""
    missing = [r for r in reservations if getattr(r, "charged_amount", None) is None]
    if not missing:
        return
    charged = funding_gate().reservations_charged(reservation_ids=[r.pk for r in missing])
    for reservation in missing:
        reservation.charged_amount = charged.get(reservation.pk, Decimal("0.00"))


def reservation_charged(reservation: Reservation) -> Decimal:
    reservations_charged_load([reservation])
    return reservation.charged_amount


def reservation_elapsed_seconds(
    reservation: Reservation, now: datetime | None = None
) -> int | None:
    """How long it has run (or ran): from activation to its release, end or now."""
    if reservation.activated_at is None:
        return None
    now = now or timezone.now()
    until = min(reservation.released_at or now, reservation.ends_at, now)
    return max(0, int((until - reservation.activated_at).total_seconds()))


def reservation_remaining_seconds(
    reservation: Reservation, now: datetime | None = None
) -> int | None:
    """Time left while it runs (active); None otherwise."""
    if reservation.status != ReservationStatus.ACTIVE:
        return None
    now = now or timezone.now()
    return max(0, int((reservation.ends_at - now).total_seconds()))
