"""Appending to the ledger. An entry's idempotency key makes every writer safe to repeat."""

from datetime import datetime

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from billing.models import LedgerEntry, LedgerKind
from marketplace.models import Organization, Reservation

__all__ = ["ledger_entry_add"]

_SIGN = {
    LedgerKind.USAGE: -1,
    LedgerKind.RESERVED_CHARGE: -1,
    LedgerKind.REFUND: -1,
    LedgerKind.TOP_UP: 1,
    LedgerKind.CREDIT: 1,
    LedgerKind.TERM_REFUND: 1,
    LedgerKind.SLA_CREDIT: 1,
}


def ledger_entry_add(
    *,
    organization: Organization,
    kind: str,
    amount_minor: int,
    currency: str,
    idempotency_key: str,
    reservation: Reservation | None = None,
    period_start: datetime | None = None,
    period_end: datetime | None = None,
    gpu_seconds: int = 0,
    description: str = "",
    created_by: AbstractBaseUser | None = None,
) -> tuple[LedgerEntry, bool]:
    """Add one entry, or return the existing one with the same key (created = False).

    `amount_minor` is signed. Charges are negative and money in is positive; usage may be a
    negative correction of a positive sign only through kind=usage with a positive amount
    (e.g. an outage recorded after the time was metered) — see services.usage.
    """
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise TypeError(f"amount_minor must be int, not {type(amount_minor).__name__}")
    sign = _SIGN.get(kind)
    if kind != LedgerKind.USAGE and sign is not None and amount_minor * sign < 0:
        raise ValueError(f"{kind} entries must have sign {sign:+d}")
    try:
        with transaction.atomic():
            entry = LedgerEntry.objects.create(
                organization=organization,
                kind=kind,
                amount_minor=amount_minor,
                currency=currency,
                idempotency_key=idempotency_key,
                reservation=reservation,
                period_start=period_start,
                period_end=period_end,
                gpu_seconds=gpu_seconds,
                description=description,
                created_by=created_by,
            )
    except IntegrityError:
        existing = LedgerEntry.objects.filter(idempotency_key=idempotency_key).first()
        if existing is None:
            raise
        return existing, False
    return entry, True
