"""The metering run (every minute): a few set-based statements whatever the number of
reservations, then the funding rules for the organisations they concern.

1. reserved terms booked since the last run are charged (once each);
2. usage accrues: every started metered reservation has an accrual, set in one statement to
   what it delivered up to now (billing.services.usage);
3. usage is booked: one ledger line per reservation not booked since the hour began (up to the
   hour, at the reservation's minute of the hour: id % BILLING_USAGE_BOOK_SPREAD_MINUTES, so
   the hour's lines are spread over that many runs) and per ended reservation (up to its end), in one statement with the accruals' booked
   figures, and the holds those lines fill;
4. accruals of reservations that ended over two days ago and are booked in full are closed;
5. cancelled reserved terms are settled, protected reservations a forced grid curtailment
   preempted are credited, and what ended reservations still hold is released;
6. the funding rules: every prepaid organisation's position (balance − accrued − held) in one
   statement, and the ones whose state must move (or whose automatic recharge is due) go
   through funding_state_update.
Each step is idempotent and recomputes from the database, so a run killed between two
statements, or two runs at once, leaves nothing doubled or lost: the next run finishes it.
"""

from datetime import datetime

from django.db import connection
from django.utils import timezone

from billing.models import FundingState
from billing.services.credits import (
    cancellation_settle,
    cancellations_due,
    curtailment_forced_credit_issue,
    curtailment_forced_credits_due,
)
from billing.services.funding import funding_state_update
from billing.services.holds import POSITIONS_SQL, holds_release_ended, open_holds_fold
from billing.services.usage import (
    reservations_meter,
    reserved_terms_to_charge,
    usage_accruals_close,
    usage_accruals_open,
    usage_accrue,
    usage_book,
)
from marketplace.models import Organization

__all__ = ["usage_meter_run", "funding_states_update"]

BATCH = 500


def usage_meter_run(*, now: datetime | None = None) -> int:
    """One run; returns the number of usage lines written."""
    now = (now or timezone.now()).replace(microsecond=0)
    reserved = reserved_terms_to_charge()
    for i in range(0, len(reserved), BATCH):
        reservations_meter(reservation_ids=reserved[i : i + BATCH], now=now)
    usage_accruals_open()
    usage_accrue(now=now)
    written = len(usage_book(now=now))
    usage_accruals_close(now=now)
    for reservation_id in cancellations_due():
        cancellation_settle(reservation_id=reservation_id)
    for reservation_id in curtailment_forced_credits_due(now=now):
        curtailment_forced_credit_issue(reservation_id=reservation_id)
    holds_release_ended()
    open_holds_fold()
    funding_states_update(now=now)
    return written


def funding_states_update(*, now: datetime) -> list[int]:
    """Apply the funding rules to every prepaid organisation that needs it, found in one
    statement: its state would move, or its automatic recharge is due or must be re-armed.
    Organisations in good standing with nothing accrued or held are left alone while they
    stay at or above the threshold, or no money ever moved (a new organisation with an empty
    balance is not warned); one a charge took below it (a reserved term, booked and charged
    between two runs) is warned and recharged. Returns the ids it acted on."""
    with connection.cursor() as cur:
        cur.execute(POSITIONS_SQL)
        rows = cur.fetchall()
    due = []
    for (org_id, balance, accrued, held, state, threshold, recharge_due, armed, grace_until,
         money_moved) in rows:  # fmt: skip
        available = balance - accrued - held
        idle = accrued == 0 and held == 0 and state == FundingState.OK
        if idle and (available >= threshold or not money_moved):
            continue
        if available >= threshold:
            act = state != FundingState.OK or not armed
        elif available > 0:
            act = state != FundingState.WARNING or recharge_due
        else:
            act = (
                state in (FundingState.OK, FundingState.WARNING, FundingState.SUSPENDED)
                or recharge_due
                or (state == FundingState.GRACE and grace_until is not None and now >= grace_until)
            )
        if act:
            due.append(org_id)
    for organization in Organization.objects.filter(pk__in=due).order_by("pk"):
        funding_state_update(organization=organization, now=now)
    return sorted(due)
