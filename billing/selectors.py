"""Reads: balance, ledger pages, usage, invoices, payment methods."""

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import connection
from django.db.models import Q, QuerySet, Sum, Value
from django.db.models.functions import Coalesce, Collate, TruncDate
from django.utils import timezone

from billing.models import (
    INVOICE_UNPAID_STATUSES,
    Balance,
    BillingAccount,
    BillingNotice,
    Hold,
    HoldStatus,
    Invoice,
    LedgerEntry,
    LedgerKind,
    PaymentMethod,
    TopUp,
    TopUpStatus,
    UsageAccrual,
)
from billing.money import ZERO_DECIMAL_CURRENCIES, from_minor_units, usage_cost_minor
from config.db import model_columns, model_from_row
from config.replica import read_connection
from marketplace.models import Organization, Tier
from marketplace.selectors.reference import rate_card_currencies
from marketplace.services.energy import EnergyEstimate, energy_estimate

__all__ = [
    "balance_minor",
    "spend_minor",
    "month_start",
    "ledger_for_org",
    "usage_by_reservation_day",
    "usage_unbooked_by_reservation_day",
    "usage_with_unbooked",
    "usage_page",
    "invoices_for_org",
    "invoice_past_due",
    "payment_methods_for_org",
    "top_ups_for_org",
    "account_currency",
    "billing_account_for_org",
    "billing_currency_for_org",
    "currency_choices",
    "currency_lock_reason",
    "notices_for_org",
    "usage_row_energy",
    "reservations_charged",
    "Statement",
    "statement_entries",
    "statement_for_month",
    "statement_opening_minor",
    "statement_month",
    "statement_months",
    "delivered_gpu_seconds_by_day",
]

CHARGE_KINDS = (LedgerKind.USAGE, LedgerKind.RESERVED_CHARGE)
# The key of the credit that gives back what a cancelled reserved term was charged for the time
# it will not run (billing.services.credits.cancellation_settle): a charge undone, not a gift.
CANCELLATION_REFUND_KEY = "cancel:"
# A charge and what undid one: a reserved term's refund for undelivered time (its cancellation
# or failure, a forced grid curtailment, a resold window returned after it ended). SLA and
# staff credits are not among them.
CHARGE_OR_UNDONE_KINDS = (*CHARGE_KINDS, LedgerKind.TERM_REFUND)


def balance_minor(*, organization: Organization) -> int:
    """The prepaid balance: the sum of the organisation's ledger, in minor units (kept by the
    ledger's insert trigger in Balance, so this reads one row)."""
    row = Balance.objects.filter(organization_id=organization.pk).values_list(
        "amount_minor", flat=True
    )
    return next(iter(row), 0)


def spend_minor(
    *, organization: Organization, since: datetime, until: datetime | None = None
) -> int:
    """What was charged (usage and reserved terms, net of usage corrections and of what a
    cancelled, failed or force-curtailed term gave back for time it did not get) in
    [since, until); credits (SLA, goodwill) do not lower it."""
    filters = Q(organization=organization, created_at__gte=since, kind__in=CHARGE_OR_UNDONE_KINDS)
    if until is not None:
        filters &= Q(created_at__lt=until)
    total = LedgerEntry.objects.filter(filters).aggregate(total=Coalesce(Sum("amount_minor"), 0))
    return -total["total"]


def month_start(at: datetime) -> datetime:
    """The start of the month `at` is in: where a month's spend (spend_minor) counts from."""
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


# Between two metering runs a running reservation's cost grows by the second from its last
# accrual; an accrual older than this (the meter is behind) is shown as it is, not guessed on.
LIVE_EXTRAPOLATION = timedelta(minutes=2)

# What each reservation has cost up to this second: its ledger lines (usage, reserved terms,
# less refunds and credits) plus the usage it accrued and the ledger does not have yet, with
# the seconds since the last metering run added while its clock runs.
_CHARGED_SQL = """
SELECT r.id, r.currency,
       coalesce((SELECT sum(l.amount_minor) FROM billing_ledgerentry l
                 WHERE l.reservation_id = r.id), 0),
       a.price_from_minor + round(
           (a.gpu_seconds - a.price_from_gpu_seconds
            + CASE WHEN a.running AND a.accrued_until >= %(now)s - make_interval(secs => %(fresh)s)
                   THEN a.gpu_count * greatest(0, floor(extract(epoch FROM
                        least(%(now)s, r.ends_at) - a.accrued_until)))
                   ELSE 0 END)
           * a.price_per_gpu_hour
           * (CASE WHEN lower(a.currency) = ANY(%(zero_decimal)s) THEN 1 ELSE 100 END) / 3600
       )::bigint - a.booked_minor
FROM marketplace_reservation r
LEFT JOIN billing_usageaccrual a ON a.reservation_id = r.id AND a.closed_at IS NULL
WHERE r.id = ANY(%(ids)s)
"""


def reservations_charged(
    *, reservation_ids: list[int], now: datetime | None = None
) -> dict[int, Decimal]:
    """What each reservation has cost so far, to the second (major units): its usage and
    reserved-term charges less its credits (a cancellation refund, SLA credits) from the
    ledger, plus its usage accrued and not yet booked. One query."""
    if not reservation_ids:
        return {}
    with read_connection().cursor() as cur:
        cur.execute(
            _CHARGED_SQL,
            {
                "ids": list(reservation_ids),
                "now": now or datetime.now(UTC),
                "zero_decimal": sorted(ZERO_DECIMAL_CURRENCIES),
                "fresh": int(LIVE_EXTRAPOLATION.total_seconds()),
            },
        )
        rows = cur.fetchall()
    return {
        rid: from_minor_units(-int(ledger) + int(unbooked or 0), currency)
        for rid, currency, ledger, unbooked in rows
        if ledger or unbooked
    }


def billing_account_for_org(*, organization: Organization) -> BillingAccount | None:
    return BillingAccount.objects.filter(organization=organization).first()


def account_currency(account: BillingAccount | None) -> str:
    """The currency an organisation with this account (None: none yet) is billed in: an
    organisation without one gets one in settings.CURRENCY when it first needs it."""
    return account.currency if account is not None else settings.CURRENCY


def billing_currency_for_org(*, organization_id: int) -> str:
    """The currency the organisation is billed in, which every commitment must be in."""
    return account_currency(
        BillingAccount.objects.filter(organization_id=organization_id).only("currency").first()
    )


def currency_lock_reason(*, organization_id: int) -> str | None:
    """Why the organisation's billing currency can no longer change (None: it still can):
    money in it is on the ledger, held for bookings, or being charged as a top-up (whose
    success would credit it onto a ledger in another). Read under the account's lock to
    decide a change: the funding gate writes holds under it."""
    if LedgerEntry.objects.filter(organization_id=organization_id).exists():
        return "the ledger already holds money in it"
    if Hold.objects.filter(organization_id=organization_id, status=HoldStatus.OPEN).exists():
        return "reservations already hold money in it"
    if TopUp.objects.filter(organization_id=organization_id, status=TopUpStatus.PENDING).exists():
        return "a top-up in it is still being charged"
    return None


def currency_choices(*, account: BillingAccount | None) -> list[str]:
    """The currencies a customer may bill the account in, sorted: those something is sold in
    (marketplace rate cards) and its own."""
    return sorted(rate_card_currencies() | {account_currency(account)})


def ledger_for_org(*, organization: Organization) -> QuerySet[LedgerEntry]:
    return LedgerEntry.objects.filter(organization=organization).select_related("reservation")


def usage_by_reservation_day(
    *, organization: Organization, since: date | None = None, until: date | None = None
) -> QuerySet:
    """Usage lines grouped by reservation and UTC day of the metered interval's start."""
    qs = LedgerEntry.objects.filter(organization=organization, kind=LedgerKind.USAGE)
    if since is not None:
        qs = qs.filter(period_start__date__gte=since)
    if until is not None:
        qs = qs.filter(period_start__date__lt=until)
    return (
        qs.annotate(day=TruncDate("period_start"))
        .values(
            "reservation__public_id",
            "reservation__gpu_model__slug",
            "reservation__site__slug",
            "day",
            "currency",
            # What the energy of the GPU-seconds is estimated from (one value per reservation).
            "reservation__gpu_model__tdp_watts",
            "reservation__site__pue",
            "reservation__site__renewable_share",
            "reservation__site__grid_carbon_g_per_kwh",
        )
        .annotate(gpu_seconds=Sum("gpu_seconds"), amount_minor=Sum("amount_minor"))
        .order_by("-day", "reservation__public_id")
    )


def usage_unbooked_by_reservation_day(
    *,
    organization: Organization,
    since: date | None = None,
    until: date | None = None,
    now: datetime | None = None,
) -> dict[tuple[str, date], dict]:
    """Usage accrued and not yet in the ledger, to the second, as usage_by_reservation_day's
    rows (keyed by reservation and day): in the UTC day it was used, as its ledger lines will
    be (the part used before midnight in the day before)."""
    now = now or datetime.now(UTC)
    rows = {}
    for accrual in (
        UsageAccrual.objects.filter(organization=organization, closed_at__isnull=True)
        .select_related("reservation__gpu_model", "reservation__site")
        .order_by("reservation_id")
    ):
        gpu_seconds, counted_until = accrual.gpu_seconds, accrual.accrued_until
        if accrual.running and now - accrual.accrued_until <= LIVE_EXTRAPOLATION:
            until_now = min(now, accrual.reservation.ends_at)
            gpu_seconds += accrual.gpu_count * max(
                0, int((until_now - accrual.accrued_until).total_seconds())
            )
            counted_until = max(counted_until, until_now)
        cost = accrual.price_from_minor + usage_cost_minor(
            gpu_seconds=gpu_seconds - accrual.price_from_gpu_seconds,
            price_per_gpu_hour=accrual.price_per_gpu_hour,
            currency=accrual.currency,
        )
        unbooked_seconds = gpu_seconds - accrual.booked_gpu_seconds
        unbooked_minor = cost - accrual.booked_minor
        if (unbooked_seconds, unbooked_minor) == (0, 0):
            continue
        day = accrual.booked_until.astimezone(UTC).date()
        parts = [(day, unbooked_seconds, unbooked_minor)]
        midnight = datetime.combine(day + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
        if counted_until > midnight:
            # Unbooked since before midnight: the day before gets what was used before it, as
            # the ledger's line will (a line never spans midnight).
            parts = _unbooked_split_at(accrual, midnight, unbooked_seconds, unbooked_minor)
        r = accrual.reservation
        for part_day, part_seconds, part_minor in parts:
            if (since is not None and part_day < since) or (
                until is not None and part_day >= until
            ):
                continue
            rows[(r.public_id, part_day)] = {
                "reservation__public_id": r.public_id,
                "reservation__gpu_model__slug": r.gpu_model.slug,
                "reservation__site__slug": r.site.slug,
                "day": part_day,
                "currency": accrual.currency,
                "reservation__gpu_model__tdp_watts": r.gpu_model.tdp_watts,
                "reservation__site__pue": r.site.pue,
                "reservation__site__renewable_share": r.site.renewable_share,
                "reservation__site__grid_carbon_g_per_kwh": r.site.grid_carbon_g_per_kwh,
                "gpu_seconds": part_seconds,
                "amount_minor": -part_minor,
            }
    return rows


def _unbooked_split_at(
    accrual: UsageAccrual, midnight: datetime, seconds: int, minor: int
) -> list[tuple[date, int, int]]:
    """An accrual's unbooked (GPU-seconds, cost) as the day before `midnight` and the day it
    starts: what was delivered up to it (outages excluded), priced as the meter prices it."""
    from billing.services.usage import reservation_delivered_seconds  # a read, not a write

    delivered = reservation_delivered_seconds(reservation=accrual.reservation, until=midnight)
    before_gs = max(accrual.gpu_count * delivered, accrual.booked_gpu_seconds)
    before_cost = accrual.price_from_minor + usage_cost_minor(
        gpu_seconds=before_gs - accrual.price_from_gpu_seconds,
        price_per_gpu_hour=accrual.price_per_gpu_hour,
        currency=accrual.currency,
    )
    before = (before_gs - accrual.booked_gpu_seconds, before_cost - accrual.booked_minor)
    after = (seconds - before[0], minor - before[1])
    days = ((midnight - timedelta(days=1)).date(), midnight.date())
    return [(d, s, m) for d, (s, m) in zip(days, (before, after), strict=True) if (s, m) != (0, 0)]


def usage_with_unbooked(rows, unbooked: dict[tuple[str, date], dict]):
    """usage_by_reservation_day's rows (any order) with the unbooked usage added: to the row
    of the same reservation and day, and the rest after them. A generator: exports stream."""
    for row in rows:
        extra = unbooked.pop((row["reservation__public_id"], row["day"]), None)
        if extra is not None:
            row = {
                **row,
                "gpu_seconds": row["gpu_seconds"] + extra["gpu_seconds"],
                "amount_minor": row["amount_minor"] + extra["amount_minor"],
            }
        yield row
    yield from unbooked.values()


def _usage_order(day: date, reservation_id: str | None) -> tuple[int, str]:
    # The usage API's order: newest day first, then reservation id (byte order).
    return -day.toordinal(), reservation_id or ""


def usage_page(
    *,
    organization: Organization,
    since: date | None = None,
    until: date | None = None,
    after: tuple[date, str] | None = None,
    backwards: bool = False,
    limit: int,
) -> list[dict]:
    """Up to `limit` usage rows (booked and unbooked, as usage_with_unbooked gives them),
    newest day first then reservation id, that come after `after` (a row's day and
    reservation id) in that order; `backwards`: those before it, nearest first. A keyset
    read: the database returns at most `limit` rows however deep into the period it is."""
    rows = usage_by_reservation_day(organization=organization, since=since, until=until)
    # Compared in byte order, as Python compares the unbooked rows' ids.
    rows = rows.annotate(key=Collate(Coalesce("reservation__public_id", Value("")), "C"))
    unbooked = usage_unbooked_by_reservation_day(
        organization=organization, since=since, until=until
    )
    if after is not None:
        day, key = after
        rows = rows.filter(
            Q(day__gt=day) | Q(day=day, key__lt=key)
            if backwards
            else Q(day__lt=day) | Q(day=day, key__gt=key)
        )
        at = _usage_order(day, key)
        unbooked = {
            (rid, d): row
            for (rid, d), row in unbooked.items()
            if (_usage_order(d, rid) < at if backwards else _usage_order(d, rid) > at)
        }
    rows = rows.order_by(*(("day", "-key") if backwards else ("-day", "key")))
    # An unbooked row whose booked row is beyond these `limit` sorts after all of them and is
    # cut below: no row is split across pages.
    merged = sorted(
        usage_with_unbooked(list(rows[:limit]), unbooked),
        key=lambda row: _usage_order(row["day"], row["reservation__public_id"]),
        reverse=backwards,
    )
    return merged[:limit]


def invoices_for_org(*, organization: Organization) -> QuerySet[Invoice]:
    return Invoice.objects.filter(organization=organization)


# The organisation's oldest unpaid past-due invoice: one probe of the partial index
# invoice_past_due_org_idx (its condition is written out as literals, so the planner can use
# that index for a prepared statement too). Plain SQL: the funding gate runs it on every
# postpaid booking and extension.
_PAST_DUE_SQL = f"""
SELECT {model_columns(Invoice, "i")} FROM billing_invoice i
WHERE i.organization_id = %s AND i.payment_failed_at IS NOT NULL AND i.payment_failed_at <= %s
  AND i.status IN ({", ".join(f"'{s}'" for s in INVOICE_UNPAID_STATUSES)})
ORDER BY i.payment_failed_at, i.id LIMIT 1
"""


def invoice_past_due(*, organization_id: int, past_grace: bool = False) -> Invoice | None:
    """The organisation's unpaid invoice that became past due first (with `past_grace`, only
    one past due for longer than BILLING_POSTPAID_PAST_DUE_GRACE: one that refuses its new
    commitments), or None. Read on the primary: the funding gate decides on it."""
    failed_by = timezone.now()
    if past_grace:
        failed_by -= settings.BILLING_POSTPAID_PAST_DUE_GRACE
    with connection.cursor() as cur:
        cur.execute(_PAST_DUE_SQL, [organization_id, failed_by])
        row = cur.fetchone()
    return model_from_row(Invoice, row) if row else None


def payment_methods_for_org(*, organization: Organization) -> QuerySet[PaymentMethod]:
    return PaymentMethod.objects.filter(organization=organization, detached_at__isnull=True)


def top_ups_for_org(*, organization: Organization) -> QuerySet[TopUp]:
    return TopUp.objects.filter(organization=organization)


def notices_for_org(*, organization: Organization) -> QuerySet[BillingNotice]:
    """The organisation's funding notices, newest first."""
    return BillingNotice.objects.filter(organization=organization).order_by("-created_at", "-id")


def usage_row_energy(row: dict) -> EnergyEstimate | None:
    """The energy of a usage_by_reservation_day row's GPU-seconds (None without a reservation)."""
    if row["reservation__gpu_model__tdp_watts"] is None:
        return None
    return energy_estimate(
        tdp_watts=row["reservation__gpu_model__tdp_watts"],
        pue=row["reservation__site__pue"],
        renewable_share=row["reservation__site__renewable_share"],
        grid_carbon_g_per_kwh=row["reservation__site__grid_carbon_g_per_kwh"],
        gpu_count=1,  # the row counts GPU-seconds
        seconds=row["gpu_seconds"],
    )


# --- monthly statements ----------------------------------------------------------------------


@dataclass(frozen=True)
class StatementLine:
    entry: LedgerEntry
    balance_after_minor: int


@dataclass(frozen=True)
class Statement:
    """One UTC calendar month of an organisation's ledger: what came in, what was charged, what
    was credited, from the opening to the closing balance (all in minor units)."""

    month: date
    currency: str
    opening_minor: int
    closing_minor: int
    lines: list[StatementLine]
    totals_minor: dict[str, int]  # by ledger kind, signed as in the ledger
    usage: list[dict]  # per reservation: public id, GPU-seconds, amount charged (positive) net of
    # what a term gave back for time it did not get (a refund in a later month: negative)


def statement_month(year: int, month: int) -> date | None:
    """The first day of that month (UTC) if it can have a statement: from January 2000 to
    the current month; None for any other (a statement's page or API answers 404)."""
    if not (1 <= month <= 12 and 2000 <= year <= datetime.now(UTC).year):
        return None
    first = date(year, month, 1)
    return first if first <= datetime.now(UTC).date() else None


def _month_bounds(month: date) -> tuple[datetime, datetime]:
    start = datetime(month.year, month.month, 1, tzinfo=UTC)
    end = datetime(month.year + (month.month == 12), month.month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def statement_months(*, organization: Organization) -> list[date]:
    """Every month from the organisation's first ledger entry to this one, newest first."""
    first = (
        LedgerEntry.objects.filter(organization=organization)
        .order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    today = datetime.now(UTC).date().replace(day=1)
    month = first.date().replace(day=1) if first else today
    months = []
    while month <= today:
        months.append(month)
        month = date(month.year + (month.month == 12), month.month % 12 + 1, 1)
    return months[::-1]


def _is_charge_or_undone(entry: LedgerEntry) -> bool:
    """A charge (usage, a reserved term) or a credit that undid one (a term's refund for time it
    did not get): the lines a reservation's figure on a statement nets, as spend_minor does, so a
    term cancelled with a full refund is not shown as charged."""
    return entry.kind in CHARGE_OR_UNDONE_KINDS


def statement_opening_minor(*, organization: Organization, month: date) -> int:
    """The balance before the month's first ledger line (minor units)."""
    start, _ = _month_bounds(month)
    return LedgerEntry.objects.filter(organization=organization, created_at__lt=start).aggregate(
        t=Coalesce(Sum("amount_minor"), 0)
    )["t"]


def statement_entries(*, organization: Organization, month: date) -> QuerySet[LedgerEntry]:
    """The month's ledger lines, in the order a statement lists them (a query: the CSV streams
    it with iterator())."""
    start, end = _month_bounds(month)
    return (
        LedgerEntry.objects.filter(
            organization=organization, created_at__gte=start, created_at__lt=end
        )
        .select_related("reservation")
        .order_by("created_at", "id")
    )


def statement_for_month(*, organization: Organization, month: date, currency: str) -> Statement:
    opening = statement_opening_minor(organization=organization, month=month)
    lines, balance, totals = [], opening, {}
    usage: dict[str, dict] = {}
    for entry in statement_entries(organization=organization, month=month):
        balance += entry.amount_minor
        lines.append(StatementLine(entry=entry, balance_after_minor=balance))
        totals[entry.kind] = totals.get(entry.kind, 0) + entry.amount_minor
        if entry.reservation is not None and _is_charge_or_undone(entry):
            row = usage.setdefault(
                entry.reservation.public_id,
                {"reservation": entry.reservation.public_id, "gpu_seconds": 0, "amount_minor": 0},
            )
            row["gpu_seconds"] += entry.gpu_seconds
            row["amount_minor"] -= entry.amount_minor
    return Statement(
        month=month,
        currency=currency,
        opening_minor=opening,
        closing_minor=balance,
        lines=lines,
        totals_minor=totals,
        usage=sorted(usage.values(), key=lambda r: r["reservation"]),
    )


def ledger_totals_by_kind(
    *, since: datetime, until: datetime | None = None
) -> dict[tuple[str, str], int]:
    """Every organisation's ledger in [since, until), summed by kind (minor units, signed as
    the ledger is: charges negative, top-ups and credits positive). For the staff dashboard."""
    qs = LedgerEntry.objects.filter(created_at__gte=since)
    if until is not None:
        qs = qs.filter(created_at__lt=until)
    rows = qs.order_by().values("kind", "currency").annotate(total=Sum("amount_minor"))
    return {(row["kind"], row["currency"]): row["total"] for row in rows}


# --- charts on the Usage page ------------------------------------------------------------------


def spend_by_day_and_model(*, organization: Organization, since: date, until: date) -> list[dict]:
    """Charges (usage and reserved terms, net of corrections and of what a term gave back for
    time it did not get, as spend_minor counts them) per UTC day and GPU model in [since, until),
    minor units, positive as charged (a refund on a later day than its charge is negative
    there): {day, gpu_model, currency, amount_minor}."""
    rows = (
        LedgerEntry.objects.filter(
            organization=organization,
            kind__in=CHARGE_OR_UNDONE_KINDS,
            created_at__date__gte=since,
            created_at__date__lt=until,
        )
        .annotate(day=TruncDate("created_at"))
        .order_by()
        .values("day", "reservation__gpu_model__name", "currency")
        .annotate(total=Sum("amount_minor"))
        .order_by("day", "reservation__gpu_model__name")
    )
    return [
        {
            "day": row["day"],
            "gpu_model": row["reservation__gpu_model__name"] or "Other",
            "currency": row["currency"],
            "amount_minor": -row["total"],
        }
        for row in rows
    ]


def balance_by_day(*, organization: Organization, since: date, until: date) -> list[tuple]:
    """The balance at the end of each UTC day in [since, until): (day, minor units)."""
    start = datetime(since.year, since.month, since.day, tzinfo=UTC)
    opening = LedgerEntry.objects.filter(organization=organization, created_at__lt=start).aggregate(
        total=Coalesce(Sum("amount_minor"), 0)
    )["total"]
    moves = dict(
        LedgerEntry.objects.filter(
            organization=organization, created_at__date__gte=since, created_at__date__lt=until
        )
        .annotate(day=TruncDate("created_at"))
        .order_by()
        .values("day")
        .annotate(total=Sum("amount_minor"))
        .values_list("day", "total")
    )
    balance, days, day = opening, [], since
    while day < until:
        balance += moves.get(day, 0)
        days.append((day, balance))
        day = date.fromordinal(day.toordinal() + 1)
    return days


# --- the staff dashboard's utilisation ---------------------------------------------------------

# GPU-seconds delivered per UTC day, as billing counts them. Metered tiers: their usage lines,
# each line's GPU-seconds spread over its metered interval (a correction without an interval
# falls on its start's day), and what their accruals hold that is not booked yet. Reserved terms are charged whole and not metered by the second:
# their delivered time by the same rule (active, reservation outages excluded) × their GPUs.
_METERED_BY_DAY_SQL = """
WITH days AS (
    SELECT d AS day, d + interval '1 day' AS next
    FROM generate_series(%(first)s::timestamptz, %(last)s::timestamptz, interval '1 day') AS d
), metered AS (
    SELECT l.period_start AS since, greatest(coalesce(l.period_end, l.period_start),
                                             l.period_start) AS until,
           l.gpu_seconds::float8 AS gpu_seconds
    FROM billing_ledgerentry l
    WHERE l.kind = %(usage)s AND l.gpu_seconds <> 0 AND l.period_start IS NOT NULL
      -- written once its interval was metered: the index on created_at bounds the read
      AND l.created_at >= %(first)s
      AND coalesce(l.period_end, l.period_start) >= %(first)s
    UNION ALL
    -- Accrued by the metering runs and not booked to the ledger yet (it books hourly).
    SELECT a.booked_until, greatest(a.accrued_until, a.booked_until),
           (a.gpu_seconds - a.booked_gpu_seconds)::float8
    FROM billing_usageaccrual a
    WHERE a.closed_at IS NULL AND a.gpu_seconds <> a.booked_gpu_seconds
      AND a.accrued_until >= %(first)s
    UNION ALL
    -- And the seconds since the last run while its clock runs.
    SELECT a.accrued_until, least(%(now)s, r.ends_at),
           a.gpu_count * extract(epoch FROM least(%(now)s, r.ends_at) - a.accrued_until)
    FROM billing_usageaccrual a JOIN marketplace_reservation r ON r.id = a.reservation_id
    WHERE a.closed_at IS NULL AND a.running AND least(%(now)s, r.ends_at) > a.accrued_until
), reserved AS (
    SELECT r.gpu_count,
           tstzmultirange(tstzrange(r.activated_at, greatest(r.activated_at,
               least(coalesce(r.released_at, %(now)s), r.ends_at, %(now)s)), '[)'))
           - coalesce((SELECT range_agg(tstzrange(o.started_at,
                                                  greatest(o.started_at,
                                                           coalesce(o.ended_at, %(now)s)), '[)'))
                       FROM marketplace_reservationoutage o WHERE o.reservation_id = r.id),
                      '{}'::tstzmultirange) AS delivered
    FROM marketplace_reservation r
    WHERE r.tier = %(reserved)s AND r.activated_at IS NOT NULL AND r.activated_at < %(now)s
      AND coalesce(r.released_at, r.ends_at) > %(first)s
), per_day AS (
    SELECT d.day, m.gpu_seconds * CASE
               WHEN m.until > m.since THEN extract(epoch FROM least(m.until, d.next)
                                                   - greatest(m.since, d.day))
                                           / extract(epoch FROM m.until - m.since)
               ELSE 1 END AS gpu_seconds
    -- each line joins only the days it spans (a line is an hour at most: one or two)
    FROM metered m
    CROSS JOIN LATERAL generate_series(
        date_trunc('day', m.since, 'UTC'),
        date_trunc('day', greatest(m.since, m.until - interval '1 microsecond'), 'UTC'),
        interval '1 day') AS s(day)
    JOIN days d ON d.day = s.day
    UNION ALL
    SELECT d.day, r.gpu_count * extract(epoch FROM upper(x) - lower(x))
    FROM reserved r CROSS JOIN days d
    CROSS JOIN LATERAL unnest(r.delivered * tstzmultirange(tstzrange(d.day, d.next, '[)'))) AS x
)
SELECT days.day, coalesce(sum(p.gpu_seconds), 0)
FROM days LEFT JOIN per_day p ON p.day = days.day
GROUP BY days.day ORDER BY days.day
"""


def delivered_gpu_seconds_by_day(*, first: datetime, days: int, now: datetime) -> list[tuple]:
    """GPU-seconds delivered to customers per UTC day from `first` (a midnight) for `days`
    days, up to `now`, as billing meters them: [(date, seconds), …], every day present."""
    with read_connection().cursor() as cur:
        cur.execute(
            _METERED_BY_DAY_SQL,
            {
                "first": first,
                "last": first + timedelta(days=days - 1),
                "now": now,
                "usage": LedgerKind.USAGE.value,
                "reserved": Tier.RESERVED.value,
            },
        )
        return [(day.date(), float(seconds)) for day, seconds in cur.fetchall()]
