"""The portal's money figures are written in the currency's own unit."""

from decimal import Decimal

import pytest

from marketplace.templatetags.portal_format import money


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
