"""Reservations as they run: elapsed, time left, cost so far, an interruption's countdown.

progress() is what the pages render first; LiveView serves the same figures as JSON for
static/portal/portal.js, which polls it and updates the pages without a reload.
"""

from datetime import datetime

from django.http import JsonResponse
from django.utils import timezone
from django.views import View

from marketplace.models import Reservation, ReservationStatus
from marketplace.portal.mixins import PortalView
from marketplace.selectors.reservations import (
    reservation_charged,
    reservation_elapsed_seconds,
    reservation_list_for_org,
    reservations_charged_load,
)
from marketplace.services.transitions import PREEMPTIBLE_STATUSES
from marketplace.templatetags.portal_format import duration, money, status_label

__all__ = ["progress", "running_time", "LiveView", "CURRENT_STATUSES"]

CURRENT_STATUSES = [
    ReservationStatus.PENDING,
    ReservationStatus.SCHEDULED,
    ReservationStatus.PROVISIONING,
    ReservationStatus.ACTIVE,
    ReservationStatus.RELEASING,
]


_STARTING = (ReservationStatus.PENDING, ReservationStatus.SCHEDULED, ReservationStatus.PROVISIONING)


def progress(reservation: Reservation, now: datetime | None = None) -> dict:
    """Seconds run and left, what it has been charged so far (billing's `charged`), seconds to
    an announced interruption. For a list, load the charges first in one question
    (reservations_charged_load)."""
    now = now or timezone.now()
    running = reservation.status == ReservationStatus.ACTIVE
    elapsed = reservation_elapsed_seconds(reservation, now) or 0
    noticed = reservation.preempt_at is not None and reservation.status in PREEMPTIBLE_STATUSES
    remaining = max(int((reservation.ends_at - now).total_seconds()), 0)
    starts_in = max(int((reservation.starts_at - now).total_seconds()), 0)
    if running:
        time_left = duration(remaining)
    elif starts_in:
        time_left = f"starts in {duration(starts_in)}"
    else:  # its start has come: it is being set up (or moved), not waiting for a time
        time_left = "starting now" if reservation.status in _STARTING else "—"
    return {
        "running": running,
        "time_left": time_left,
        "elapsed_seconds": elapsed,
        "remaining_seconds": remaining,
        "starts_in_seconds": starts_in,
        "cost_so_far": reservation_charged(reservation),
        "interruption_in_seconds": max(int((reservation.preempt_at - now).total_seconds()), 0)
        if noticed
        else None,
    }


def running_time(seconds: int | None) -> str | None:
    """How long it has run or has left, as the detail page shows it first and as each poll
    updates it: 1 d 2 h 05 min, 2 h 05 min, 3 min 20 s."""
    if seconds is None:
        return None
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h {minutes:02d} min"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s"


def _as_json(reservation: Reservation, now: datetime) -> dict:
    p = progress(reservation, now)
    currency = reservation.currency
    interruption = p["interruption_in_seconds"]
    return {
        "id": reservation.public_id,
        "status": reservation.status,
        "status_label": status_label(reservation.status),
        "elapsed_seconds": p["elapsed_seconds"],
        "elapsed": running_time(p["elapsed_seconds"]),
        "remaining_seconds": p["remaining_seconds"],
        "remaining": running_time(p["remaining_seconds"]),
        "time_left": p["time_left"],
        "cost_so_far": str(p["cost_so_far"]),
        "cost_so_far_display": money(p["cost_so_far"], currency),
        "total_display": money(reservation.total_amount, currency),
        "interruption_in_seconds": interruption,
        "interruption": f"Interruption in {duration(interruption)}"
        if interruption is not None
        else "",
    }


class LiveView(PortalView, View):
    """GET ?id=res_…&id=…: those reservations' live figures (the organisation's only)."""

    MAX_IDS = 100
    # Polled by an open page: not activity that keeps a session from its idle timeout.
    session_passive = True

    def get(self, request):
        wanted = request.GET.getlist("id")[: self.MAX_IDS]
        reservations = reservation_list_for_org(organization=self.organization).filter(
            public_id__in=wanted
        )
        reservations = list(reservations)
        reservations_charged_load(reservations)  # one question to billing for them all
        now = timezone.now()
        body = {
            "now": now.isoformat(),
            "reservations": [_as_json(r, now) for r in reservations],
        }
        response = JsonResponse(body)
        response["Cache-Control"] = "no-store"
        return response
