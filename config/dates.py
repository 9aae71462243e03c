"""The span of dates and times the product reads from anyone (the API, the portal, feeds).

Nothing is booked, searched, billed or priced outside these years, and a time near datetime's
own limits (9999-12-31) overflows the moment a period's length or a day is added to it: such
input is refused where it is read, with this message, instead of failing later.
"""

from datetime import UTC, date, datetime

__all__ = ["EARLIEST", "LATEST", "OUT_OF_RANGE", "within_bounds", "iso_utc", "iso_utc_within"]

EARLIEST, LATEST = date(2000, 1, 1), date(2100, 1, 1)
OUT_OF_RANGE = "Pick a date from 2000 to 2099."


def within_bounds(value: date | datetime) -> bool:
    """Whether a date, or a time (in UTC when it carries an offset), lies from 2000 to 2099."""
    if isinstance(value, datetime):
        day = (value.astimezone(UTC) if value.tzinfo else value).date()
    else:
        day = value
    return EARLIEST <= day < LATEST


def iso_utc(value: datetime) -> str:
    """A time as the API writes every time: ISO 8601 in UTC with "Z" (2026-12-01T00:00:00Z),
    as DRF renders its fields. For times kept in JSON (a reservation's cancellation terms and
    extensions, audit changes, event data) and in exports, which isoformat() wrote "+00:00"."""
    text = value.astimezone(UTC).isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def iso_utc_within(value):
    """`value` (JSON a service wrote) with every UTC time in it written as iso_utc writes it:
    shows rows kept before times were written so (an audit entry is never rewritten)."""
    if isinstance(value, dict):
        return {k: iso_utc_within(v) for k, v in value.items()}
    if isinstance(value, list):
        return [iso_utc_within(v) for v in value]
    if isinstance(value, str) and value.endswith("+00:00") and len(value) >= 25:
        try:
            return iso_utc(datetime.fromisoformat(value))
        except ValueError:
            return value
    return value
