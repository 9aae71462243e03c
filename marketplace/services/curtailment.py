"""Grid curtailment: the site sheds its interruptible load at a given time, with notice.

A site's grid operator asks it to cut consumption from `shed_at` (demand response): that is
the contract a former mining site sells its flexibility under, and what the interruptible
tier is priced for. When staff announce it:
- the site is marked curtailed at once, so nothing new is sold there;
- interruptible reservations that would be running at shed_at get a notice (preempt_at,
  preempt_reason), shown by the API and e-mailed to the organisation's owners and admins;
  the dispatcher preempts them at shed_at (the workload is stopped, the GPUs freed, metering
  ends there: nobody pays for time they did not get);
- interruptible reservations that would only start at or after shed_at (and before `until`,
  when the operator gave one) are preempted at once: they never run and are never charged;
- every other tier is protected: untouched, and still served (the site keeps enough power for
  its committed load; interruptible capacity is what it sheds).
Staff return the site to service when the operator allows (admin action), which sells it again.
"""

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from config.errors import Conflict, ValidationFailed
from inventory.models import Site, SiteStatus
from inventory.services import status_change
from marketplace.models import (
    Curtailment,
    EventType,
    Membership,
    Reservation,
    ReservationStatus,
    Role,
    Tier,
)
from marketplace.services.events import reservation_event_record
from marketplace.services.transitions import PREEMPTIBLE_STATUSES, reservation_transition

__all__ = [
    "curtailment_announce",
    "curtailment_call_off",
    "curtailment_validate",
    "reservations_preempt_due",
    "SHED_AT_SKEW",
]

logger = logging.getLogger(__name__)
# An announcement may name a shed time this far in the past (the operator's call came a moment
# ago); further back is a mistake.
SHED_AT_SKEW = timedelta(minutes=1)
_NOT_STARTED = (ReservationStatus.PENDING, ReservationStatus.SCHEDULED)
_ACTOR = "grid curtailment"


@transaction.atomic
def curtailment_announce(
    *,
    site: Site,
    shed_at: datetime,
    reason: str,
    until: datetime | None = None,
    user=None,
    now: datetime | None = None,
) -> Curtailment:
    """Record the curtailment, stop selling the site, and notify or preempt the interruptible
    reservations it affects (see the module docstring)."""
    now = now or timezone.now()
    locked_site = Site.objects.select_for_update().get(pk=site.pk)
    curtailment_validate(site=locked_site, shed_at=shed_at, until=until, reason=reason, now=now)
    reason = reason.strip()
    if locked_site.status == SiteStatus.ACTIVE:
        status_change(
            action="curtail",
            site=locked_site,
            actor=user,
            actor_label=None if user else _ACTOR,
            reason=f"Grid curtailment: {reason}",
        )

    shed_at = max(shed_at, now)
    window = Q(ends_at__gt=shed_at) & (Q() if until is None else Q(starts_at__lt=until))
    affected = list(
        Reservation.objects.select_for_update()
        .filter(window, site=locked_site, tier=Tier.INTERRUPTIBLE, status__in=PREEMPTIBLE_STATUSES)
        .select_related("organization")
        .order_by("pk")
    )
    cause = _cause(locked_site, shed_at, reason)
    notified, preempted = [], []
    for reservation in affected:
        if reservation.status in _NOT_STARTED and reservation.starts_at >= shed_at:
            reservation_transition(
                reservation=reservation,
                to_status=ReservationStatus.PREEMPTED,
                cause=cause,
                actor_label=_ACTOR,
            )
            preempted.append(reservation)
        else:
            _notice(reservation, shed_at=shed_at, cause=cause)
            notified.append(reservation)

    curtailment = Curtailment.objects.create(
        site=locked_site,
        shed_at=shed_at,
        until=until,
        reason=reason,
        announced_by=user,
        reservations_notified=len(notified),
        reservations_preempted=len(preempted),
    )
    logger.warning(
        "curtailment of %s from %s: %d interruptible reservation(s) noticed, %d preempted now",
        locked_site.slug,
        shed_at.isoformat(),
        len(notified),
        len(preempted),
    )
    _email_notices(notified=notified, preempted=preempted, shed_at=shed_at, reason=reason)
    return curtailment


@transaction.atomic
def curtailment_call_off(
    *, curtailment: Curtailment, user=None, now: datetime | None = None
) -> int:
    """The operator called the event off before shed time: withdraw its notices (those of
    the site's other curtailments still stand) and, if no other one may be in effect, sell the
    site again. Returns how many notices were withdrawn. Reservations it preempted before they
    started stay preempted (they were never charged)."""
    now = now or timezone.now()
    locked = Curtailment.objects.select_for_update().select_related("site").get(pk=curtailment.pk)
    if locked.called_off_at is not None:
        raise Conflict("This curtailment was already called off.", code="already_called_off")
    if now >= locked.shed_at:
        raise Conflict(
            "Its shed time has passed: what it preempted stays preempted. Return the site to "
            "service from Sites when the operator allows.",
            code="shed_time_passed",
        )
    site = Site.objects.select_for_update().get(pk=locked.site_id)
    locked.called_off_at = now
    locked.save(update_fields=["called_off_at"])
    noticed = list(
        Reservation.objects.select_for_update()
        .filter(site=site, preempt_at__isnull=False, status__in=PREEMPTIBLE_STATUSES)
        .order_by("pk")
    )
    noticed_at = {reservation.pk: reservation.preempt_at for reservation in noticed}
    for reservation in noticed:
        reservation.preempt_at, reservation.preempt_reason = None, ""
    pending = list(
        Curtailment.objects.filter(site=site, called_off_at__isnull=True, shed_at__gt=now)
    )
    for other in pending:  # their notices stand, whichever came first
        for reservation in noticed:
            if reservation.ends_at > other.shed_at and (
                other.until is None or reservation.starts_at < other.until
            ):
                _notice(
                    reservation,
                    shed_at=other.shed_at,
                    cause=_cause(site, other.shed_at, other.reason),
                    save=False,
                )
    withdrawn = sum(1 for r in noticed if r.preempt_at is None)
    Reservation.objects.bulk_update(noticed, ["preempt_at", "preempt_reason"])
    for reservation in noticed:
        # Another curtailment's notice now stands, with another time.
        if reservation.preempt_at not in (None, noticed_at[reservation.pk]):
            reservation_event_record(
                reservation=reservation, type=EventType.RESERVATION_INTERRUPTION_SCHEDULED
            )
    # Sold again only if no other curtailment may still be in effect (one without `until` is
    # taken to be: staff then return the site to service themselves).
    in_effect = Curtailment.objects.filter(site=site, called_off_at__isnull=True).filter(
        Q(until__isnull=True) | Q(until__gt=now)
    )
    if not in_effect.exists() and site.status == SiteStatus.CURTAILED:
        status_change(
            action="return_to_service",
            site=site,
            actor=user,
            actor_label=None if user else _ACTOR,
            reason=f"Grid curtailment from {locked.shed_at.isoformat()} called off",
        )
    logger.warning("curtailment %s called off: %d notice(s) withdrawn", locked.pk, withdrawn)
    return withdrawn


def _cause(site: Site, shed_at: datetime, reason: str) -> str:
    return f"Grid curtailment at {site.name} from {shed_at.isoformat()}: {reason}"


def _notice(reservation: Reservation, *, shed_at: datetime, cause: str, save: bool = True) -> None:
    """Give notice of a preemption at shed_at; an earlier notice already given stands."""
    if reservation.preempt_at is not None and reservation.preempt_at <= shed_at:
        return
    reservation.preempt_at, reservation.preempt_reason = shed_at, cause
    if save:
        reservation.save(update_fields=["preempt_at", "preempt_reason", "updated_at"])
        reservation_event_record(
            reservation=reservation, type=EventType.RESERVATION_INTERRUPTION_SCHEDULED
        )


def curtailment_validate(
    *, site: Site, shed_at: datetime, until: datetime | None, reason: str, now: datetime
) -> None:
    """Raise ValidationFailed or Conflict unless this curtailment can be announced."""
    if not (reason or "").strip():
        raise ValidationFailed("Say why: the customers whose work stops read it.", field="reason")
    if shed_at.tzinfo is None or (until is not None and until.tzinfo is None):
        raise ValidationFailed("Times must carry a time zone.", field="shed_at")
    if shed_at < now - SHED_AT_SKEW:
        raise ValidationFailed("shed_at is in the past.", code="shed_at_past", field="shed_at")
    if until is not None and until <= shed_at:
        raise ValidationFailed("until must be after shed_at.", code="period_invalid", field="until")
    if site.status not in (SiteStatus.ACTIVE, SiteStatus.CURTAILED):
        raise Conflict(
            f"{site.slug} is {site.status}; only an active or already curtailed site sheds load.",
            code="site_not_active",
            field="site",
        )


def reservations_preempt_due(*, now: datetime | None = None, limit: int = 500) -> int:
    """Preempt every reservation whose notice has run out; returns how many.

    Run by the dispatcher before it looks for work to tear down, so the workload of a
    preempted running reservation is stopped in the same tick. Rows a worker holds are
    skipped and taken on the next tick.
    """
    now = now or timezone.now()
    done = 0
    with transaction.atomic():
        due = list(
            Reservation.objects.filter(preempt_at__lte=now, status__in=PREEMPTIBLE_STATUSES)
            .select_for_update(skip_locked=True)
            .order_by("preempt_at", "pk")[:limit]
        )
        for reservation in due:
            reservation_transition(
                reservation=reservation,
                to_status=ReservationStatus.PREEMPTED,
                cause=reservation.preempt_reason or "Preempted.",
                actor_label=_ACTOR,
            )
            done += 1
    return done


def _email_notices(*, notified, preempted, shed_at: datetime, reason: str) -> None:
    by_org: dict[int, list[str]] = {}
    for reservation in notified:
        by_org.setdefault(reservation.organization_id, []).append(
            f"- {reservation.public_id} ({reservation.gpu_count} GPU(s)): stops at "
            f"{max(shed_at, reservation.starts_at).isoformat()}"
        )
    for reservation in preempted:
        by_org.setdefault(reservation.organization_id, []).append(
            f"- {reservation.public_id} ({reservation.gpu_count} GPU(s)): will not start "
            "(nothing is charged)"
        )
    for org_id, lines in by_org.items():
        recipients = list(
            Membership.objects.filter(organization_id=org_id, role__in=[Role.OWNER, Role.ADMIN])
            .exclude(user__email="")
            .values_list("user__email", flat=True)
        )
        if not recipients:
            continue
        body = (
            "The site's grid operator has asked it to shed load. These interruptible "
            "reservations are preempted:\n\n" + "\n".join(lines) + f"\n\nReason: {reason}\n"
            "Time after the stop is not charged. Reserved and on-demand capacity is not "
            "affected."
        )
        transaction.on_commit(
            lambda recipients=recipients, body=body: send_mail(
                "Switchyard: interruptible reservations preempted (grid curtailment)",
                body,
                getattr(settings, "DEFAULT_FROM_EMAIL", None),
                recipients,
                fail_silently=True,
            )
        )
