"""Usage and ledger exports as CSV: one row per reservation and day, exact decimals, streamed."""

import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest

from billing.models import LedgerKind
from billing.services.ledger import ledger_entry_add
from billing.services.usage import reservation_meter
from config.dates import iso_utc
from marketplace.models import Role
from tests.billing.conftest import T0, make_reservation
from tests.factories import MembershipFactory, OrganizationFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def client(api_client, org):
    api_client.force_authenticate(org.memberships.get().user)
    return api_client


def _rows(response) -> list[dict]:
    assert response.status_code == 200, response.content
    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def test_usage_csv_has_a_row_per_reservation_and_day_with_exact_amounts(org, client):
    # 2 GPUs at 1.8333 per GPU-hour from 22:00 to 02:00: two hours on each of two days.
    night = T0.replace(hour=22)
    one = make_reservation(org, gpu_count=2, price=Decimal("1.8333"), starts_at=night,
                           activated_at=night)  # fmt: skip
    reservation_meter(reservation_id=one.pk, now=night + timedelta(hours=2))
    reservation_meter(reservation_id=one.pk, now=night + timedelta(hours=4))
    other = make_reservation(OrganizationFactory(), activated_at=night, starts_at=night)
    reservation_meter(reservation_id=other.pk, now=night + timedelta(hours=4))  # not ours

    response = client.get("/api/v1/billing/usage.csv")
    rows = _rows(response)

    assert 'filename="switchyard-usage-' in response["Content-Disposition"]
    assert list(rows[0]) == ["day", "reservation", "gpu_model", "site", "gpu_seconds", "amount",
                             "currency", "kwh", "kg_co2e"]  # fmt: skip
    assert [(r["day"], r["reservation"], r["gpu_seconds"], r["amount"]) for r in rows] == [
        ("2026-03-02", one.public_id, "14400", "7.33"),  # 4 GPU-hours × 1.8333 = 7.3332
        # The meter rounds the running total (14.6664 → 14.67), not each day on its own.
        ("2026-03-03", one.public_id, "14400", "7.34"),
    ]
    assert rows[0]["gpu_model"] == one.gpu_model.slug and rows[0]["site"] == one.site.slug
    assert rows[0]["currency"] == "usd"
    assert rows[0]["kwh"] == "3.220"  # 4 GPU-hours × 700 W × PUE 1.15
    assert rows[0]["kg_co2e"] == ""  # the site's grid intensity is unknown

    march_3 = _rows(client.get("/api/v1/billing/usage.csv?since=2026-03-03&until=2026-03-04"))
    assert [r["day"] for r in march_3] == ["2026-03-03"]


def test_the_ledger_csv_lists_every_entry_signed(org, client):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=5000, currency="usd",
                     idempotency_key="c1", description="welcome, with a comma")  # fmt: skip
    reservation = make_reservation(org, gpu_count=1, price=Decimal("2.0000"), activated_at=T0)
    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))

    rows = _rows(client.get("/api/v1/billing/ledger.csv"))

    assert [(r["kind"], r["amount"], r["reservation"]) for r in rows] == [
        (LedgerKind.CREDIT, "50.00", ""),
        (LedgerKind.USAGE, "-2.00", reservation.public_id),
    ]
    assert rows[0]["description"] == "welcome, with a comma"
    assert rows[1]["gpu_seconds"] == "3600"
    # Times as the API writes them: UTC with "Z".
    assert (rows[1]["period_start"], rows[1]["period_end"]) == (
        iso_utc(T0), iso_utc(T0 + timedelta(hours=1))
    )  # fmt: skip
    assert rows[0]["created_at"].endswith("Z")


def test_a_bad_period_is_a_400_in_the_error_shape(client):
    response = client.get("/api/v1/billing/usage.csv?since=yesterday")
    assert response.status_code == 400
    assert response.json()["error"]["field"] == "since"


@pytest.mark.parametrize("path", ["usage", "usage.csv", "ledger.csv"])
def test_a_period_that_ends_before_it_begins_is_a_400_not_nothing(client, path):
    response = client.get(f"/api/v1/billing/{path}?since=2026-12-09&until=2026-12-01")
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (
        "period_invalid", "until"
    )  # fmt: skip


@pytest.mark.parametrize("text", ['=HYPERLINK("http://evil.example")', "+1+1", "-2", "@SUM(A1)",
                                  "\tx"])  # fmt: skip
def test_a_ledger_description_never_reaches_a_spreadsheet_as_a_formula(client, org, text):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=100, currency="usd",
                     idempotency_key="f", description=text)  # fmt: skip
    (row,) = _rows(client.get("/api/v1/billing/ledger.csv"))
    assert row["description"] == "'" + text


def test_no_text_cell_of_an_export_reaches_a_spreadsheet_as_a_formula(client, org):
    # Slugs staff set in the admin (its slug check lets one start with "-") are written by the
    # same writer as descriptions; numbers stay numbers (a negative amount is not quoted).
    reservation = make_reservation(org, activated_at=T0, starts_at=T0)
    type(reservation.site).objects.filter(pk=reservation.site_id).update(slug="-a1")
    type(reservation.gpu_model).objects.filter(pk=reservation.gpu_model_id).update(slug="-sum")
    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))

    (usage,) = _rows(client.get("/api/v1/billing/usage.csv"))
    (ledger,) = _rows(client.get("/api/v1/billing/ledger.csv"))

    assert (usage["site"], usage["gpu_model"]) == ("'-a1", "'-sum")
    assert Decimal(usage["amount"]) > 0
    assert ledger["amount"] == "-" + usage["amount"]  # a number, not "'-…"


def test_the_portal_downloads_the_same_csv(org):
    from tests.clients import HttpsClient

    member = MembershipFactory(organization=org, role=Role.BILLING)
    browser = HttpsClient()
    browser.force_login(member.user)
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=123, currency="usd",
                     idempotency_key="c1")  # fmt: skip
    rows = _rows(browser.get("/billing/ledger.csv?since=&until="))
    assert [r["amount"] for r in rows] == ["1.23"]
    assert rows[0]["created_at"].endswith("Z")
    assert _rows(browser.get("/billing/usage.csv")) == []
    assert browser.get("/billing/usage.csv?since=bad").status_code == 400
