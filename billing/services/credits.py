"""Credits: staff credits, SLA credits from recorded outages, cancellation refunds.

SLA (documented for customers): each reservation has a monthly uptime target of 99.5 %,
measured per calendar month (UTC) over the time it was charged for in that month: an
on-demand or interruptible one from when it became active, a reserved term (charged up front
from its start) from its start ([activated_at or starts_at, released_at or its booked end)).
Time in which a reserved term has resold every GPU (sold_whole_windows) is its buyers', who
are measured and credited for it: neither the term's measured time nor its downtime, so no
outage is credited twice. Its recorded outages (ReservationOutage; one recorded from a node's
outage not while the term has resold every GPU it had on that node: outage_intervals) and any
outage of a node serving it, while it held GPUs there, count as downtime; so does a reserved
term's late start: the time from its start plus the start allowance (marketplace's
start_overdue_at: PROVISIONING_READINESS_TIMEOUT_SECONDS) until it became active (or ended,
or now, if it never did), month by month, so a term that started on the 31st and became
active on the 1st has that wait in both months. A reservation
a forced grid curtailment preempted is measured to its booked end, the time it lost counting
as downtime. If the month's uptime is below target, the reservation is credited a share of
its net charge for that month:

    uptime < 99.5 % → 10 %      uptime < 99 % → 25 %      uptime < 95 % → 100 %

"Net charge for the month" (_month_net_charge_minor), from the ledger: what the reservation was
charged for the month less what was given back for it. Usage lines (and a resold term's
proceeds and fees) count in the month their interval starts in; a reserved term's charges
(as booked and extensions) are spread pro rata over its booked period, and the credits that
gave part of it back (a cancellation refund, a forced curtailment's refund: undelivered time at
the end of the term) come off its last months first. Never negative; SLA credits themselves
do not lower it. The credit is rounded half-up to the cent.

One SLA credit per reservation and month, whoever writes it: the forced-curtailment credit
("curtail:<id>:sla", at the preemption, for the month of the stop) and the month's credit
("sla:<id>:<YYYY-MM>") are both the same share (_sla_month_credit_add), each writing only what
the SLA lines already written for that reservation and month fall short of, under the
reservation's row lock, so together they never exceed it. The month's credit is written once
everything that can land in the month has landed (sla_month_settled_at): the meter keeps
ended reservations open for late outage records for RECENTLY_RELEASED (2 days) and books an
hour's usage up to BILLING_USAGE_BOOK_SPREAD_MINUTES after it; before then nothing is written.

Cancellation refunds follow the marketplace's stated terms (reservation.cancellation, written
by marketplace.services.reservations.reservation_cancel): a reserved term, charged up front,
gets `refund_amount` back as a credit to the balance. On-demand and interruptible time is only
ever charged as it is used, so cancelling them leaves nothing to refund (their terms state
0). A reserved term cancelled while its start is overdue (not active by its start plus the
start allowance) gets its unused rest back in full, as its terms state; the wait before the
cancel is SLA downtime above. A reserved reservation that failed before ever becoming active
is credited in full, less the SLA credits its wait already got (never more than it paid); one
that had run and
failed while it was being provisioned again (moved off a failed GPU, with no start on the new
ones) gets the rest of its term from the failure back (less time resold to a buyer, who pays
for it), as a GPU failure with nowhere to move ends it; a term whose own workload ended it is
not. A stated refund of nothing is settled once the term is charged, not looked at again.

Forced curtailment (docs/grid.md): an on-demand or reserved reservation that staff forced a
grid curtailment onto is credited once it is preempted, once each ("curtail:<id>:refund",
"curtail:<id>:sla"): nobody pays for time they did not get, so a reserved term (charged up
front) gets back the part of its total for the booked time it lost (from the preemption to its
end, pro rata by the second); and the lost time counts as downtime under the SLA above, for the
month of the preemption, credited by the SLA's rule on that month's net charge (its charge less
the part just refunded).
"""

import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import CharField, DecimalField, Exists, F, OuterRef, Q, Sum, Value
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Coalesce, Concat
from django.utils import timezone

from billing.models import BillingAccount, LedgerEntry, LedgerKind
from billing.money import from_minor_units, to_minor_units, to_minor_units_asked
from billing.selectors import CANCELLATION_REFUND_KEY
from billing.services.accounts import billing_account_get_or_create
from billing.services.holds import holds_charge
from billing.services.ledger import ledger_entry_add
from billing.services.usage import (
    RECENTLY_RELEASED,
    _overlap_seconds,
    interval_minus,
    interval_union,
    outage_intervals,
    reserved_base_charge,
)
from config.currency import money_round
from config.errors import Conflict, ValidationFailed
from marketplace.models import (
    CurtailmentVictim,
    Organization,
    Reservation,
    ReservationStatus,
    ReservationTransition,
    Tier,
)
from marketplace.selectors.resale import sold_whole_windows, term_unused_amount
from marketplace.services.audit import audit_record
from marketplace.services.pricing import period_total
from marketplace.services.reservations import start_overdue_at

__all__ = [
    "SLA_TARGET",
    "SLA_CREDIT_TIERS",
    "sla_credit_fraction",
    "month_bounds",
    "sla_settle_delay",
    "sla_month_settled_at",
    "reservation_month_uptime",
    "sla_credit_issue",
    "sla_credits_issue_for_month",
    "credit_issue",
    "cancellation_settle",
    "cancellations_due",
    "curtailment_forced_credit_issue",
    "curtailment_forced_credits_due",
    "resale_window_return_refund",
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


def sla_settle_delay() -> timedelta:
    """How long after a month's end what can still land in it may land: an ended
    reservation's late outage records (the meter keeps it open RECENTLY_RELEASED) and the
    booking of the month's last hour (up to BILLING_USAGE_BOOK_SPREAD_MINUTES after it)."""
    return RECENTLY_RELEASED + timedelta(minutes=settings.BILLING_USAGE_BOOK_SPREAD_MINUTES)


def sla_month_settled_at(month: date) -> datetime:
    """When the month's SLA credits may be written (and are, by the next hourly run)."""
    return month_bounds(month)[1] + sla_settle_delay()


def reservation_month_uptime(
    *, reservation: Reservation, month: date, now: datetime | None = None
) -> tuple[int, int]:
    """(seconds measured in the month, seconds of downtime within them)."""
    return _month_uptime(reservation, month, now or timezone.now(), _forced_stop(reservation))


def _month_uptime(
    reservation: Reservation, month: date, now: datetime, stop: datetime | None
) -> tuple[int, int]:
    m0, m1 = month_bounds(month)
    # Measured from when it is charged: a reserved term from its start, the others as used.
    begun = reservation.starts_at if reservation.tier == Tier.RESERVED else reservation.activated_at
    if begun is None:
        return 0, 0
    lo = max(begun, m0)
    if stop is not None:  # a forced preemption: to the booked end, the rest lost
        hi = min(reservation.ends_at, m1)
    else:
        end = min(reservation.released_at or reservation.ends_at, reservation.ends_at)
        hi = min(end, m1, now)
    if hi <= lo:
        return 0, 0
    measured = [(lo, hi)]
    down = outage_intervals(reservation=reservation, until=hi)
    if reservation.tier == Tier.RESERVED:
        # A window sold whole is the buyer's time (measured and credited as the buyer's),
        # not the term's: neither measured nor down, whatever outage of its runs through it.
        measured = interval_minus(measured, sold_whole_windows(reservation=reservation))
        # A late start: paid for from the start, not delivered until active.
        late = (start_overdue_at(reservation), reservation.activated_at or hi)
        if late[0] < late[1]:
            down = interval_union([*down, late])
    if stop is not None:
        down = interval_union([*down, (stop, reservation.ends_at)])
    return (
        sum(int((b - a).total_seconds()) for a, b in measured),
        sum(_overlap_seconds(down, a, b) for a, b in measured),
    )


def _forced_stop(reservation: Reservation) -> datetime | None:
    """Where a forced grid curtailment stopped this protected reservation; None if none did."""
    if reservation.tier == Tier.INTERRUPTIBLE or reservation.status != ReservationStatus.PREEMPTED:
        return None
    if not CurtailmentVictim.objects.filter(
        reservation=reservation, forced=True, withdrawn_at__isnull=True
    ).exists():
        return None
    return min(
        max(reservation.released_at or reservation.starts_at, reservation.starts_at),
        reservation.ends_at,
    )


def _month_net_charge_minor(reservation: Reservation, month: date) -> int:
    """What the reservation was charged for the month less what was given back for it (the
    module's docstring), from the ledger; never negative."""
    m0, m1 = month_bounds(month)
    lines = LedgerEntry.objects.filter(reservation=reservation).exclude(kind=LedgerKind.SLA_CREDIT)
    spread = Q(kind=LedgerKind.RESERVED_CHARGE)
    unperiodised = ~spread & Q(period_start__isnull=True)
    in_month = Q(period_start__gte=m0, period_start__lt=m1)
    sums = lines.aggregate(
        term=Coalesce(Sum("amount_minor", filter=spread), 0),
        given_back=Coalesce(Sum("amount_minor", filter=unperiodised), 0),
        given_back_in_month=Coalesce(
            Sum("amount_minor", filter=unperiodised & Q(created_at__gte=m0, created_at__lt=m1)), 0
        ),
        in_month=Coalesce(Sum("amount_minor", filter=~spread & in_month), 0),
    )
    net = -sums["in_month"]
    term_minor = -sums["term"]
    booked = _seconds_between(reservation.starts_at, reservation.ends_at)
    if term_minor > 0 and booked > 0:
        # The term's charge to date, pro rata; what was given back comes off its end.
        def charged_by(at: datetime) -> int:
            share = Decimal(_seconds_between(reservation.starts_at, min(at, reservation.ends_at)))
            return to_minor_units(
                from_minor_units(term_minor, reservation.currency) * share / Decimal(booked),
                reservation.currency,
            )

        kept = max(term_minor - sums["given_back"], 0)
        before, by_end = charged_by(max(m0, reservation.starts_at)), charged_by(m1)
        net += min(max(kept, before), by_end) - before
    else:
        net -= sums["given_back_in_month"]
    return max(net, 0)


def _sla_month_credit_add(
    reservation: Reservation,
    *,
    month: date,
    now: datetime,
    stop: datetime | None,
    idempotency_key: str,
    head: str,
) -> LedgerEntry | None:
    """The one SLA rule: the table's share of the month's net charge for the month's uptime,
    less what SLA lines for this reservation and month already gave; the caller holds the
    reservation's row lock. None when nothing is due or it was credited before."""
    active, down = _month_uptime(reservation, month, now, stop)
    if active == 0 or down == 0:
        return None
    uptime = Decimal(active - down) / Decimal(active)
    fraction = sla_credit_fraction(uptime)
    charge_minor = _month_net_charge_minor(reservation, month)
    due_minor = to_minor_units(
        from_minor_units(charge_minor, reservation.currency) * fraction, reservation.currency
    )
    keys = [f"sla:{reservation.pk}:{month:%Y-%m}"]
    if stop is not None and stop.date().replace(day=1) == month:
        keys.append(f"curtail:{reservation.pk}:sla")
    given_minor = (
        LedgerEntry.objects.filter(kind=LedgerKind.SLA_CREDIT, idempotency_key__in=keys)
        .exclude(idempotency_key=idempotency_key)
        .aggregate(total=Coalesce(Sum("amount_minor"), 0))["total"]
    )
    amount_minor = due_minor - given_minor
    if amount_minor <= 0:
        return None
    charge = from_minor_units(charge_minor, reservation.currency)
    already = (
        f", less {from_minor_units(given_minor, reservation.currency)} credited before"
        if given_minor
        else ""
    )
    entry, created = ledger_entry_add(
        organization=reservation.organization,
        kind=LedgerKind.SLA_CREDIT,
        amount_minor=amount_minor,
        currency=reservation.currency,
        idempotency_key=idempotency_key,
        reservation=reservation,
        description=f"{head}: uptime {uptime * 100:.3f} % ({down} s down of {active} s) → "
        f"{fraction * 100:.0f} % of {charge}{already}",
    )
    return entry if created else None


@transaction.atomic
def sla_credit_issue(
    *, reservation_id: int, month: date, now: datetime | None = None
) -> LedgerEntry | None:
    """The month's SLA credit for one reservation, once the month has settled; once."""
    now = now or timezone.now()
    if now < sla_month_settled_at(month):
        return None
    reservation = Reservation.objects.select_related("organization").get(pk=reservation_id)
    stop = _forced_stop(reservation)
    if _month_uptime(reservation, month, now, stop)[1] == 0:
        return None  # most reservations: no downtime, no lock taken
    if reservation.tier == Tier.RESERVED:
        # What is owed back for undelivered time is given before the share is taken on the rest.
        cancellation_settle(reservation_id=reservation.pk)
    if stop is not None:
        curtailment_forced_credit_issue(reservation_id=reservation.pk)
    reservation = (
        Reservation.objects.select_for_update()
        .select_related("organization")
        .get(pk=reservation_id)
    )
    return _sla_month_credit_add(
        reservation,
        month=month,
        now=now,
        stop=_forced_stop(reservation),
        idempotency_key=f"sla:{reservation.pk}:{month:%Y-%m}",
        head=f"SLA credit {month:%Y-%m}",
    )


def sla_credits_issue_for_month(*, month: date, now: datetime | None = None) -> int:
    """Every SLA credit of the month, once it has settled (sla_month_settled_at); until then
    nothing. Returns the number written."""
    now = now or timezone.now()
    if now < sla_month_settled_at(month):
        return 0
    m0, m1 = month_bounds(month)
    # A reserved term is measured from its start, active yet or not (_month_uptime).
    measured = Q(activated_at__lt=m1) | Q(tier=Tier.RESERVED, starts_at__lt=m1)
    ids = (
        Reservation.objects.filter(measured, ends_at__gt=m0)
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
    actor: str | None = None,
) -> LedgerEntry:
    """A staff credit to an organisation's balance, with its reason: the amount as given,
    refused (amount_precision) unless it is a whole number of the currency's minor unit.
    Audited as by the request's user, or by `actor` outside a request (the shell's).

    `currency` is the one the amount was asked in: under the account's lock (the one a billing
    currency change takes) it must still be the account's, else 409 currency_mismatch and
    nothing is credited (an amount typed in dollars is not credited as yen)."""
    if isinstance(amount, float):
        raise TypeError("amount must be Decimal, not float")
    if not reason.strip():
        raise ValidationFailed("A credit needs a reason.", field="reason")
    amount_minor = to_minor_units_asked(amount, currency, field="amount")
    if amount_minor <= 0:
        raise ValidationFailed("A credit must be positive.", field="amount")
    billing_account_get_or_create(organization=organization)
    account = BillingAccount.objects.select_for_update().get(organization=organization)
    if currency.lower() != account.currency:
        raise Conflict(
            f"This credit is in {currency.upper()}, but {organization} is billed in "
            f"{account.currency.upper()}: nothing was credited.",
            code="currency_mismatch",
            field="amount",
        )

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
            actor=actor,
            organization_id=organization.pk,
            action="credit.issue",
            object_type="ledger_entry",
            object_id=entry.public_id,
            changes={
                "after": {
                    # As credited, in the currency's decimals, not as typed ("25.5000").
                    "amount": str(from_minor_units(amount_minor, currency)),
                    "currency": currency,
                    "reason": reason,
                }
            },
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
        # All of it, but the windows resold: their buyers keep them and pay the holder; and
        # less what the SLA already gave for its late start (the same undelivered time).
        refund = term_unused_amount(reservation, since=reservation.starts_at)
        why = "Reserved term never delivered: full refund (of the time not resold)."
        sla_given = from_minor_units(_sla_credited_minor(reservation), reservation.currency)
        if sla_given:
            refund -= sla_given
            why += f" Less {sla_given} credited before under the SLA for its late start."
    elif reservation.status == ReservationStatus.FAILED and _failed_reprovisioning(reservation):
        since = reservation.released_at or timezone.now()
        refund = term_unused_amount(reservation, since=since)
        why = (
            "Reserved term failed while it was being provisioned again (moved off a failed "
            f"GPU): the term from {since.isoformat()} on, not delivered, refunded."
        )
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
        kind=LedgerKind.TERM_REFUND,
        amount_minor=amount_minor,
        currency=reservation.currency,
        idempotency_key=f"{CANCELLATION_REFUND_KEY}{reservation.pk}",
        reservation=reservation,
        description=why,
    )
    return entry if created else None


def _sla_credited_minor(reservation: Reservation) -> int:
    return LedgerEntry.objects.filter(
        reservation=reservation, kind=LedgerKind.SLA_CREDIT
    ).aggregate(total=Coalesce(Sum("amount_minor"), 0))["total"]


# A reserved term that had run and then failed while the platform was provisioning it again
# (moved off a failed GPU): not the customer's workload ending itself (active → failed).
_REPROVISIONING = (ReservationStatus.SCHEDULED, ReservationStatus.PROVISIONING)


def _failed_reprovisioning_q() -> Q:
    return Q(
        Exists(
            ReservationTransition.objects.filter(
                reservation_id=OuterRef("pk"),
                to_status=ReservationStatus.FAILED,
                from_status__in=_REPROVISIONING,
            )
        ),
        activated_at__isnull=False,
    )


def _failed_reprovisioning(reservation: Reservation) -> bool:
    return Reservation.objects.filter(pk=reservation.pk).filter(_failed_reprovisioning_q()).exists()


def resale_window_return_refund(
    *, seller: Reservation, listing_id: int, gpu_seconds: int
) -> LedgerEntry | None:
    """A window a reserved term resold came back unused after the term ended (cancelled,
    failed): its refund left that window out (its sale was to pay for it), so it is refunded
    now on the same terms: the share the cancellation stated (refund_fraction), all of it for
    a term that failed. Once per listing; the caller holds the seller's row lock."""
    terms = seller.cancellation or {}
    if seller.status == ReservationStatus.FAILED:
        fraction = Decimal(1)
    elif "refund_fraction" in terms:
        fraction = Decimal(str(terms["refund_fraction"]))
    else:
        return None
    amount = money_round(
        period_total(
            price_per_gpu_hour=seller.price_per_gpu_hour,
            gpu_count=1,
            seconds=gpu_seconds,
            currency=seller.currency,
        )
        * fraction,
        seller.currency,
    )
    amount_minor = to_minor_units(amount, seller.currency)
    if amount_minor <= 0:
        return None
    entry, created = ledger_entry_add(
        organization=seller.organization,
        kind=LedgerKind.TERM_REFUND,
        amount_minor=amount_minor,
        currency=seller.currency,
        idempotency_key=f"resale-return:{listing_id}",
        reservation=seller,
        description=f"Resold time given back unused after the term ended: {gpu_seconds} "
        f"GPU-seconds refunded at {fraction * 100:.0f} %, as the term's own refund.",
    )
    return entry if created else None


def cancellations_due() -> list[int]:
    """Reserved reservations with cancellation terms (or failed undelivered) not yet settled.

    One whose refund is nothing (stopped, or cancelled late) writes no credit: once its term
    is charged there is nothing left to settle, so it is not taken up again every run."""
    # Found by its key (the unique index), not by a scan of the ledger for a key prefix.
    settled = LedgerEntry.objects.filter(
        idempotency_key=Concat(Value(CANCELLATION_REFUND_KEY), Cast(OuterRef("pk"), CharField()))
    )
    charged = LedgerEntry.objects.filter(
        idempotency_key=Concat(Value("reserved:"), Cast(OuterRef("pk"), CharField()))
    )
    qs = Reservation.objects.filter(tier=Tier.RESERVED).exclude(Exists(settled))
    # The refund the terms stated (written by the marketplace as a decimal string).
    stated = Cast(KT("cancellation__refund_amount"), DecimalField(max_digits=20, decimal_places=6))
    cancelled = (
        qs.exclude(cancellation={}).alias(stated=stated).exclude(Exists(charged), stated__lte=0)
    )
    failed = (
        qs.filter(status=ReservationStatus.FAILED)
        .filter(Q(activated_at__isnull=True) | _failed_reprovisioning_q())
        .exclude(Exists(charged), total_amount__lte=0)
        .exclude(Exists(charged), released_at__gte=F("ends_at"))
    )
    return sorted(
        set(cancelled.values_list("pk", flat=True)) | set(failed.values_list("pk", flat=True))
    )


# Forced curtailment victims are looked for this long after they were preempted (a notice can
# be given weeks ahead, so the choice's time says nothing about when the credit is due).
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
            reservation__released_at__gte=now - timedelta(days=_FORCED_LOOKBACK_DAYS),
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
    stop = _forced_stop(reservation)
    if stop is None:
        return []
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
                kind=LedgerKind.TERM_REFUND,
                amount_minor=refund_minor,
                currency=reservation.currency,
                idempotency_key=f"curtail:{reservation.pk}:refund",
                reservation=reservation,
                description=f"Forced grid curtailment: {lost} s of the term not delivered, "
                "refunded pro rata.",
            )
            written += [entry] if created else []
    month = stop.date().replace(day=1)
    entry = _sla_month_credit_add(
        reservation,
        month=month,
        now=timezone.now(),
        stop=stop,
        idempotency_key=f"curtail:{reservation.pk}:sla",
        head=f"SLA credit, forced grid curtailment {month:%Y-%m}",
    )
    written += [entry] if entry is not None else []
    return written


def _seconds_between(lo: datetime, hi: datetime) -> int:
    return max(int((hi - lo).total_seconds()), 0)
