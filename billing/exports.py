"""CSV exports of usage and the ledger, streamed row by row (the API and the portal share them).

Amounts are exact decimals in major units, as the API shows them (from minor units, never
through a float); energy is the estimate the usage page shows. Every export is written by
_lines: numbers stay numbers, and every text cell goes through csv_text, so no text (a
description, a reason, a slug) reaches a spreadsheet as a formula.
"""

import csv
from collections.abc import Iterator
from datetime import date
from decimal import Decimal

from billing.money import from_minor_units
from billing.selectors import (
    ledger_for_org,
    statement_entries,
    statement_opening_minor,
    usage_by_reservation_day,
    usage_row_energy,
    usage_unbooked_by_reservation_day,
    usage_with_unbooked,
)
from config.dates import iso_utc
from marketplace.models import Organization

__all__ = [
    "USAGE_COLUMNS",
    "LEDGER_COLUMNS",
    "STATEMENT_COLUMNS",
    "csv_text",
    "usage_csv_lines",
    "ledger_csv_lines",
    "statement_csv_lines",
]

USAGE_COLUMNS = [
    "day", "reservation", "gpu_model", "site", "gpu_seconds", "amount", "currency", "kwh",
    "kg_co2e",
]  # fmt: skip
LEDGER_COLUMNS = [
    "id", "created_at", "kind", "amount", "currency", "reservation", "period_start",
    "period_end", "gpu_seconds", "description",
]  # fmt: skip
STATEMENT_COLUMNS = [
    "date_utc", "kind", "description", "reservation", "period_start", "period_end",
    "gpu_seconds", "amount", "currency", "balance_after",
]  # fmt: skip
_CHUNK = 2000


def csv_text(value: str) -> str:
    """Text a spreadsheet will not run as a formula: one starting with =, +, -, @, a tab or a
    carriage return gets a leading apostrophe (OWASP's rule). _lines applies it to every text
    cell; numbers (int, Decimal: a negative amount) are written as they are."""
    return f"'{value}" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _cell(value):
    if isinstance(value, int | Decimal):
        return value
    return "" if value is None else csv_text(str(value))


class _Line:
    """A file-like that hands back what csv.writer writes, one line at a time."""

    def write(self, value: str) -> str:
        return value


def _lines(header: list[str], rows: Iterator[list]) -> Iterator[str]:
    writer = csv.writer(_Line(), lineterminator="\n")
    yield writer.writerow(header)
    for row in rows:
        yield writer.writerow([_cell(value) for value in row])


def usage_csv_lines(
    *, organization: Organization, since: date | None, until: date | None
) -> Iterator[str]:
    """One line per reservation and UTC day, oldest day first: charged amounts positive, to
    the second (the usage accrued and not yet booked is in its day's line)."""
    rows = usage_with_unbooked(
        usage_by_reservation_day(organization=organization, since=since, until=until)
        .order_by("day", "reservation__public_id")
        .iterator(chunk_size=_CHUNK),
        usage_unbooked_by_reservation_day(organization=organization, since=since, until=until),
    )

    def values():
        for row in rows:
            energy = usage_row_energy(row)
            yield [
                row["day"].isoformat(),
                row["reservation__public_id"] or "",
                row["reservation__gpu_model__slug"] or "",
                row["reservation__site__slug"] or "",
                row["gpu_seconds"],
                from_minor_units(-row["amount_minor"], row["currency"]),
                row["currency"],
                "" if energy is None else energy.kwh,
                "" if energy is None or energy.kg_co2e is None else energy.kg_co2e,
            ]

    return _lines(USAGE_COLUMNS, values())


def ledger_csv_lines(
    *, organization: Organization, since: date | None, until: date | None
) -> Iterator[str]:
    """Every ledger entry created in [since, until), oldest first, signed as stored."""
    entries = ledger_for_org(organization=organization)
    if since is not None:
        entries = entries.filter(created_at__date__gte=since)
    if until is not None:
        entries = entries.filter(created_at__date__lt=until)
    entries = entries.order_by("created_at", "id").iterator(chunk_size=_CHUNK)

    def values():
        for entry in entries:
            yield [
                entry.public_id,
                iso_utc(entry.created_at),
                entry.kind,
                from_minor_units(entry.amount_minor, entry.currency),
                entry.currency,
                entry.reservation.public_id if entry.reservation_id else "",
                iso_utc(entry.period_start) if entry.period_start else "",
                iso_utc(entry.period_end) if entry.period_end else "",
                entry.gpu_seconds,
                entry.description,
            ]

    return _lines(LEDGER_COLUMNS, values())


def statement_csv_lines(*, organization: Organization, month: date, currency: str) -> Iterator[str]:
    """One month's statement (billing.selectors.statement_for_month): the opening balance, every
    ledger line with the balance after it, the closing balance; amounts signed as in the
    ledger. Streamed: the month's lines are read a chunk at a time, the balance run as they go."""

    def values():
        balance = statement_opening_minor(organization=organization, month=month)
        yield [f"{month.isoformat()}T00:00:00Z", "opening_balance", "", "", "", "", "", "",
               currency, from_minor_units(balance, currency)]  # fmt: skip
        entries = statement_entries(organization=organization, month=month)
        for e in entries.iterator(chunk_size=_CHUNK):
            balance += e.amount_minor
            yield [
                iso_utc(e.created_at),
                e.kind,
                e.description,
                e.reservation.public_id if e.reservation_id else "",
                iso_utc(e.period_start) if e.period_start else "",
                iso_utc(e.period_end) if e.period_end else "",
                e.gpu_seconds,
                from_minor_units(e.amount_minor, currency),
                currency,
                from_minor_units(balance, currency),
            ]
        yield ["", "closing_balance", "", "", "", "", "", "", currency,
               from_minor_units(balance, currency)]  # fmt: skip

    return _lines(STATEMENT_COLUMNS, values())
