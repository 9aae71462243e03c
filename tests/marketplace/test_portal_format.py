"""The portal's money figures are written in the currency's own unit."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from marketplace.templatetags.portal_format import duration, money, utc


@pytest.mark.parametrize(
    ("value", "currency", "shown"),
    [
        (Decimal("65370.62"), "usd", "65,370.62 USD"),
        (Decimal("500000"), "jpy", "500,000 JPY"),  # no cents in yen
        ("1234.5", "eur", "1,234.50 EUR"),
        (Decimal("2"), "", "2.00"),
        (None, "usd", "—"),
    ],
)
def test_money_is_written_with_the_currencys_decimals(value, currency, shown):
    assert money(value, currency) == shown


@pytest.mark.parametrize(
    ("seconds", "shown", "exact"),
    [
        (3600, "1 h 00 min", "1 h 00 min"),
        (3636, "1 h 00 min", "1 h 00 min 36 s"),  # what an extension is priced for
        (125, "2 min", "2 min 05 s"),
        (59, "0 min", "59 s"),
        (90061, "1 d 1 h", "1 d 1 h 01 min 01 s"),
        (timedelta(minutes=5), "5 min", "5 min"),
    ],
)
def test_a_duration_is_to_the_minute_or_exact_to_the_second(seconds, shown, exact):
    assert (duration(seconds), duration(seconds, "exact")) == (shown, exact)


def test_a_time_keeps_its_seconds_only_when_asked_and_off_the_minute():
    odd, whole = (
        datetime(2026, 12, 8, 0, 58, 24, tzinfo=UTC),
        datetime(2026, 12, 8, 1, 59, tzinfo=UTC),
    )
    assert (utc(odd), utc(odd, "seconds")) == ("2026-12-08 00:58 UTC", "2026-12-08 00:58:24 UTC")
    assert utc(whole, "seconds") == "2026-12-08 01:59 UTC"
