"""Holds: money committed by a booking, counted by the funding gate until charged or released.

A hold is written by the funding gate in the transaction that books a reservation (or extends
it), under the lock on the organisation's billing account, so no two bookings can both count
the same money (DESIGN invariant 9). What is left of it is counted until:
- the meter charges the reservation: its charges (usage and reserved-term lines, net of
  usage corrections) fill its holds in id order, in the transaction that writes them; a hold
  filled completely is `charged`;
- the reservation is cancelled or ends: what was never charged is `released`.

The gate reads the balance and the open holds in one statement, so it sees a charge and the
hold it fills together or not at all.
"""

from django.db import connection
from django.utils import timezone

from billing.models import Hold, HoldStatus, LedgerKind
from marketplace.models import Reservation

__all__ = [
    "money_position",
    "hold_add",
    "holds_charge",
    "holds_release",
    "holds_release_ended",
]

_POSITION_SQL = """
SELECT (SELECT coalesce(sum(amount_minor), 0) FROM billing_ledgerentry
        WHERE organization_id = %(org)s),
       (SELECT coalesce(sum(amount_minor - charged_minor), 0) FROM billing_hold
        WHERE organization_id = %(org)s AND status = 'open')
"""


def money_position(*, organization_id: int) -> tuple[int, int]:
    """(balance, held) in minor units, from one snapshot."""
    with connection.cursor() as cur:
        cur.execute(_POSITION_SQL, {"org": organization_id})
        balance, held = cur.fetchone()
    return int(balance), int(held)


def hold_add(
    *, reservation: Reservation, amount_minor: int, idempotency_key: str, description: str
) -> Hold | None:
    """Hold `amount_minor` for `reservation` (nothing for a zero amount)."""
    if amount_minor <= 0:
        return None
    return Hold.objects.create(
        organization_id=reservation.organization_id,
        reservation=reservation,
        amount_minor=amount_minor,
        currency=reservation.currency,
        idempotency_key=idempotency_key,
        description=description[:200],
    )


# Each open hold's share of what its reservation has been charged: the charges fill the
# reservation's holds (charged or open, in id order) up to each one's amount.
_CHARGE_SQL = f"""
WITH due AS (
    SELECT DISTINCT reservation_id FROM billing_hold
    WHERE status = 'open' AND reservation_id = ANY(%(ids)s)
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
    from marketplace.services.transitions import TERMINAL_STATUSES

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
