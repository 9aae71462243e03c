"""A reserved term is charged from its start: a start the platform delays past the start
allowance (PROVISIONING_READINESS_TIMEOUT_SECONDS) is downtime under the SLA, and cancelling a
term that is still not running refunds its unused rest in full. Tiers charged as used state
no refund, because none is ever credited (docs/money.md)."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.selectors import balance_minor
from billing.services.credits import (
    cancellation_settle,
    cancellations_due,
    reservation_month_uptime,
    sla_credit_issue,
    sla_credits_issue_for_month,
)
from billing.services.usage import reservation_meter
from marketplace.models import Reservation, ReservationStatus, Tier
from marketplace.services.pricing import period_total
from marketplace.services.reservations import cancellation_terms, reservation_cancel
from tests.billing.conftest import make_reservation
from tests.marketplace.api_fixtures import session_client

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)
MARCH, APRIL = date(2026, 3, 1), date(2026, 4, 1)
M0, A0 = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 4, 1, tzinfo=UTC)
WEEK = 168 * 3600
PRICE = Decimal("10.0000")  # one GPU: a week is 1680.00


@pytest.fixture(autouse=True)
def allowance(settings):
    settings.PROVISIONING_READINESS_TIMEOUT_SECONDS = 120


def week(org, *, starts_at, activated_at, tier=Tier.RESERVED, status=ReservationStatus.COMPLETED):
    """A one-GPU week at 10.00 per GPU-hour, charged as its tier is (a term up front)."""
    ended = status == ReservationStatus.COMPLETED
    reservation = make_reservation(
        org, tier=tier, gpu_count=1, price=PRICE, starts_at=starts_at, hours=168,
        status=status, activated_at=activated_at, released_at=starts_at + 168 * H if ended else None,
    )  # fmt: skip
    reservation_meter(reservation_id=reservation.pk, now=starts_at + 168 * H)
    return reservation


def sla_lines(reservation) -> list[tuple[str, int]]:
    return list(
        LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.SLA_CREDIT)
        .order_by("id")
        .values_list("idempotency_key", "amount_minor")
    )


# --- 1. a late start is downtime for a reserved term --------------------------------------


def test_a_reserved_term_started_three_hours_late_is_credited_for_the_wait(org):
    start = M0 + timedelta(days=9)
    late = week(org, starts_at=start, activated_at=start + 3 * H)
    on_time = week(org, starts_at=start, activated_at=start + timedelta(seconds=119))
    metered = week(org, starts_at=start, activated_at=start + 3 * H, tier=Tier.ON_DEMAND)
    after = M0 + timedelta(days=40)

    # From the start plus the allowance (120 s) until active: 3 h less 120 s down.
    assert reservation_month_uptime(reservation=late, month=MARCH, now=after) == (WEEK, 10680)
    assert reservation_month_uptime(reservation=on_time, month=MARCH, now=after) == (WEEK, 0)
    # On-demand is charged only from activation: its wait is neither charged nor measured.
    assert reservation_month_uptime(reservation=metered, month=MARCH, now=after) == (
        WEEK - 3 * 3600, 0,
    )  # fmt: skip

    assert sla_credits_issue_for_month(month=MARCH, now=after) == 1
    # 1 − 10680 / 604800 = 98.23 % uptime: 25 % of the 1680.00 charged.
    assert sla_lines(late) == [(f"sla:{late.pk}:2026-03", 42000)]
    assert sla_lines(on_time) == [] and sla_lines(metered) == []


def test_a_wait_across_the_month_end_counts_in_each_month(org):
    start = M0 + timedelta(days=30, hours=23)  # 31 March 23:00, active 1 April 02:00
    term = week(org, starts_at=start, activated_at=A0 + 2 * H)

    assert reservation_month_uptime(reservation=term, month=MARCH, now=A0 + 40 * 24 * H) == (
        3600, 3600 - 120,
    )  # fmt: skip
    assert reservation_month_uptime(reservation=term, month=APRIL, now=A0 + 40 * 24 * H) == (
        WEEK - 3600, 7200,
    )  # fmt: skip

    # March is taken up though the term became active only in April.
    assert sla_credits_issue_for_month(month=MARCH, now=A0 + 9 * 24 * H) == 1
    assert sla_credits_issue_for_month(month=APRIL, now=A0 + 39 * 24 * H) == 1
    assert sla_lines(term) == [
        (f"sla:{term.pk}:2026-03", 1000),  # 3.3 % up: all of March's 1 h share (10.00)
        (f"sla:{term.pk}:2026-04", 41750),  # 98.8 % up: 25 % of April's 1670.00
    ]


def test_the_sla_credit_for_a_late_start_shows_in_what_the_api_says_it_cost(org):
    start = M0 + timedelta(days=9)
    term = week(org, starts_at=start, activated_at=start + 3 * H)
    client = session_client(org.memberships.get())
    url = f"/api/v1/reservations/{term.public_id}"
    assert client.get(url).json()["charged"] == "1680.00"

    sla_credits_issue_for_month(month=MARCH, now=M0 + timedelta(days=40))

    assert client.get(url).json()["charged"] == "1260.00"  # 1680.00 less 25 %
    ledger = client.get("/api/v1/billing/ledger").json()["results"]
    assert [(e["kind"], e["amount"]) for e in ledger if e["kind"] == "sla_credit"] == [
        ("sla_credit", "420.00")
    ]


def test_a_term_that_never_ran_and_failed_is_refunded_less_what_its_wait_was_credited(org):
    start = M0 + timedelta(days=30, hours=20)  # 31 March 20:00, never active
    term = week(org, starts_at=start, activated_at=None, status=ReservationStatus.PROVISIONING)

    # Still not running when March settles: its 4 h of March were paid for and not delivered.
    assert sla_credits_issue_for_month(month=MARCH, now=A0 + 2 * 24 * H + H) == 1
    assert sla_lines(term) == [(f"sla:{term.pk}:2026-03", 4000)]  # all of 40.00

    Reservation.objects.filter(pk=term.pk).update(
        status=ReservationStatus.FAILED, released_at=A0 + 4 * 24 * H
    )
    refund = cancellation_settle(reservation_id=term.pk)

    # In full, less what the SLA gave for the same hours: never more than it paid.
    assert refund.amount_minor == 168000 - 4000
    assert "Less 40.00 credited before under the SLA" in refund.description
    assert sla_credit_issue(reservation_id=term.pk, month=APRIL, now=A0 + 40 * 24 * H) is None
    assert balance_minor(organization=org) == 0


# --- 2. cancelling a term stuck past its start ---------------------------------------------


def stuck_since(org, started: timedelta) -> Reservation:
    start = timezone.now().replace(microsecond=0) - started
    return week(org, starts_at=start, activated_at=None, status=ReservationStatus.PROVISIONING)


def rest_of(term, at: datetime) -> Decimal:
    seconds = int((term.ends_at - at).total_seconds())
    return period_total(price_per_gpu_hour=PRICE, gpu_count=1, seconds=seconds, currency="usd")


def test_cancelling_a_term_still_provisioning_3_hours_after_its_start_refunds_the_rest(org):
    term = stuck_since(org, 3 * H)
    shown = cancellation_terms(term)
    assert (shown.refund_fraction, shown.fee_amount) == (Decimal("1"), Decimal("0.00"))
    assert shown.refund_amount == shown.unused_amount == rest_of(term, shown.at)
    assert "the delay is ours" in shown.rule

    cancelled = reservation_cancel(
        reservation=term, actor_label="user:1", expected_refund_fraction=Decimal("1")
    )

    at = datetime.fromisoformat(cancelled.cancellation["at"])
    stated = Decimal(cancelled.cancellation["refund_amount"])
    assert cancelled.status == ReservationStatus.CANCELLED and stated == rest_of(term, at)
    credit = LedgerEntry.objects.get(reservation=term, kind=LedgerKind.TERM_REFUND)
    assert (credit.idempotency_key, credit.amount_minor) == (f"cancel:{term.pk}", stated * 100)
    # Settled once: the next run finds nothing to do.
    assert cancellation_settle(reservation_id=term.pk) is None
    assert term.pk not in cancellations_due()
    assert LedgerEntry.objects.filter(reservation=term, kind=LedgerKind.TERM_REFUND).count() == 1

    # The 3 h it waited are SLA downtime: with the refund, all of the term comes back.
    months = {term.starts_at.date().replace(day=1), at.date().replace(day=1)}
    for month in months:
        sla_credit_issue(reservation_id=term.pk, month=month, now=at + timedelta(days=40))
    assert sum(amount for _, amount in sla_lines(term)) == 168000 - credit.amount_minor
    assert balance_minor(organization=org) == 0


def test_within_the_allowance_after_the_start_the_notice_rule_still_holds(org):
    term = stuck_since(org, timedelta(seconds=60))
    shown = cancellation_terms(term)
    assert (shown.refund_fraction, shown.refund_amount) == (Decimal("0"), Decimal("0.00"))
    # The same term, once the allowance has passed: the delay is the platform's.
    later = cancellation_terms(term, at=term.starts_at + timedelta(seconds=120))
    assert (later.refund_fraction, later.refund_amount) == (
        Decimal("1"), rest_of(term, term.starts_at + timedelta(seconds=120)),
    )  # fmt: skip


def test_the_api_states_and_credits_the_full_rest_of_a_term_stuck_past_its_start(org):
    term = stuck_since(org, 3 * H)
    client = session_client(org.memberships.get())
    url = f"/api/v1/reservations/{term.public_id}"

    terms = client.get(f"{url}/cancellation-terms").json()
    assert (terms["refund_fraction"], terms["fee_amount"]) == ("1.00", "0.00")
    assert terms["refund_amount"] == terms["unused_amount"] != "0.00"

    response = client.post(f"{url}/cancel", {"expected_refund_fraction": "1"}, format="json")

    assert response.status_code == 200, response.content
    stated = response.json()["cancellation"]
    assert Decimal(stated["refund_amount"]) == rest_of(term, datetime.fromisoformat(stated["at"]))
    balance = client.get("/api/v1/billing/balance").json()["balance"]
    assert Decimal(balance) == Decimal(stated["refund_amount"]) - Decimal("1680.00")


# --- 3. tiers charged as used state no refund ----------------------------------------------


@pytest.mark.parametrize("tier", [Tier.ON_DEMAND, Tier.INTERRUPTIBLE])
def test_a_metered_cancel_states_no_refund_and_credits_none(org, tier):
    booked = make_reservation(org, tier=tier, starts_at=timezone.now() + 24 * H,
                              status=ReservationStatus.PENDING)  # fmt: skip
    client = session_client(org.memberships.get())
    url = f"/api/v1/reservations/{booked.public_id}"

    terms = client.get(f"{url}/cancellation-terms").json()
    assert {k: terms[k] for k in ("unused_amount", "refund_amount", "fee_amount")} == {
        "unused_amount": "0.00", "refund_amount": "0.00", "fee_amount": "0.00",
    }  # fmt: skip
    assert terms["refund_fraction"] == "1.00"  # nothing is kept
    assert "nothing was charged for time not used" in terms["rule"]

    # An integrator that sends back the fraction it was always shown still cancels.
    response = client.post(f"{url}/cancel", {"expected_refund_fraction": "1"}, format="json")

    assert response.status_code == 200, response.content
    assert response.json()["cancellation"]["refund_amount"] == "0.00"
    assert not LedgerEntry.objects.filter(organization=org).exists()
    assert client.get("/api/v1/billing/balance").json()["balance"] == "0.00"


def restarted_since(org, down: timedelta) -> Reservation:
    """A week's term that ran from its start two days ago until the platform stopped it `down`
    ago to start it again (moved off a failed GPU, restarted in place); not running since."""
    from marketplace.models import ReservationTransition

    start = timezone.now().replace(microsecond=0) - 48 * H
    term = week(org, starts_at=start, activated_at=start, status=ReservationStatus.PROVISIONING)
    moved = ReservationTransition.objects.create(
        reservation=term,
        from_status=ReservationStatus.ACTIVE,
        to_status=ReservationStatus.PROVISIONING,
        cause="GPU failed; moved to 1 healthy GPU(s)",
        actor_label="system: gpu health",
    )
    ReservationTransition.objects.filter(pk=moved.pk).update(at=timezone.now() - down)
    return term


def test_cancelling_a_term_we_stopped_and_have_not_got_running_again_refunds_the_rest(org):
    """It ran, the platform stopped it to move or restart it, and it has not come back: the
    delay is ours as at a first start (if it failed instead, its rest would be refunded)."""
    term = restarted_since(org, 3 * H)

    shown = cancellation_terms(term)

    assert (shown.refund_fraction, shown.fee_amount) == (Decimal("1"), Decimal("0.00"))
    assert shown.refund_amount == shown.unused_amount == rest_of(term, shown.at)
    assert "not running again" in shown.rule
    cancelled = reservation_cancel(
        reservation=term, actor_label="user:1", expected_refund_fraction=Decimal("1")
    )
    credit = LedgerEntry.objects.get(reservation=term, kind=LedgerKind.TERM_REFUND)
    assert credit.amount_minor == Decimal(cancelled.cancellation["refund_amount"]) * 100 > 0


def test_a_term_being_started_again_within_the_allowance_keeps_the_notice_rule(org):
    term = restarted_since(org, timedelta(seconds=60))

    shown = cancellation_terms(term)

    assert (shown.refund_fraction, shown.refund_amount) == (Decimal("0"), Decimal("0.00"))
