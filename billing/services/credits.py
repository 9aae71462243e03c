"""Credits: staff credits, SLA credits from recorded outages, cancellation refunds.

SLA (documented for customers): each reservation has a monthly uptime target of 99.5 %,
measured per calendar month (UTC) over the time it was active in that month
([activated_at, released_at or its booked end)), where its recorded outages
(ReservationOutage) and any outage of a node serving it, while it held GPUs there, count as
downtime. If the month's uptime is below target, the reservation is credited a
share of what it was charged for that month:

    uptime < 99.5 % → 10 %      uptime < 99 % → 25 %      uptime < 95 % → 100 %

"Charged for that month": on-demand and interruptible, the usage lines whose interval starts
in the month (already net of outage time, which is never billed); reserved, the term's total
pro rata to the part of the booked period in the month. Credits are rounded half-up to the
cent, once, and written once per reservation and month (key "sla:<id>:<YYYY-MM>").

Cancellation refunds follow the marketplace's stated terms (reservation.cancellation, written
by marketplace.services.reservations.reservation_cancel): a reserved term, charged up front,
gets `refund_amount` back as a credit to the balance. On-demand and interruptible time is only
ever charged as it is used, so cancelling them leaves nothing to refund. A reserved
reservation that failed before ever becoming active is credited in full.

Forced curtailment (docs/grid.md): an on-demand or reserved reservation that staff forced a
grid curtailment onto is credited once it is preempted, once each ("curtail:<id>:refund",
"curtail:<id>:sla"): nobody pays for time they did not get, so a reserved term (charged up
front) gets back the part of its total for the booked time it lost (from the preemption to its
end, pro rata by the second); and the lost time counts as downtime under the SLA above, for the
month of the preemption (uptime = booked time in the month not lost ÷ booked time in the
month), credited at the SLA's rate on what that month charged for time delivered (its charge
less the part just refunded).
"""

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import CharField, Exists, OuterRef, Sum, Value
from django.db.models.functions import Cast, Coalesce, Concat
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.money import from_minor_units, to_minor_units
from billing.selectors import CANCELLATION_REFUND_KEY
from billing.services.holds import holds_charge
from billing.services.ledger import ledger_entry_add
from billing.services.usage import (
    METERED_TIERS,
    _overlap_seconds,
    outage_intervals,
    reserved_base_charge,
)
from config.errors import ValidationFailed
from marketplace.models import (
    CurtailmentVictim,
    Organization,
    Reservation,
    ReservationStatus,
    Tier,
)
from marketplace.services.audit import audit_record

__all__ = [
    "SLA_TARGET",
    "SLA_CREDIT_TIERS",
    "sla_credit_fraction",
    "month_bounds",
    "reservation_month_uptime",
    "sla_credit_issue",
    "sla_credits_issue_for_month",
    "credit_issue",
    "cancellation_settle",
    "cancellations_due",
    "curtailment_forced_credit_issue",
    "curtailment_forced_credits_due",
]

SLA_TARGET = Decimal("0.995")
# (uptime strictly below, fraction of the month's charge credited), most severe first.
SLA_CREDIT_TIERS = (
    (Decimal("0.95"), Decimal("1.00")),
    (Decimal("0.99"), Decimal("0.25")),
    (Decimal("0.995"), Decimal("0.10")),
)


def sla_credit_fraction(uptime: Decimal) -> Decimal:
    if isinstance(uptime, float):
        raise TypeError("uptime must be Decimal, not float")
    for below, fraction in SLA_CREDIT_TIERS:
        if uptime < below:
            return fraction
    return Decimal("0")


def month_bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = datetime(month.year + (month.month == 12), month.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def reservation_month_uptime(
    *, reservation: Reservation, month: date, now: datetime | None = None
) -> tuple[int, int]:
    """(seconds active in the month, seconds of outage within them)."""
    now = now or timezone.now()
    m0, m1 = month_bounds(month)
    if reservation.activated_at is None:
        return 0, 0
    lo = max(reservation.activated_at, m0)
    hi = min(reservation.released_at or reservation.ends_at, reservation.ends_at, m1, now)
    if hi <= lo:
        return 0, 0
    outages = outage_intervals(reservation=reservation, until=hi)
    return int((hi - lo).total_seconds()), _overlap_seconds(outages, lo, hi)


def _month_charge_minor(reservation: Reservation, month: date) -> int:
    m0, m1 = month_bounds(month)
    if reservation.tier in METERED_TIERS:
        charged = LedgerEntry.objects.filter(
            reservation=reservation,
            kind=LedgerKind.USAGE,
            period_start__gte=m0,
            period_start__lt=m1,
        ).aggregate(total=Coalesce(Sum("amount_minor"), 0))["total"]
        return max(-charged, 0)
    period = (reservation.ends_at - reservation.starts_at).total_seconds()
    lo, hi = max(reservation.starts_at, m0), min(reservation.ends_at, m1)
    if hi <= lo or period <= 0:
        return 0
    share = Decimal(int((hi - lo).total_seconds())) / Decimal(int(period))
    return to_minor_units(Decimal(reservation.total_amount) * share, reservation.currency)


@transaction.atomic
def sla_credit_issue(
    *, reservation_id: int, month: date, now: datetime | None = None
) -> LedgerEntry | None:
    reservation = Reservation.objects.select_related("organization").get(pk=reservation_id)
    active, down = reservation_month_uptime(reservation=reservation, month=month, now=now)
    if active == 0 or down == 0:
        return None
    uptime = Decimal(active - down) / Decimal(active)
    return _sla_credit_add(
        reservation,
        charge_minor=_month_charge_minor(reservation, month),
        uptime=uptime,
        idempotency_key=f"sla:{reservation.pk}:{month:%Y-%m}",
        head=f"SLA credit {month:%Y-%m}: uptime {uptime * 100:.3f} % ({down} s down of {active} s)",
    )


def _sla_credit_add(
    reservation: Reservation, *, charge_minor: int, uptime: Decimal, idempotency_key: str, head: str
) -> LedgerEntry | None:
    """The SLA table's share of charge_minor for this uptime, credited once under the key;
    None when it is nothing or was credited before."""
    fraction = sla_credit_fraction(uptime)
    amount_minor = to_minor_units(
        from_minor_units(charge_minor, reservation.currency) * fraction, reservation.currency
    )
    if amount_minor <= 0:
        return None
    entry, created = ledger_entry_add(
        organization=reservation.organization,
        kind=LedgerKind.SLA_CREDIT,
        amount_minor=amount_minor,
        currency=reservation.currency,
        idempotency_key=idempotency_key,
        reservation=reservation,
        description=f"{head} → {fraction * 100:.0f} % of "
        f"{from_minor_units(charge_minor, reservation.currency)}",
    )
    return entry if created else None


def sla_credits_issue_for_month(*, month: date, now: datetime | None = None) -> int:
    m0, m1 = month_bounds(month)
    ids = (
        Reservation.objects.filter(activated_at__lt=m1, ends_at__gt=m0)
        .exclude(released_at__lt=m0)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    return sum(1 for pk in ids if sla_credit_issue(reservation_id=pk, month=month, now=now))


@transaction.atomic
def credit_issue(
    *,
    organization: Organization,
    amount: Decimal,
    reason: str,
    created_by: AbstractBaseUser | None,
    currency: str = "usd",
    idempotency_key: str | None = None,
) -> LedgerEntry:
    """A staff credit to an organisation's balance, with its reason."""
    if isinstance(amount, float):
        raise TypeError("amount must be Decimal, not float")
    if not reason.strip():
        raise ValidationFailed("A credit needs a reason.", field="reason")
    amount_minor = to_minor_units(amount, currency)
    if amount_minor <= 0:
        raise ValidationFailed("A credit must be positive.", field="amount")

    entry, created = ledger_entry_add(
        organization=organization,
        kind=LedgerKind.CREDIT,
        amount_minor=amount_minor,
        currency=currency,
        idempotency_key=idempotency_key or f"credit:{uuid.uuid4().hex}",
        description=reason,
        created_by=created_by,
    )
    if created:
        audit_record(
            organization_id=organization.pk,
            action="credit.issue",
            object_type="ledger_entry",
            object_id=entry.public_id,
            changes={"after": {"amount": str(amount), "currency": currency, "reason": reason}},
        )
    return entry


@transaction.atomic
def cancellation_settle(*, reservation_id: int) -> LedgerEntry | None:
    """Credit a cancelled (or never-delivered) reserved term by the stated terms, once."""
    reservation = Reservation.objects.select_for_update().get(pk=reservation_id)
    if reservation.tier != Tier.RESERVED:
        return None
    terms = getattr(reservation, "cancellation", None) or {}
    if terms.get("refund_amount") is not None:
        refund = Decimal(str(terms["refund_amount"]))
        why = f"Cancellation refund: {terms.get('rule', '')}".strip()
    elif reservation.status == ReservationStatus.FAILED and reservation.activated_at is None:
        refund = Decimal(reservation.total_amount)
        why = "Reserved term never delivered: full refund."
    else:
        return None
    reserved_base_charge(reservation, reservation.total_amount)
    holds_charge(reservation_ids=[reservation.pk])
    # What the term was charged in all (as booked, and any extension charged at once).
    charged_minor = -LedgerEntry.objects.filter(
        reservation=reservation, kind=LedgerKind.RESERVED_CHARGE
    ).aggregate(total=Coalesce(Sum("amount_minor"), 0))["total"]
    amount_minor = min(to_minor_units(refund, reservation.currency), charged_minor)
    if amount_minor <= 0:
        return None
    entry, created = ledger_entry_add(
        organization=reservation.organization,
        kind=LedgerKind.CREDIT,
        amount_minor=amount_minor,
        currency=reservation.currency,
        idempotency_key=f"{CANCELLATION_REFUND_KEY}{reservation.pk}",
        reservation=reservation,
        description=why,
    )
    return entry if created else None


def cancellations_due() -> list[int]:
    """Reserved reservations with cancellation terms (or failed undelivered) not yet settled."""
    # Found by its key (the unique index), not by a scan of the ledger for a key prefix.
    settled = LedgerEntry.objects.filter(
        idempotency_key=Concat(Value(CANCELLATION_REFUND_KEY), Cast(OuterRef("pk"), CharField()))
    )
    qs = Reservation.objects.filter(tier=Tier.RESERVED).exclude(Exists(settled))
    cancelled = qs.exclude(cancellation={}) if hasattr(Reservation, "cancellation") else qs.none()
    failed = qs.filter(status=ReservationStatus.FAILED, activated_at__isnull=True)
    return sorted(
        set(cancelled.values_list("pk", flat=True)) | set(failed.values_list("pk", flat=True))
    )


# Forced curtailment victims are looked for this long after they were chosen.
_FORCED_LOOKBACK_DAYS = 7


def curtailment_forced_credits_due(*, now: datetime | None = None) -> list[int]:
    """Protected reservations a forced curtailment preempted, not yet credited."""
    now = now or timezone.now()
    credited = LedgerEntry.objects.filter(idempotency_key__startswith="curtail:").values(
        "reservation_id"
    )
    return sorted(
        CurtailmentVictim.objects.filter(
            forced=True,
            withdrawn_at__isnull=True,
            reservation__status=ReservationStatus.PREEMPTED,
            chosen_at__gte=now - timedelta(days=_FORCED_LOOKBACK_DAYS),
        )
        .exclude(reservation_id__in=credited)
        .values_list("reservation_id", flat=True)
        .distinct()
    )


@transaction.atomic
def curtailment_forced_credit_issue(*, reservation_id: int) -> list[LedgerEntry]:
    """Credit a protected reservation for a forced preemption (the module's docstring)."""
    reservation = (
        Reservation.objects.select_for_update()
        .select_related("organization")
        .get(pk=reservation_id)
    )
    if reservation.tier == Tier.INTERRUPTIBLE or reservation.status != ReservationStatus.PREEMPTED:
        return []
    if not CurtailmentVictim.objects.filter(
        reservation=reservation, forced=True, withdrawn_at__isnull=True
    ).exists():
        return []
    stop = min(
        max(reservation.released_at or reservation.starts_at, reservation.starts_at),
        reservation.ends_at,
    )
    booked = int((reservation.ends_at - reservation.starts_at).total_seconds())
    lost = int((reservation.ends_at - stop).total_seconds())
    written = []
    if reservation.tier == Tier.RESERVED and lost > 0 and booked > 0:
        reserved_base_charge(reservation, reservation.total_amount)
        holds_charge(reservation_ids=[reservation.pk])
        refund_minor = to_minor_units(
            Decimal(reservation.total_amount) * Decimal(lost) / Decimal(booked),
            reservation.currency,
        )
        if refund_minor > 0:
            entry, created = ledger_entry_add(
                organization=reservation.organization,
                kind=LedgerKind.CREDIT,
                amount_minor=refund_minor,
                currency=reservation.currency,
                idempotency_key=f"curtail:{reservation.pk}:refund",
                reservation=reservation,
                description=f"Forced grid curtailment: {lost} s of the term not delivered, "
                "refunded pro rata.",
            )
            written += [entry] if created else []
    month = stop.date().replace(day=1)
    m0, m1 = month_bounds(month)
    booked_in_month = _seconds_between(max(reservation.starts_at, m0), min(reservation.ends_at, m1))
    lost_in_month = _seconds_between(max(stop, m0), min(reservation.ends_at, m1))
    if booked_in_month > 0 and lost_in_month > 0:
        uptime = Decimal(booked_in_month - lost_in_month) / Decimal(booked_in_month)
        charge_minor = _month_charge_minor(reservation, month)
        if reservation.tier == Tier.RESERVED and booked > 0:
            charge_minor -= to_minor_units(
                Decimal(reservation.total_amount) * Decimal(lost_in_month) / Decimal(booked),
                reservation.currency,
            )
        entry = _sla_credit_add(
            reservation,
            charge_minor=max(charge_minor, 0),
            uptime=uptime,
            idempotency_key=f"curtail:{reservation.pk}:sla",
            head=f"SLA credit, forced grid curtailment {month:%Y-%m}: uptime {uptime * 100:.3f} %",
        )
        written += [entry] if entry is not None else []
    return written


def _seconds_between(lo: datetime, hi: datetime) -> int:
    return max(int((hi - lo).total_seconds()), 0)
