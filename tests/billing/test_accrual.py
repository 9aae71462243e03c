"""Accrue, don't append: usage accrues by the second on the reservation's accrual and reaches
the ledger hourly, at every state change and at the end; every accrued second is booked once.

T0 is 10:00 UTC. Prices of 3.60 per GPU-hour make one GPU-second cost exactly 0.1 cent, so
the expected amounts below are easy to check by hand.
"""

from datetime import timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from billing.models import BillingAccount, BillingMode, LedgerEntry, LedgerKind, UsageAccrual
from billing.money import usage_cost_minor
from billing.selectors import balance_minor, reservations_charged
from billing.services import usage as usage_service
from billing.services.holds import money_position
from billing.services.ledger import ledger_entry_add
from billing.services.metering import usage_meter_run
from billing.services.usage import (
    reservation_delivered_seconds,
    usage_accruals_open,
    usage_accrue,
    usage_book,
    usage_price_change,
)
from inventory.models import Outage, OutageCause
from marketplace.models import ReservationOutage, ReservationStatus
from marketplace.services.transitions import reservation_transition
from tests.billing.conftest import T0, make_reservation

PRICE = Decimal("3.6000")  # 0.1 cent per GPU-second
FUNDS = 10_000_000  # 100,000.00: the funding rules stay out of these tests' way
# The run that has booked every reservation's previous hour: the hour's last booking minute.
BOOKED = timedelta(minutes=settings.BILLING_USAGE_BOOK_SPREAD_MINUTES - 1)


@pytest.fixture
def funded(org):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=FUNDS,
                     currency="usd", idempotency_key="funds")  # fmt: skip
    return org


def lines(reservation) -> list[tuple]:
    return list(
        LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.USAGE)
        .order_by("period_start", "id")
        .values_list("period_start", "period_end", "amount_minor", "gpu_seconds")
    )


def booked_minor(reservation) -> int:
    return -sum(amount for _s, _e, amount, _g in lines(reservation))


def every_minute(start, end):
    at = start
    while at <= end:
        usage_meter_run(now=at)
        at += timedelta(minutes=1)


@pytest.mark.django_db
def test_usage_accrues_to_the_second_without_a_ledger_line(funded):
    org = funded
    reservation = make_reservation(org, gpu_count=1, price=PRICE, activated_at=T0 + timedelta(
        minutes=7, seconds=13))  # fmt: skip

    usage_meter_run(now=T0 + timedelta(minutes=17, seconds=50))  # 637 s delivered

    accrual = UsageAccrual.objects.get(reservation=reservation)
    assert (accrual.gpu_seconds, accrual.accrued_minor, accrual.running) == (637, 64, True)
    assert lines(reservation) == []  # nothing booked inside the hour
    assert money_position(organization_id=org.pk) == (FUNDS, 64, 0)
    # Cost to the second between runs: 640 s → 0.64, 645 s → 0.645 → 0.65 (half up).
    at = T0 + timedelta(minutes=17, seconds=53)
    assert reservations_charged(reservation_ids=[reservation.pk], now=at) == {
        reservation.pk: Decimal("0.64")
    }
    at += timedelta(seconds=5)
    assert reservations_charged(reservation_ids=[reservation.pk], now=at)[
        reservation.pk
    ] == Decimal("0.65")


@pytest.mark.django_db
def test_usage_is_booked_once_an_hour_on_the_hour_and_nothing_drifts(funded, settings):
    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 1  # every hour booked at minute 0
    org = funded
    activated = T0 + timedelta(minutes=37, seconds=20)
    reservation = make_reservation(
        org, gpu_count=2, price=Decimal("1.0000"), activated_at=activated
    )

    every_minute(T0 + timedelta(minutes=38), T0 + timedelta(hours=3, minutes=2))

    hour = timedelta(hours=1)
    eleven = T0 + hour
    # 2 GPUs × 1360 s at 1.00/h = 0.7556 → 0.76; then 2 × 3600 s = 2.00 each hour, rounded on
    # the running total (0.76 + 2.00 + 2.00), never line by line.
    assert lines(reservation) == [
        (activated, eleven, -76, 2720),
        (eleven, eleven + hour, -200, 7200),
        (eleven + hour, eleven + 2 * hour, -200, 7200),
    ]
    accrual = UsageAccrual.objects.get(reservation=reservation)
    assert accrual.booked_until == eleven + 2 * hour
    delivered = reservation_delivered_seconds(
        reservation=reservation, until=T0 + timedelta(hours=3, minutes=2)
    )
    assert accrual.gpu_seconds == 2 * delivered
    assert accrual.accrued_minor == usage_cost_minor(
        gpu_seconds=2 * delivered, price_per_gpu_hour=Decimal("1.0000"), currency="usd"
    )
    # Ledger + accrued = the cost of every second so far, rounded once: 17,360 GPU-s → 4.82.
    assert booked_minor(reservation) == accrual.booked_minor == 476
    assert (accrual.gpu_seconds, accrual.accrued_minor) == (17360, 482)


@pytest.mark.django_db
def test_a_reservation_day_writes_at_most_twenty_five_lines(funded):
    org = funded
    reservation = make_reservation(org, gpu_count=1, price=PRICE, activated_at=T0, hours=30)
    # A run every 10 minutes over a day (the booking does not depend on the cadence).
    at = T0
    while at <= T0 + timedelta(hours=24, minutes=59):
        usage_meter_run(now=at)
        at += timedelta(minutes=10)

    assert len(lines(reservation)) == 24
    assert booked_minor(reservation) == 24 * 360  # 3.60 an hour, every second once


@pytest.mark.django_db
def test_an_outage_stops_the_clock_and_one_recorded_late_is_given_back(funded):
    org = funded
    reservation = make_reservation(org, gpu_count=1, price=PRICE, activated_at=T0)
    node = reservation.allocations.first().node
    usage_meter_run(now=T0 + timedelta(minutes=20))
    open_outage = Outage.objects.create(node=node, started_at=T0 + timedelta(minutes=20),
                                        cause=OutageCause.HARDWARE_FAILURE)  # fmt: skip

    usage_meter_run(now=T0 + timedelta(minutes=30))
    accrual = UsageAccrual.objects.get(reservation=reservation)
    assert (accrual.gpu_seconds, accrual.running) == (1200, False)
    assert reservations_charged(
        reservation_ids=[reservation.pk], now=T0 + timedelta(minutes=40)
    ) == {reservation.pk: Decimal("1.20")}  # not running: no seconds added between runs

    Outage.objects.filter(pk=open_outage.pk).update(ended_at=T0 + timedelta(minutes=35))
    usage_meter_run(now=T0 + timedelta(hours=1) + BOOKED)  # booked: 20 + 25 minutes
    assert lines(reservation) == [(T0, T0 + timedelta(hours=1), -270, 2700)]

    # Recorded after the hour was booked: 10 of those minutes were not delivered.
    ReservationOutage.objects.create(reservation=reservation, node=node, cause="test",
                                     started_at=T0 + timedelta(minutes=40),
                                     ended_at=T0 + timedelta(minutes=50))  # fmt: skip
    usage_meter_run(now=T0 + timedelta(hours=2) + BOOKED)
    hour2 = lines(reservation)[1]
    assert hour2 == (T0 + timedelta(hours=1), T0 + timedelta(hours=2), -360 + 60, 3600 - 600)
    assert balance_minor(organization=org) == FUNDS - (270 + 300)


@pytest.mark.django_db
def test_a_rerun_or_an_older_run_changes_nothing(funded):
    org = funded
    reservation = make_reservation(org, gpu_count=3, price=PRICE, activated_at=T0)
    later = T0 + timedelta(hours=2, minutes=5)
    usage_meter_run(now=later)
    before = (lines(reservation), list(UsageAccrual.objects.values()))

    usage_meter_run(now=later)  # the same run again (a retried task)
    usage_meter_run(now=later - timedelta(minutes=30))  # a run that was late to start

    assert (lines(reservation), list(UsageAccrual.objects.values())) == before
    assert booked_minor(reservation) == 3 * 2 * 360


@pytest.mark.django_db
def test_a_run_killed_between_statements_is_finished_by_the_next_one(funded, monkeypatch):
    org = funded
    reservations = [
        make_reservation(org, gpu_count=1, price=PRICE, activated_at=T0) for _ in range(3)
    ]
    at = T0 + timedelta(hours=1) + BOOKED
    # Killed after accruing, before booking.
    usage_accruals_open()
    usage_accrue(now=at)
    assert LedgerEntry.objects.filter(kind=LedgerKind.USAGE).count() == 0

    # Killed inside the booking, after its lines were written: the transaction rolls back.
    def die(**kwargs):
        raise RuntimeError("worker killed")

    monkeypatch.setattr(usage_service, "holds_charge", die)
    with pytest.raises(RuntimeError):
        usage_book(now=at)
    assert LedgerEntry.objects.filter(kind=LedgerKind.USAGE).count() == 0
    assert set(UsageAccrual.objects.values_list("booked_minor", flat=True)) == {0}
    monkeypatch.undo()

    usage_meter_run(now=at + timedelta(minutes=1))

    for reservation in reservations:
        assert lines(reservation) == [(T0, T0 + timedelta(hours=1), -360, 3600)]
    assert balance_minor(organization=org) == FUNDS - 3 * 360


@pytest.mark.django_db
def test_every_state_change_books_up_to_the_move(funded, settings):
    # On the wall clock: every hour due at minute 0, whatever the reservation's id.
    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 1
    org = funded
    now = timezone.now()
    start = now - timedelta(hours=1, minutes=30)
    reservation = make_reservation(org, gpu_count=2, price=PRICE, starts_at=start,
                                   activated_at=start)  # fmt: skip
    usage_meter_run(now=now)  # books up to the hour
    hourly = lines(reservation)
    assert len(hourly) in (1, 2) and hourly[-1][1] == now.replace(minute=0, second=0, microsecond=0)

    stopped = reservation_transition(reservation=reservation, to_status=ReservationStatus.RELEASING,
                                     cause="stopped", actor_label="test")  # fmt: skip
    after_stop = lines(reservation)
    assert len(after_stop) == len(hourly) + 1
    assert after_stop[-1][0] == hourly[-1][1]
    move_at = after_stop[-1][1]
    assert now <= move_at <= timezone.now()
    ended = reservation_transition(reservation=stopped, to_status=ReservationStatus.COMPLETED,
                                   cause="released", actor_label="test")  # fmt: skip

    final = lines(reservation)
    accrual = UsageAccrual.objects.get(reservation=reservation)
    assert accrual.booked_until == ended.released_at
    # Every whole second from activation to release booked once across the lines.
    delivered = int((ended.released_at - start).total_seconds())
    assert sum(g for *_rest, g in final) == 2 * delivered
    assert booked_minor(reservation) == usage_cost_minor(
        gpu_seconds=2 * delivered, price_per_gpu_hour=PRICE, currency="usd"
    )
    assert (accrual.accrued_minor, accrual.running) == (accrual.booked_minor, False)
    assert booked_minor(reservation) == accrual.booked_minor
    assert (
        "active → releasing"
        in LedgerEntry.objects.filter(reservation=reservation)
        .order_by("period_end")
        .values_list("description", flat=True)[len(hourly)]
    )

    usage_meter_run(now=timezone.now())  # the run finds nothing more to book
    assert lines(reservation) == final


@pytest.mark.django_db
def test_a_price_change_books_the_old_price_first(funded):
    org = funded
    reservation = make_reservation(org, gpu_count=1, price=PRICE, activated_at=T0)
    usage_meter_run(now=T0 + timedelta(minutes=30))

    usage_price_change(reservation_id=reservation.pk, price_per_gpu_hour=Decimal("7.2000"),
                       now=T0 + timedelta(minutes=30))  # fmt: skip
    usage_meter_run(now=T0 + timedelta(hours=1) + BOOKED)

    assert lines(reservation) == [
        (T0, T0 + timedelta(minutes=30), -180, 1800),
        (T0 + timedelta(minutes=30), T0 + timedelta(hours=1), -360, 1800),
    ]


@pytest.mark.django_db
def test_the_run_statement_count_does_not_grow_with_reservations(org):
    # Postpaid: no funding rule acts, so every statement counted is the run's own.
    BillingAccount.objects.filter(organization=org).update(mode=BillingMode.POSTPAID)

    def run_statements(count: int) -> int:
        for _ in range(count):
            make_reservation(org, gpu_count=1, price=PRICE, activated_at=T0)
        from django.test.utils import CaptureQueriesContext

        with CaptureQueriesContext(connection) as queries:
            usage_meter_run(now=T0 + timedelta(hours=1) + BOOKED)
        return len(queries)

    few = run_statements(2)
    many = run_statements(40)
    assert LedgerEntry.objects.filter(kind=LedgerKind.USAGE).count() == 42
    assert many == few


@pytest.mark.django_db
def test_the_usage_export_and_charged_include_the_unbooked_usage_to_the_second(funded, settings):
    import csv

    from billing.exports import usage_csv_lines

    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 1  # on the wall clock: booked at minute 0
    org = funded
    now = timezone.now().replace(microsecond=0)
    start = now - timedelta(minutes=90)
    reservation = make_reservation(org, gpu_count=2, price=PRICE, starts_at=start,
                                   activated_at=start)  # fmt: skip
    usage_meter_run(now=now)
    booked = sum(g for *_rest, g in lines(reservation))
    assert 0 < booked < 2 * 90 * 60  # the hour is booked, the rest only accrued

    rows = list(csv.DictReader(usage_csv_lines(organization=org, since=None, until=None)))
    seconds = sum(int(row["gpu_seconds"]) for row in rows)
    amount = sum(Decimal(row["amount"]) for row in rows)
    elapsed = 2 * int((timezone.now() - start).total_seconds())
    assert 2 * 90 * 60 <= seconds <= elapsed  # every second up to the read, not to the hour
    # 0.1 cent a GPU-second, rounded once on the total.
    assert amount == (Decimal(seconds) / 1000).quantize(Decimal("0.01"), ROUND_HALF_UP)
    charged = reservations_charged(reservation_ids=[reservation.pk])[reservation.pk]
    assert charged >= Decimal(2 * 90 * 60) / 1000


@pytest.mark.django_db
def test_the_hours_lines_are_spread_over_the_first_minutes_of_the_next_hour(funded, settings):
    """Each reservation's completed hour is booked at minute (id % spread) of the next hour,
    the run stays a constant number of statements, and a later booking changes no figure the
    funding rules read (balance − accrued − held)."""
    from django.test.utils import CaptureQueriesContext

    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 4
    org = funded
    reservations = [
        make_reservation(org, gpu_count=1, price=PRICE, activated_at=T0) for _ in range(8)
    ]
    usage_meter_run(now=T0 + timedelta(minutes=59))
    counts = []
    for minute in range(6):
        at = T0 + timedelta(hours=1, minutes=minute)
        usage_accrue(now=at)  # what the funding rules read just before the run books
        before = money_position(organization_id=org.pk)
        with CaptureQueriesContext(connection) as queries:
            usage_meter_run(now=at)
        counts.append(len(queries))
        after = money_position(organization_id=org.pk)
        assert after.available == before.available
        booked = {r.pk for r in reservations if lines(r)}
        assert booked == {r.pk for r in reservations if r.pk % 4 <= minute}, minute
    # As many statements in every run that books (two lines each here, or 40: the statement
    # count test above), a few fewer (no holds to fill) in one that books none.
    assert counts[:4] == [counts[0]] * 4 and counts[4:] == [counts[4]] * 2
    assert counts[4] < counts[0]
    for r in reservations:
        assert lines(r) == [(T0, T0 + timedelta(hours=1), -360, 3600)]
    assert balance_minor(organization=org) == FUNDS - 8 * 360


@pytest.mark.django_db
def test_an_hour_left_unbooked_by_missed_runs_is_booked_at_once(funded, settings):
    settings.BILLING_USAGE_BOOK_SPREAD_MINUTES = 50
    org = funded
    reservation = make_reservation(org, gpu_count=1, price=PRICE, activated_at=T0, hours=5)
    slot = reservation.pk % 50
    # No run in the whole of hour 11 (a stopped worker): at 12:00 two hours are due at once,
    # in one line, whatever the reservation's minute.
    usage_meter_run(now=T0 + timedelta(minutes=59))
    usage_meter_run(now=T0 + timedelta(hours=2))
    assert lines(reservation) == [(T0, T0 + timedelta(hours=2), -720, 7200)]
    # The next hour waits for its minute again.
    if slot > 0:
        usage_meter_run(now=T0 + timedelta(hours=3, minutes=slot - 1))
        assert len(lines(reservation)) == 1
    usage_meter_run(now=T0 + timedelta(hours=3, minutes=slot))
    assert lines(reservation)[1:] == [
        (T0 + timedelta(hours=2), T0 + timedelta(hours=3), -360, 3600)
    ]
