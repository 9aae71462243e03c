"""The span of dates and times the product reads from anyone (the API, the portal, feeds).

Nothing is booked, searched, billed or priced outside these years, and a time near datetime's
own limits (9999-12-31) overflows the moment a period's length or a day is added to it: such
input is refused where it is read, with this message, instead of failing later.
"""

from datetime import UTC, date, datetime

__all__ = ["EARLIEST", "LATEST", "OUT_OF_RANGE", "within_bounds"]

EARLIEST, LATEST = date(2000, 1, 1), date(2100, 1, 1)
OUT_OF_RANGE = "Pick a date from 2000 to 2099."


def within_bounds(value: date | datetime) -> bool:
    """Whether a date, or a time (in UTC when it carries an offset), lies from 2000 to 2099."""
    if isinstance(value, datetime):
        day = (value.astimezone(UTC) if value.tzinfo else value).date()
    else:
        day = value
    return EARLIEST <= day < LATEST
