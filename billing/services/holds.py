"""Holds: money committed by a booking, counted by the funding gate until charged or released.

A hold is written by the funding gate in the transaction that books a reservation (or extends
it), under the lock on the organisation's billing account, so no two bookings can both count
the same money (DESIGN invariant 9). What is left of it is counted until:
- the meter charges the reservation: its charges (usage and reserved-term lines, net of
  usage corrections) fill its holds in id order, in the transaction that writes them; a hold
  filled completely is `charged`;
- the reservation is cancelled or ends: what was never charged is `released`.

The gate reads the balance, the usage accrued and not yet booked, and the open holds in one
statement, so it sees a charge and the hold it fills together or not at all; a reservation's
accrued usage fills its holds first (money_position), so neither is counted twice.
"""

from typing import NamedTuple

from django.db import connection
from django.utils import timezone

from billing.models import Hold, HoldStatus, LedgerKind
from config.db import model_insert
from marketplace.models import Reservation
from marketplace.rules import TERMINAL_STATUSES

__all__ = [
    "MoneyPosition",
    "POSITIONS_SQL",
    "POSITION_FROM_EVERY_HOLD_SQL",
    "money_position",
    "open_holds_fold",
    "FOLD_AT",
    "hold_add",
    "holds_charge",
    "holds_release",
    "holds_release_ended",
]


# Organisations' money in one snapshot: the balance (kept by the ledger's trigger), what their
# reservations accrued and the ledger does not have yet, and what their open holds still commit
# beyond that. Per reservation, accrued usage fills its holds first (the hold is that usage
# committed ahead), so the two are never counted twice: its exposure is max(unbooked, held),
# and its held part max(held − unbooked⁺, 0) = held − min(held, unbooked⁺) (held ≥ 0). Summed
# per organisation, that is its open holds' sum (the triggers' deltas, billing migration 0009)
# less, for its running reservations (the open accruals), the part of their holds their
# unbooked usage already fills: no statement reads every open hold, only the running
# reservations' ones. `sums` has the figures by organisation, in rows to add up.
def _money_sql(org_filter: str) -> str:
    where = f"AND {org_filter}" if org_filter else ""
    return f"""
WITH u AS (
    SELECT organization_id, reservation_id, accrued_minor - booked_minor AS unbooked
    FROM billing_usageaccrual WHERE closed_at IS NULL {where}
), filled AS (
    SELECT u.organization_id,
           least(sum(h.amount_minor - h.charged_minor), greatest(u.unbooked, 0)) AS filled
    FROM u JOIN billing_hold h
         ON h.reservation_id = u.reservation_id AND h.organization_id = u.organization_id
    WHERE h.status = 'open'
    GROUP BY u.organization_id, u.reservation_id, u.unbooked
), sums AS (
    SELECT organization_id, unbooked, 0 AS held, 0 AS deltas FROM u
    UNION ALL
    SELECT organization_id, 0, amount_minor, 1 FROM billing_openholdsdelta WHERE TRUE {where}
    UNION ALL
    SELECT organization_id, 0, -filled, 0 FROM filled
)"""


# One organisation's position, for the gate on every booking and extension, and how many
# delta rows it summed.
_POSITION_SQL = (
    _money_sql("organization_id = %(org)s")
    + """
SELECT (SELECT coalesce(sum(amount_minor), 0) FROM billing_balance
        WHERE organization_id = %(org)s),
       coalesce(sum(unbooked), 0), coalesce(sum(held), 0), coalesce(sum(deltas), 0)
FROM sums
"""
)

# The definition the statements here compute faster: one organisation's figures from every
# open hold and accrual, per reservation max(unbooked, held). Not read by the gate or the
# run; the tests and the billing benchmark compare with it.
POSITION_FROM_EVERY_HOLD_SQL = """
WITH u AS (
    SELECT reservation_id, accrued_minor - booked_minor AS unbooked
    FROM billing_usageaccrual WHERE closed_at IS NULL AND organization_id = %(org)s
), h AS (
    SELECT reservation_id, sum(amount_minor - charged_minor) AS held
    FROM billing_hold WHERE status = 'open' AND organization_id = %(org)s
    GROUP BY reservation_id
)
SELECT (SELECT coalesce(sum(amount_minor), 0) FROM billing_balance
        WHERE organization_id = %(org)s),
       coalesce(sum(coalesce(u.unbooked, 0)), 0),
       coalesce(sum(greatest(coalesce(h.held, 0) - greatest(coalesce(u.unbooked, 0), 0), 0)), 0)
FROM u FULL JOIN h ON h.reservation_id = u.reservation_id
"""

# Every prepaid account's position, for the metering run's funding pass (one statement), and
# whether money ever moved on it (its balance row is written by its first ledger line).
POSITIONS_SQL = (
    _money_sql("")
    + """, per_org AS (
    SELECT organization_id, sum(unbooked) AS unbooked, sum(held) AS held
    FROM sums GROUP BY organization_id
)
SELECT ba.organization_id, coalesce(b.amount_minor, 0), coalesce(s.unbooked, 0),
       coalesce(s.held, 0), ba.funding_state, ba.recharge_threshold_minor,
       ba.auto_recharge_enabled AND ba.recharge_armed, ba.recharge_armed, ba.grace_until,
       b.organization_id IS NOT NULL
FROM billing_billingaccount ba
LEFT JOIN billing_balance b ON b.organization_id = ba.organization_id
LEFT JOIN per_org s ON s.organization_id = ba.organization_id
WHERE ba.mode = 'prepaid'
"""
)


class MoneyPosition(NamedTuple):
    """An organisation's money in minor units: `available` is what new commitments can use."""

    balance: int
    accrued: int  # usage accrued and not yet booked to the ledger (negative: a correction)
    held: int  # open holds beyond the usage that already fills them

    @property
    def available(self) -> int:
        return self.balance - self.accrued - self.held


def money_position(*, organization_id: int, fold: bool = False) -> MoneyPosition:
    """Balance, accrued-but-unbooked usage and holds, from one snapshot.

    With `fold` (the gate, under the organisation's account lock), its open-hold deltas are
    folded into one row once it has more than FOLD_AT of them: an organisation booking many
    times a minute would otherwise make each booking sum every delta since the last metering
    run's fold."""
    with connection.cursor() as cur:
        cur.execute(_POSITION_SQL, {"org": organization_id})
        balance, accrued, held, deltas = cur.fetchone()
        if fold and deltas > FOLD_AT:
            cur.execute(_FOLD_ORG_SQL, {"org": organization_id})
    return MoneyPosition(int(balance), int(accrued), int(held))


def _fold_sql(org_filter: str) -> str:
    """The deltas of each organisation with several (of one, with `org_filter`) folded into one
    row; one with a single row is already folded, so nothing is rewritten every minute. Rows
    another transaction holds (a fold, a statement adding to them) are skipped and stay for the
    next fold, so a fold never waits; rows committed after it began are not in its snapshot and
    stay too: nothing is counted twice or lost."""
    return f"""
WITH several AS (
    SELECT organization_id FROM billing_openholdsdelta WHERE TRUE {org_filter}
    GROUP BY organization_id HAVING count(*) > 1
), folded AS (
    DELETE FROM billing_openholdsdelta WHERE id IN (
        SELECT d.id FROM billing_openholdsdelta d JOIN several USING (organization_id)
        FOR UPDATE OF d SKIP LOCKED)
    RETURNING organization_id, amount_minor
)
INSERT INTO billing_openholdsdelta (organization_id, amount_minor)
SELECT organization_id, sum(amount_minor) FROM folded
GROUP BY organization_id HAVING sum(amount_minor) <> 0 ORDER BY organization_id
"""


# Every organisation's deltas, by the metering run; one organisation's, by the gate.
_FOLD_SQL = _fold_sql("")
_FOLD_ORG_SQL = _fold_sql("AND organization_id = %(org)s")

# How many deltas an organisation may have before the gate folds them (money_position).
FOLD_AT = 32


def open_holds_fold() -> int:
    """Fold each organisation's open-hold deltas into one row (the metering run, every minute,
    so an organisation's sum reads a handful of rows). Returns the rows written."""
    with connection.cursor() as cur:
        cur.execute(_FOLD_SQL)
        return cur.rowcount


def hold_add(
    *, reservation: Reservation, amount_minor: int, idempotency_key: str, description: str
) -> Hold | None:
    """Hold `amount_minor` for `reservation` (nothing for a zero amount)."""
    if amount_minor <= 0:
        return None
    return model_insert(
        Hold(
            organization_id=reservation.organization_id,
            reservation=reservation,
            amount_minor=amount_minor,
            currency=reservation.currency,
            idempotency_key=idempotency_key,
            description=description[:200],
        )
    )


# Each open hold's share of what its reservation has been charged: the charges fill the
# reservation's holds (charged or open, in id order) up to each one's amount.
_CHARGE_SQL = f"""
WITH due AS (
    SELECT DISTINCT reservation_id FROM billing_hold
    WHERE status = 'open' AND reservation_id IN (SELECT unnest(%(ids)s::bigint[]))
), charged AS (
    SELECT l.reservation_id, -coalesce(sum(l.amount_minor), 0) AS total
    FROM billing_ledgerentry l JOIN due USING (reservation_id)
    WHERE l.kind IN ('{LedgerKind.USAGE}', '{LedgerKind.RESERVED_CHARGE}')
    GROUP BY l.reservation_id
), filled AS (
    SELECT h.id, h.amount_minor,
           greatest(0, c.total - (sum(h.amount_minor) OVER w - h.amount_minor)) AS share
    FROM billing_hold h JOIN charged c USING (reservation_id)
    WHERE h.status <> 'released'
    WINDOW w AS (PARTITION BY h.reservation_id ORDER BY h.id)
)
UPDATE billing_hold h
SET charged_minor = least(filled.amount_minor, filled.share),
    status = CASE WHEN filled.share >= filled.amount_minor THEN 'charged' ELSE 'open' END,
    closed_at = CASE WHEN filled.share >= filled.amount_minor THEN %(now)s END
FROM filled
WHERE h.id = filled.id AND h.status = 'open'
"""


def holds_charge(*, reservation_ids: list[int]) -> None:
    """Bring the open holds of these reservations up to what the ledger has charged them."""
    if reservation_ids:
        with connection.cursor() as cur:
            cur.execute(_CHARGE_SQL, {"ids": list(reservation_ids), "now": timezone.now()})


def holds_release(*, reservation_ids: list[int]) -> int:
    """Release what is left of these reservations' open holds (they will charge no more)."""
    return Hold.objects.filter(reservation_id__in=reservation_ids, status=HoldStatus.OPEN).update(
        status=HoldStatus.RELEASED, closed_at=timezone.now()
    )


def holds_release_ended() -> int:
    """Release the open holds of reservations that have ended or been released (the meter's
    sweep, after it has charged them up to their end)."""
    ended = Reservation.objects.filter(released_at__isnull=False) | Reservation.objects.filter(
        status__in=TERMINAL_STATUSES
    )
    ids = list(
        Hold.objects.filter(status=HoldStatus.OPEN, reservation__in=ended)
        .values_list("reservation_id", flat=True)
        .distinct()
    )
    holds_charge(reservation_ids=ids)
    return holds_release(reservation_ids=ids)
