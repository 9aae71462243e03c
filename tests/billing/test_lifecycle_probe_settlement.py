"""Lifecycle probe: what ending a reservation costs, against what the customer was told.

- A reserved term whose stated refund is nothing (stopped, or cancelled late) is settled
  once: the metering run does not take it up again every minute forever.
- Suspension (the grace period over) ends billing when it releases a running reservation,
  as a customer's stop does: the teardown at the site is not charged.
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import BillingAccount, FundingState, LedgerEntry, LedgerKind
from billing.selectors import (
    balance_minor,
    month_start,
    spend_minor,
    usage_unbooked_by_reservation_day,
)
from billing.services import funding
from billing.services.credits import (
    cancellation_settle,
    cancellations_due,
    curtailment_forced_credit_issue,
)
from billing.services.ledger import ledger_entry_add
from billing.services.metering import usage_meter_run
from billing.services.usage import reservation_meter, reservations_book_now, usage_accrue
from inventory.models import OutageCause, Site
from marketplace.models import (
    Curtailment,
    CurtailmentVictim,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    ReservationTransition,
    Tier,
)
from marketplace.services.transitions import reservation_transitions_write
from tests.billing.conftest import T0, make_reservation

pytestmark = pytest.mark.django_db


def _term_with_terms(org, refund: str, *, status=ReservationStatus.CANCELLED):
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, starts_at=T0, hours=168,
                            status=status, total=Decimal("500.00"))  # fmt: skip
    term.cancellation = {"refund_amount": refund, "rule": "reserved: no refund."}
    term.save(update_fields=["cancellation"])
    return term


def test_a_term_cancelled_with_no_refund_is_settled_once_not_every_run(org):
    term = _term_with_terms(org, "0.00")
    assert term.pk in cancellations_due()  # not yet charged: the sweep charges it

    assert cancellation_settle(reservation_id=term.pk) is None  # nothing to give back

    assert list(LedgerEntry.objects.values_list("kind", "amount_minor")) == [
        (LedgerKind.RESERVED_CHARGE, -50000)
    ]
    assert term.pk not in cancellations_due()


def test_a_stopped_term_already_charged_is_not_due_again(org):
    term = _term_with_terms(org, "0", status=ReservationStatus.COMPLETED)
    reservation_meter(reservation_id=term.pk)  # charged by the meter when it was booked

    assert cancellations_due() == []


def test_a_term_with_a_refund_stays_due_until_it_is_credited(org):
    term = _term_with_terms(org, "250.00")
    reservation_meter(reservation_id=term.pk)
    assert cancellations_due() == [term.pk]

    cancellation_settle(reservation_id=term.pk)

    assert cancellations_due() == []


def test_suspension_ends_billing_at_the_release_not_at_the_teardown(org, settings, monkeypatch):
    kicked = []
    monkeypatch.setattr(funding, "release_kick", kicked.append)
    now = timezone.now().replace(microsecond=0)
    running = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), hours=10,
                               starts_at=now - timedelta(hours=1),
                               activated_at=now - timedelta(hours=1))  # fmt: skip
    ledger_entry_add(organization=org, kind=LedgerKind.USAGE, amount_minor=-100,
                     currency="usd", idempotency_key="debt")  # fmt: skip
    BillingAccount.objects.filter(organization=org).update(
        funding_state=FundingState.GRACE, grace_until=now - timedelta(seconds=1)
    )

    assert funding.funding_state_update(organization=org, now=now) == FundingState.SUSPENDED

    released = Reservation.objects.get(pk=running.pk)
    assert released.status == ReservationStatus.RELEASING
    assert released.released_at is not None
    stop = released.released_at
    assert kicked == [running.pk]  # torn down now, not when the sweeper notices
    # The site takes ten minutes to tear it down: none of them is charged.
    locked = Reservation.objects.select_for_update().get(pk=running.pk)
    reservation_transitions_write(reservation=locked, moves=[(ReservationStatus.COMPLETED, "")],
                                  actor_label="agent", now=stop + timedelta(minutes=10))  # fmt: skip
    usage_meter_run(now=stop + timedelta(minutes=11))

    billed = LedgerEntry.objects.filter(reservation=running, kind=LedgerKind.USAGE)
    assert sum(e.gpu_seconds for e in billed) == int((stop - running.activated_at).total_seconds())


def _history(reservation, *moves):
    for from_status, to_status in moves:
        ReservationTransition.objects.create(reservation=reservation, from_status=from_status,
                                             to_status=to_status, cause="", actor_label="t")  # fmt: skip


def test_a_term_that_fails_when_moved_off_a_failed_gpu_gets_its_undelivered_rest_back(org):
    # A 1-week term (168.00) ran 2 days, was moved off a failed GPU and could not be provisioned
    # again: the 5 days it will not run are the platform's failure, not the customer's.
    S = ReservationStatus
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, starts_at=T0, hours=168,
                            status=S.FAILED, activated_at=T0, released_at=T0 + timedelta(days=2),
                            price=Decimal("1.0000"), total=Decimal("168.00"))  # fmt: skip
    _history(term, (S.ACTIVE, S.PROVISIONING), (S.PROVISIONING, S.FAILED))
    assert cancellations_due() == [term.pk]

    entry = cancellation_settle(reservation_id=term.pk)

    assert entry.amount_minor == 12000  # 120 of 168 hours
    assert balance_minor(organization=org) == -16800 + 12000
    assert cancellations_due() == []
    assert cancellation_settle(reservation_id=term.pk) is None  # once


def test_a_term_whose_own_workload_ended_it_gets_nothing_back(org):
    S = ReservationStatus
    term = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, starts_at=T0, hours=168,
                            status=S.FAILED, activated_at=T0, released_at=T0 + timedelta(days=2),
                            price=Decimal("1.0000"), total=Decimal("168.00"))  # fmt: skip
    _history(term, (S.ACTIVE, S.FAILED))

    assert cancellations_due() == []
    assert cancellation_settle(reservation_id=term.pk) is None
    assert not LedgerEntry.objects.filter(kind=LedgerKind.TERM_REFUND).exists()


MIDNIGHT = datetime(2026, 4, 1, tzinfo=UTC)  # also a month's end


def _usage_lines(reservation):
    return list(
        LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.USAGE)
        .order_by("period_start")
        .values_list("period_start", "period_end", "gpu_seconds")
    )


def test_a_stop_after_midnight_books_the_hour_before_it_in_its_own_day(org):
    # Booked to 23:00; stopped at 00:10 before the run booked 23:00-00:00: the stop's booking
    # is cut at midnight, so the usage API (by UTC day) and the SLA (by month) count each
    # second where it was used.
    hour = timedelta(hours=1)
    running = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), hours=4,
                               starts_at=MIDNIGHT - 2 * hour,
                               activated_at=MIDNIGHT - 2 * hour)  # fmt: skip
    reservations_book_now(reservation_ids=[running.pk], now=MIDNIGHT - hour)
    stop = MIDNIGHT + timedelta(minutes=10)

    reservations_book_now(reservation_ids=[running.pk], now=stop)

    assert _usage_lines(running) == [
        (MIDNIGHT - 2 * hour, MIDNIGHT - hour, 3600),
        (MIDNIGHT - hour, MIDNIGHT, 3600),
        (MIDNIGHT, stop, 600),
    ]
    assert balance_minor(organization=org) == -(7200 + 600) // 10  # 0.1 cent a GPU-second


def test_a_reservation_ending_after_midnight_is_booked_on_both_sides_of_it(org, settings):
    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 60  # its hour's line is not due before its end
    hour = timedelta(hours=1)
    end = MIDNIGHT + timedelta(minutes=20)
    ended = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), hours=3,
                             starts_at=end - 3 * hour, activated_at=end - 3 * hour)  # fmt: skip
    reservations_book_now(reservation_ids=[ended.pk], now=MIDNIGHT - hour)

    usage_meter_run(now=end + timedelta(minutes=1))

    assert _usage_lines(ended)[-2:] == [
        (MIDNIGHT - hour, MIDNIGHT, 3600),
        (MIDNIGHT, end, 1200),
    ]
    assert sum(g for _s, _e, g in _usage_lines(ended)) == 3 * 3600


def test_runs_that_stopped_for_days_book_each_day_apart_when_they_resume(org):
    # Running since 10:00 two days before MIDNIGHT; nothing booked since its first hour (the
    # workers were away): the run that resumes books up to its hour with a line per UTC day.
    hour = timedelta(hours=1)
    start = MIDNIGHT - 38 * hour
    running = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), hours=96,
                               starts_at=start, activated_at=start)  # fmt: skip
    reservations_book_now(reservation_ids=[running.pk], now=start + hour)
    resumed = MIDNIGHT + 30 * hour + timedelta(minutes=5)

    reservations_book_now(reservation_ids=[running.pk], now=resumed)

    lines = _usage_lines(running)
    assert all(s.date() == (e - timedelta(microseconds=1)).date() for s, e, _g in lines), lines
    assert [(s, e) for s, e, _g in lines[1:]] == [
        (start + hour, MIDNIGHT - 24 * hour),
        (MIDNIGHT - 24 * hour, MIDNIGHT),
        (MIDNIGHT, MIDNIGHT + 24 * hour),
        (MIDNIGHT + 24 * hour, resumed),
    ]
    assert sum(g for _s, _e, g in lines) == int((resumed - start).total_seconds())


def test_usage_not_yet_booked_is_shown_in_the_day_it_was_used(org):
    # Booked to 23:00; at 00:10 the usage API shows 23:00-00:10 unbooked: an hour of it on the
    # day before midnight and ten minutes on the new day, as the ledger will book it.
    hour = timedelta(hours=1)
    running = make_reservation(org, gpu_count=2, price=Decimal("3.6000"), hours=4,
                               starts_at=MIDNIGHT - 2 * hour,
                               activated_at=MIDNIGHT - 2 * hour)  # fmt: skip
    reservations_book_now(reservation_ids=[running.pk], now=MIDNIGHT - hour)
    at = MIDNIGHT + timedelta(minutes=10)
    usage_accrue(now=at, reservation_ids=[running.pk])

    rows = usage_unbooked_by_reservation_day(organization=org, now=at)

    day_before, day = (MIDNIGHT - hour).date(), MIDNIGHT.date()
    assert {d: (row["gpu_seconds"], row["amount_minor"]) for (_r, d), row in rows.items()} == {
        day_before: (7200, -720),
        day: (1200, -120),
    }
    assert usage_unbooked_by_reservation_day(organization=org, now=at, since=day) == {
        (running.public_id, day): rows[(running.public_id, day)]
    }
    # Booked, the ledger has the same split.
    reservations_book_now(reservation_ids=[running.pk], now=at)
    assert usage_unbooked_by_reservation_day(organization=org, now=at) == {}
    assert [(s.date(), g) for s, _e, g in _usage_lines(running)][-2:] == [
        (day_before, 7200),
        (day, 1200),
    ]


def test_time_a_forced_curtailment_gave_back_is_not_counted_as_spent(org):
    # 200.00 charged up front, 120.00 of it given back for the 6 hours the curtailment took:
    # the month's spend (what the spend limit counts) is the 80.00 kept, as for a cancellation.
    reserved = make_reservation(org, tier=Tier.RESERVED, price=Decimal("10.00"), hours=10,
                                status=ReservationStatus.PREEMPTED, activated_at=T0,
                                released_at=T0 + timedelta(hours=4))  # fmt: skip
    curtailment = Curtailment.objects.create(site=Site.objects.get(pk=reserved.site_id),
                                             shed_at=reserved.released_at, reason="EEA3",
                                             forced_reason="firm load shed")  # fmt: skip
    CurtailmentVictim.objects.create(curtailment=curtailment, reservation=reserved,
                                     tier=reserved.tier, draw_kw=Decimal("1.610"),
                                     draw_basis="rated", forced=True, chosen_at=T0,
                                     outcome=CurtailmentVictim.Outcome.NOTICED)  # fmt: skip

    curtailment_forced_credit_issue(reservation_id=reserved.pk)

    assert spend_minor(organization=org, since=month_start(timezone.now())) == 8000


def test_a_stop_after_midnight_books_its_time_even_when_nothing_ran_before_midnight(org):
    # Down from 23:00 to midnight: nothing to book before midnight, the 10 minutes after it are
    # still booked by the stop itself.
    hour = timedelta(hours=1)
    running = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), hours=4,
                               starts_at=MIDNIGHT - 2 * hour,
                               activated_at=MIDNIGHT - 2 * hour)  # fmt: skip
    reservations_book_now(reservation_ids=[running.pk], now=MIDNIGHT - hour)
    node_id = running.allocations.first().node_id
    ReservationOutage.objects.create(reservation=running, node_id=node_id,
                                     started_at=MIDNIGHT - hour, ended_at=MIDNIGHT,
                                     cause=OutageCause.GPU_FAILURE)  # fmt: skip
    stop = MIDNIGHT + timedelta(minutes=10)

    lines = reservations_book_now(reservation_ids=[running.pk], now=stop)

    assert [line.gpu_seconds for line in lines] == [600]
    assert _usage_lines(running)[-1] == (MIDNIGHT, stop, 600)
