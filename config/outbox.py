"""What the outboxes share (billing's Stripe writes, the marketplace's e-mail): a message is a
row written in the transaction that decided it, and a sender claims it before sending.

A claim is one autocommitted UPDATE: the attempt is counted and the row pushed out of every
other sender's reach for a lease, so two deliveries of the same task never send it at once,
and one whose sender died is sent again once the lease lapses.
"""

from datetime import timedelta

from django.db import connection
from django.db.models import Model

__all__ = ["outbox_backoff", "outbox_claim"]

# clock_timestamp(), not now(): the time of the statement, even inside a longer transaction.
_CLAIM_SQL = """
UPDATE {table}
SET attempts = attempts + 1, next_attempt_at = clock_timestamp() + %s * interval '1 second'
WHERE id = %s AND status = 'pending' AND next_attempt_at <= clock_timestamp(){limit}
RETURNING attempts
"""


def outbox_claim(
    model: type[Model], *, message_id: int, lease: timedelta, max_attempts: int | None = None
) -> int | None:
    """Claim the pending, due row `message_id` of `model` (its table has the columns status,
    attempts and next_attempt_at) for `lease`. Returns its attempt number, or None when it is
    sent, failed, not due yet, claimed by another sender, or has had its `max_attempts`."""
    params = [lease.total_seconds(), message_id]
    limit = ""
    if max_attempts is not None:
        limit, params = " AND attempts < %s", [*params, max_attempts]
    table = connection.ops.quote_name(model._meta.db_table)
    with connection.cursor() as cur:
        cur.execute(_CLAIM_SQL.format(table=table, limit=limit), params)
        claimed = cur.fetchone()
    return None if claimed is None else claimed[0]


def outbox_backoff(attempts: int, *, first: timedelta, cap: timedelta) -> timedelta:
    """`first` after the first attempt, doubling with each one after it, at most `cap`."""
    return min(first * 2 ** min(max(attempts - 1, 0), 30), cap)
