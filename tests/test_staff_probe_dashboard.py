"""The staff dashboard's money figures, exact in each currency's own unit."""

import pytest

from billing.models import LedgerEntry, LedgerKind
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(username="ops", is_staff=True, is_superuser=True))
    return client


def test_the_money_this_month_reads_a_zero_decimal_currency_in_its_own_unit(staff_client):
    org = OrganizationFactory()
    for kind, amount, currency in (
        (LedgerKind.TOP_UP, 500000, "jpy"),  # ¥500,000: a yen has no minor unit
        (LedgerKind.TOP_UP, 123457, "usd"),  # 1,234.57 USD
    ):
        LedgerEntry.objects.create(
            organization=org, kind=kind, amount_minor=amount, currency=currency,
            description="test", idempotency_key=f"test-{currency}",
        )  # fmt: skip

    html = staff_client.get("/staff/").content.decode()

    money = html.split('id="money-table"')[1].split("</table>")[0]
    assert "500,000 JPY" in money  # not 5,000.00 JPY (divided by a hundred cents)
    assert "1,234.57 USD" in money
