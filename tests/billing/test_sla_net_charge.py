"""An SLA credit is a share of the month's NET charge for the reservation (charges less what
was given back for it), and the forced-curtailment SLA credit and the month's are one rule:
together never more than the share, whichever is written first."""

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from billing.models import LedgerEntry, LedgerKind
from billing.selectors import balance_minor
from billing.services.credits import (
    cancellation_settle,
    curtailment_forced_credit_issue,
    sla_credit_issue,
)
from billing.services.usage import reservation_meter
from inventory.models import Site
from marketplace.models import (
    Curtailment,
    CurtailmentVictim,
    ReservationOutage,
    ReservationStatus,
    Tier,
)
from marketplace.services.gpu_failures import undelivered_refund
from tests.billing.conftest import T0, make_reservation

pytestmark = pytest.mark.django_db

MARCH, APRIL = date(2026, 3, 1), date(2026, 4, 1)
SETTLED = datetime(2026, 5, 10, tzinfo=UTC)  # long after March and April have settled
H = timedelta(hours=1)


def _kinds(reservation) -> list[tuple[str, int]]:
    return sorted(
        LedgerEntry.objects.filter(reservation=reservation).values_list("kind", "amount_minor")
    )


def _outage(reservation, start, end):
    ReservationOutage.objects.create(
        reservation=reservation, node=reservation.allocations.first().node,
        started_at=start, ended_at=end,
    )  # fmt: skip


def _failed_term(org):
    """30 days reserved for 1440.00 from T0 (2 March, so into April); a GPU failed at 48 h,
    the reservation ended at 49 h with the hour between recorded as an outage."""
    term = make_reservation(
        org, tier=Tier.RESERVED, gpu_count=1, price=Decimal("2.0000"), hours=30 * 24,
        total=Decimal("1440.00"), status=ReservationStatus.FAILED, activated_at=T0,
        released_at=T0 + 49 * H,
    )  # fmt: skip
    _outage(term, T0 + 48 * H, T0 + 49 * H)
    term.cancellation = {"refund_amount": str(undelivered_refund(term, since=T0 + 48 * H))}
    term.save(update_fields=["cancellation"])
    return term


def test_a_failed_term_is_credited_on_what_it_paid_after_its_refund(org):
    term = _failed_term(org)

    cancellation_settle(reservation_id=term.pk)
    entry = sla_credit_issue(reservation_id=term.pk, month=MARCH, now=SETTLED)

    # Charged 1440.00, 1344.00 back for the 28 days not delivered: 96.00 paid. Uptime 48/49 h
    # (97.96 %) → 25 % of 96.00, not of 1440.00 (which paid back 264.00 more than was paid).
    assert entry.amount_minor == 2400
    assert _kinds(term) == [
        (LedgerKind.RESERVED_CHARGE, -144000), (LedgerKind.SLA_CREDIT, 2400),
        (LedgerKind.TERM_REFUND, 134400),
    ]  # fmt: skip
    assert balance_minor(organization=org) == -7200
    # April's share of the term is what was given back: nothing paid, nothing credited.
    assert sla_credit_issue(reservation_id=term.pk, month=APRIL, now=SETTLED) is None


def test_a_failed_term_whose_refund_is_not_settled_yet_is_refunded_before_the_sla_share(org):
    term = _failed_term(org)

    entry = sla_credit_issue(reservation_id=term.pk, month=MARCH, now=SETTLED)
    cancellation_settle(reservation_id=term.pk)  # the meter's turn: nothing left to do

    assert entry.amount_minor == 2400
    assert balance_minor(organization=org) == -7200


def test_what_was_given_back_comes_off_the_terms_last_months_first(org):
    # 1 March + 41 days for 4100.00 (March 3100.00, April 1000.00); 2000.00 given back: April's
    # 1000.00 and 1000.00 of March's, so March paid 2100.00 and April nothing.
    start = datetime(2026, 3, 1, tzinfo=UTC)
    term = make_reservation(
        org, tier=Tier.RESERVED, gpu_count=1, starts_at=start, hours=41 * 24,
        total=Decimal("4100.00"), status=ReservationStatus.FAILED, activated_at=start,
        released_at=datetime(2026, 4, 5, tzinfo=UTC),
    )  # fmt: skip
    _outage(term, start + 24 * H, start + 48 * H)  # 1 day of March's 31: 96.77 % → 25 %
    _outage(term, datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 4, 5, tzinfo=UTC))
    term.cancellation = {"refund_amount": "2000.00"}
    term.save(update_fields=["cancellation"])

    cancellation_settle(reservation_id=term.pk)
    march = sla_credit_issue(reservation_id=term.pk, month=MARCH, now=SETTLED)
    april = sla_credit_issue(reservation_id=term.pk, month=APRIL, now=SETTLED)

    assert march.amount_minor == 52500  # 25 % of 2100.00
    assert april is None  # all down (100 %), of nothing paid
    assert balance_minor(organization=org) == -410000 + 200000 + 52500


def _forced_victim(reservation):
    curtailment = Curtailment.objects.create(
        site=Site.objects.get(pk=reservation.site_id), shed_at=reservation.released_at,
        reason="EEA3", forced_reason="firm load shed",
    )  # fmt: skip
    CurtailmentVictim.objects.create(
        curtailment=curtailment, reservation=reservation, tier=reservation.tier,
        draw_kw=Decimal("1.610"), draw_basis="rated", forced=True,
        outcome=CurtailmentVictim.Outcome.NOTICED, chosen_at=T0,
    )  # fmt: skip


def _curtailed_term(org):
    """2 GPUs × 10 h at 10.00 = 200.00 up front, 30 minutes down, forced off after 4 h."""
    term = make_reservation(
        org, tier=Tier.RESERVED, price=Decimal("10.00"), hours=10,
        status=ReservationStatus.PREEMPTED, activated_at=T0, released_at=T0 + 4 * H,
    )  # fmt: skip
    _outage(term, T0 + H, T0 + H + H / 2)
    _forced_victim(term)
    return term


def test_the_months_sla_credit_does_not_stack_on_the_curtailment_sla_credit(org):
    term = _curtailed_term(org)

    curtailment_forced_credit_issue(reservation_id=term.pk)
    later = sla_credit_issue(reservation_id=term.pk, month=MARCH, now=SETTLED)

    # 120.00 back for the 6 h lost; 100 % of the 80.00 paid for the rest (uptime 35 %), once.
    assert later is None
    assert _kinds(term) == [
        (LedgerKind.RESERVED_CHARGE, -20000), (LedgerKind.SLA_CREDIT, 8000),
        (LedgerKind.TERM_REFUND, 12000),
    ]  # fmt: skip
    assert balance_minor(organization=org) == 0


def test_the_months_sla_credit_first_settles_the_curtailment_and_gives_the_share_once(org):
    term = _curtailed_term(org)

    first = sla_credit_issue(reservation_id=term.pk, month=MARCH, now=SETTLED)
    curtailment_forced_credit_issue(reservation_id=term.pk)

    assert first is None  # the curtailment's credit, written first, was the month's share
    assert LedgerEntry.objects.get(kind=LedgerKind.SLA_CREDIT).idempotency_key == (
        f"curtail:{term.pk}:sla"
    )
    assert _kinds(term) == [
        (LedgerKind.RESERVED_CHARGE, -20000), (LedgerKind.SLA_CREDIT, 8000),
        (LedgerKind.TERM_REFUND, 12000),
    ]  # fmt: skip
    assert balance_minor(organization=org) == 0


def test_the_months_sla_credit_adds_only_what_a_later_outage_raised_the_share_by(org):
    # Preempted 6 minutes before its end (99 %: 10 % of 200.00 - 2.00 refunded = 19.80); an
    # outage of 6 minutes recorded afterwards brings it to 98 %: 25 %, of which 19.80 was given.
    term = make_reservation(
        org, tier=Tier.RESERVED, price=Decimal("10.00"), hours=10,
        status=ReservationStatus.PREEMPTED, activated_at=T0,
        released_at=T0 + 10 * H - timedelta(minutes=6),
    )  # fmt: skip
    _forced_victim(term)
    curtailment_forced_credit_issue(reservation_id=term.pk)
    _outage(term, T0 + H, T0 + H + timedelta(minutes=6))

    later = sla_credit_issue(reservation_id=term.pk, month=MARCH, now=SETTLED)

    assert later.amount_minor == 4950 - 1980  # 25 % of 198.00, less the 19.80 given
    assert LedgerEntry.objects.filter(kind=LedgerKind.SLA_CREDIT).count() == 2


def test_an_on_demand_months_credit_is_on_its_usage_net_of_its_corrections(org):
    reservation = make_reservation(
        org, gpu_count=1, price=Decimal("10.0000"), hours=10, activated_at=T0,
        status=ReservationStatus.COMPLETED, released_at=T0 + 10 * H,
    )  # fmt: skip
    reservation_meter(reservation_id=reservation.pk, now=T0 + 10 * H)  # 100.00
    _outage(reservation, T0, T0 + H)  # recorded late: 10.00 given back by the next booking
    reservation_meter(reservation_id=reservation.pk, now=T0 + 10 * H + timedelta(minutes=5))

    entry = sla_credit_issue(reservation_id=reservation.pk, month=MARCH, now=SETTLED)

    assert entry.amount_minor == 9000  # 90 % uptime → 100 % of the 90.00 net, not of 100.00
    assert balance_minor(organization=org) == 0
