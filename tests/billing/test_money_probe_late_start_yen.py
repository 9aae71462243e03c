"""Probes of the late-start rules in yen (a currency without a minor unit), through the API as
a customer meets them: a term stuck past its start, cancelled across a month end, gets back
exactly what it paid (cancellation refund + SLA credits), never more; a cancel exactly at the
start allowance's end is the full-refund side and its wait, nil, is credited nothing."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import BillingAccount, LedgerEntry, LedgerKind
from billing.selectors import balance_minor
from billing.services.credits import sla_credit_issue
from billing.services.usage import reservation_meter
from marketplace.models import Reservation, ReservationStatus, Tier
from tests.billing.conftest import make_reservation
from tests.marketplace.api_fixtures import session_client

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)
MARCH, APRIL = date(2026, 3, 1), date(2026, 4, 1)
A0 = datetime(2026, 4, 1, tzinfo=UTC)
YEN_PER_HOUR = Decimal("1500")  # one GPU for a week: ¥252,000
PAID = 168 * 1500


@pytest.fixture(autouse=True)
def allowance(settings):
    settings.PROVISIONING_READINESS_TIMEOUT_SECONDS = 120


@pytest.fixture
def yen_org(org):
    BillingAccount.objects.filter(organization=org).update(currency="jpy")
    return org


def clock_at(monkeypatch, at: datetime) -> None:
    """The service's clock (django.utils.timezone.now), set: no freezer is installed here."""
    monkeypatch.setattr(timezone, "now", lambda: at)


def stuck_yen_term(org, starts_at: datetime) -> Reservation:
    term = make_reservation(
        org, tier=Tier.RESERVED, gpu_count=1, price=YEN_PER_HOUR, starts_at=starts_at,
        hours=168, status=ReservationStatus.PROVISIONING,
    )  # fmt: skip
    Reservation.objects.filter(pk=term.pk).update(currency="jpy")
    reservation_meter(reservation_id=term.pk, now=starts_at)
    term.refresh_from_db()
    return term


def money_back(term) -> dict[str, int]:
    lines = LedgerEntry.objects.filter(reservation=term).exclude(kind=LedgerKind.RESERVED_CHARGE)
    return {e.idempotency_key: e.amount_minor for e in lines.order_by("id")}


def test_a_yen_term_stuck_across_the_month_end_and_cancelled_gets_back_what_it_paid(
    yen_org, monkeypatch
):
    start = A0 - 4 * H  # 31 March 20:00, never running
    term = stuck_yen_term(yen_org, start)
    client = session_client(yen_org.memberships.get())
    url = f"/api/v1/reservations/{term.public_id}"
    clock_at(monkeypatch, A0 + 3 * H)  # 1 April 03:00

    terms = client.get(f"{url}/cancellation-terms").json()
    # 161 h left at ¥1,500: stated in whole yen, in full (the delay is ours).
    assert Decimal(terms["refund_amount"]) == Decimal(161 * 1500)
    assert Decimal(terms["refund_fraction"]) == 1 and terms["currency"] == "jpy"
    cancelled = client.post(f"{url}/cancel", {"expected_refund_fraction": "1"}, format="json")
    assert cancelled.status_code == 200, cancelled.content

    later = A0 + 40 * 24 * H
    for month in (MARCH, APRIL):
        sla_credit_issue(reservation_id=term.pk, month=month, now=later)

    assert money_back(term) == {
        f"cancel:{term.pk}": 161 * 1500,
        f"sla:{term.pk}:2026-03": 4 * 1500,  # March's 4 h, all down past the allowance
        f"sla:{term.pk}:2026-04": 3 * 1500,  # April's 3 h until the cancel
    }
    assert sum(money_back(term).values()) == PAID
    assert balance_minor(organization=yen_org) == 0
    # Settled once: running the month again adds nothing.
    assert sla_credit_issue(reservation_id=term.pk, month=APRIL, now=later) is None


@pytest.mark.parametrize(
    ("after_start", "fraction", "refund_hours"),
    [(timedelta(seconds=119), "0", 0), (timedelta(seconds=120), "1", None)],
)
def test_a_cancel_at_the_allowance_boundary_is_refunded_by_the_side_it_falls_on(
    yen_org, monkeypatch, after_start, fraction, refund_hours
):
    start = datetime(2026, 3, 10, tzinfo=UTC)
    term = stuck_yen_term(yen_org, start)
    client = session_client(yen_org.memberships.get())
    url = f"/api/v1/reservations/{term.public_id}"
    at = start + after_start
    clock_at(monkeypatch, at)

    response = client.post(f"{url}/cancel", {"expected_refund_fraction": fraction}, format="json")

    assert response.status_code == 200, response.content
    stated = response.json()["cancellation"]
    rest = int(YEN_PER_HOUR * int((term.ends_at - at).total_seconds()) / 3600)
    expected = rest if refund_hours is None else 0
    assert Decimal(stated["refund_amount"]) == expected
    # The wait past the allowance is nil either way: no SLA credit for March.
    assert sla_credit_issue(reservation_id=term.pk, month=MARCH, now=A0 + 9 * 24 * H) is None
    refunds = money_back(term)
    assert refunds == ({f"cancel:{term.pk}": expected} if expected else {})
    assert balance_minor(organization=yen_org) == -PAID + expected


def test_a_bad_expected_refund_fraction_is_a_400_and_cancels_nothing(yen_org, monkeypatch):
    start = datetime(2026, 3, 10, tzinfo=UTC)
    term = stuck_yen_term(yen_org, start)
    client = session_client(yen_org.memberships.get())
    clock_at(monkeypatch, start + 3 * H)

    for bad in ("abc", "-1", "NaN", "Infinity", "1e400"):
        response = client.post(
            f"/api/v1/reservations/{term.public_id}/cancel",
            {"expected_refund_fraction": bad},
            format="json",
        )
        assert response.status_code == 400, (bad, response.content)
    term.refresh_from_db()
    assert term.status == ReservationStatus.PROVISIONING
    assert money_back(term) == {}
