"""Reservation reads, scoped to one organisation (another organisation's rows are NotFound)."""

from datetime import datetime

from django.db.models import Prefetch, QuerySet

from config.errors import NotFound
from marketplace.models import (
    Allocation,
    Organization,
    Reservation,
    ReservationOutage,
    ReservationTransition,
)

__all__ = ["reservation_list_for_org", "reservation_get_for_org"]


def reservation_list_for_org(
    *,
    organization: Organization,
    status: str | list[str] | None = None,
    tier: str | None = None,
    site: str | None = None,
    gpu_model: str | None = None,
    starts_after: datetime | None = None,
    starts_before: datetime | None = None,
) -> QuerySet[Reservation]:
    """The organisation's reservations, newest first, with site and model joined in."""
    qs = Reservation.objects.filter(organization=organization).select_related(
        "site", "gpu_model", "quote", "organization"
    )
    if status:
        qs = qs.filter(status__in=[status] if isinstance(status, str) else status)
    if tier:
        qs = qs.filter(tier=tier)
    if site:
        qs = qs.filter(site__slug=site)
    if gpu_model:
        qs = qs.filter(gpu_model__slug=gpu_model)
    if starts_after:
        qs = qs.filter(starts_at__gte=starts_after)
    if starts_before:
        qs = qs.filter(starts_at__lt=starts_before)
    return qs.order_by("-created_at", "-id")


def reservation_get_for_org(*, organization: Organization, public_id: str) -> Reservation:
    """One reservation with its transitions, allocations (GPU and node) and outages prefetched."""
    reservation = (
        Reservation.objects.filter(organization=organization, public_id=public_id)
        .select_related("site", "gpu_model", "quote", "organization")
        .prefetch_related(
            Prefetch("transitions", queryset=ReservationTransition.objects.order_by("at", "id")),
            Prefetch(
                "allocations",
                queryset=Allocation.objects.select_related("gpu", "node").order_by(
                    "node_id", "gpu__index", "id"
                ),
            ),
            Prefetch("outages", queryset=ReservationOutage.objects.order_by("started_at", "id")),
        )
        .first()
    )
    if reservation is None:
        raise NotFound("No such reservation.", field="reservation")
    return reservation
