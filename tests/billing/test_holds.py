"""Money committed is money held: bookings race against one balance.

Real PostgreSQL, one thread (and connection) per client: the gate's lock on the billing
account row and the holds it writes decide, not Python.
"""

import threading
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connections
from django.utils import timezone

from billing.models import BillingAccount, BillingMode, Hold, HoldStatus, LedgerEntry, LedgerKind
from billing.selectors import balance_minor, month_start, spend_minor
from billing.services.holds import money_position
from billing.services.ledger import ledger_entry_add
from billing.services.metering import usage_meter_run
from config.errors import PaymentRequired
from marketplace.models import Allocation, Reservation
from marketplace.services.reservations import (
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from marketplace.services.transitions import reservation_transition
from tests.factories import GpuModelFactory, MembershipFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow

CLIENTS = 20


@pytest.fixture
def capacity(db):
    """24 H100s at 2.50/GPU-hour: a 1-week term of one GPU is 168 h × 2.375 (5 % off) = 399.00."""
    model = GpuModelFactory()
    make_rate(model, "2.5000")
    make_policy()
    make_nodes(SiteFactory(), model, 3, gpus=8)
    return model


@pytest.fixture
def org(db):
    organization = MembershipFactory(user__password="!").organization
    BillingAccount.objects.create(organization=organization, currency="usd")
    return organization


def credit(org, minor: int, key: str = "c1") -> None:
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=minor, currency="usd",
                     idempotency_key=key)  # fmt: skip


def reserve_term(org, model) -> Reservation:
    return reservation_create(organization=org, gpu_model=model.slug, gpu_count=1, tier="reserved",
                              term="1w", starts_at=tomorrow(), ends_at=tomorrow(168))  # fmt: skip


def reserve_on_demand(org, model, hours: int = 10) -> Reservation:
    return reservation_create(organization=org, gpu_model=model.slug, gpu_count=1,
                              tier="on_demand", starts_at=tomorrow(),
                              ends_at=tomorrow(hours))  # fmt: skip


def race(book) -> Counter:
    """CLIENTS threads call book() at once; the outcome of each, counted."""
    barrier = threading.Barrier(CLIENTS)
    outcomes: list[str] = []
    lock = threading.Lock()

    def client():
        try:
            barrier.wait()
            book()
            result = "ok"
        except PaymentRequired as exc:
            result = exc.code
        except Exception as exc:  # noqa: BLE001 - any other outcome is a failure to report
            result = f"error: {exc!r}"
        finally:
            connections.close_all()  # each thread has its own connection
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return Counter(outcomes)


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_reserved_terms_against_a_balance_for_one_let_exactly_one_through(
    capacity, org
):
    credit(org, 50000)  # 500.00: one term (399.00), not two

    outcomes = race(lambda: reserve_term(org, capacity))

    assert outcomes == Counter({"ok": 1, "insufficient_funds": CLIENTS - 1})
    (reservation,) = Reservation.objects.filter(organization=org)
    assert reservation.total_amount == Decimal("399.00")
    assert Allocation.objects.count() == 1
    hold = Hold.objects.get()
    assert (hold.reservation_id, hold.amount_minor, hold.status) == (reservation.pk, 39900, "open")
    assert money_position(organization_id=org.pk) == (50000, 0, 39900)

    usage_meter_run()  # charges the term: the hold becomes the charge

    hold.refresh_from_db()
    assert (hold.status, hold.charged_minor) == (HoldStatus.CHARGED, 39900)
    assert money_position(organization_id=org.pk) == (10100, 0, 0)
    assert balance_minor(organization=org) >= 0


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_on_demand_bookings_hold_their_first_hours_against_one_balance(org):
    model = GpuModelFactory()
    make_rate(model, "1.5400")  # on-demand, utilisation-neutral: 1.54 per GPU-hour
    make_policy()
    make_nodes(SiteFactory(), model, 3, gpus=8)
    credit(org, 231)  # 2.31: one first hour (1.54), not two

    outcomes = race(lambda: reserve_on_demand(org, model))

    assert outcomes == Counter({"ok": 1, "insufficient_funds": CLIENTS - 1})
    assert Reservation.objects.filter(organization=org).count() == 1
    assert money_position(organization_id=org.pk) == (231, 0, 154)


@pytest.mark.django_db
def test_terms_booked_one_after_another_before_the_meter_runs_are_held_and_refused(capacity, org):
    credit(org, 50000)
    first = reserve_term(org, capacity)

    with pytest.raises(PaymentRequired) as error:
        reserve_term(org, capacity)  # within the meter's minute: nothing charged yet

    assert error.value.code == "insufficient_funds"
    assert "of which 399.00 USD is used or held for bookings" in str(error.value)
    assert list(Reservation.objects.values_list("pk", flat=True)) == [first.pk]
    assert Allocation.objects.count() == 1 and Hold.objects.count() == 1
    assert LedgerEntry.objects.filter(kind=LedgerKind.RESERVED_CHARGE).count() == 0

    usage_meter_run()
    with pytest.raises(PaymentRequired):
        reserve_term(org, capacity)  # charged now: the balance itself is short
    assert balance_minor(organization=org) == 10100
    assert Reservation.objects.count() == 1


@pytest.mark.django_db
def test_a_suspended_organisation_cannot_book_even_with_money(capacity, org):
    credit(org, 50000)
    BillingAccount.objects.filter(organization=org).update(funding_state="suspended")

    with pytest.raises(PaymentRequired) as error:
        reserve_term(org, capacity)

    assert error.value.code == "account_suspended"
    assert not Reservation.objects.exists() and not Hold.objects.exists()


@pytest.mark.django_db
def test_the_spend_limit_counts_open_holds_postpaid(capacity, org):
    BillingAccount.objects.filter(organization=org).update(
        mode=BillingMode.POSTPAID, monthly_spend_limit_minor=50000
    )
    reserve_term(org, capacity)  # 399.00 held, nothing charged yet

    with pytest.raises(PaymentRequired) as error:
        reserve_term(org, capacity)  # 399.00 + 399.00 > 500.00

    assert error.value.code == "spend_limit_exceeded"
    assert "held for bookings 399.00 USD" in str(error.value)
    assert Reservation.objects.count() == 1


@pytest.mark.django_db
def test_cancelling_releases_the_hold_at_once_so_the_money_books_again(capacity, org):
    credit(org, 50000)
    booked = reserve_on_demand(org, capacity)  # first hour: 2.50 held
    assert money_position(organization_id=org.pk) == (50000, 0, 250)

    reservation_cancel(reservation=booked, actor_label="user:test")

    hold = Hold.objects.get(reservation=booked)
    assert (hold.status, hold.charged_minor) == (HoldStatus.RELEASED, 0)
    assert money_position(organization_id=org.pk) == (50000, 0, 0)


@pytest.mark.django_db
def test_cancelling_a_reserved_term_with_notice_settles_it_in_the_same_transaction(capacity, org):
    credit(org, 50000)
    term = reservation_create(organization=org, gpu_model=capacity.slug, gpu_count=1,
                              tier="reserved", term="1w", starts_at=tomorrow(24 * 8),
                              ends_at=tomorrow(24 * 8 + 168))  # fmt: skip

    reservation_cancel(reservation=term, actor_label="user:test")  # 8 days' notice: full refund

    hold = Hold.objects.get(reservation=term)
    assert (hold.status, hold.charged_minor) == (HoldStatus.CHARGED, 39900)
    assert sorted(
        LedgerEntry.objects.filter(reservation=term).values_list("kind", "amount_minor")
    ) == [("reserved_charge", -39900), ("term_refund", 39900)]
    assert money_position(organization_id=org.pk) == (50000, 0, 0)
    # A charge given back is not spent: the month's spend (and its limit) nets it out, where a
    # goodwill credit would not.
    month = month_start(timezone.now())
    assert spend_minor(organization=org, since=month) == 0
    BillingAccount.objects.filter(organization=org).update(monthly_spend_limit_minor=30000)
    reserve_on_demand(org, capacity, hours=2)  # 2.50 held: within 300.00, as nothing is spent


@pytest.mark.django_db
def test_the_meter_fills_an_on_demand_hold_as_it_charges_and_releases_the_rest_at_the_end(
    capacity, org
):
    credit(org, 50000)
    booked = reserve_on_demand(org, capacity)
    started = booked.starts_at
    Reservation.objects.filter(pk=booked.pk).update(status="active", activated_at=started)

    usage_meter_run(now=started + timedelta(minutes=30))  # 1.25 of the 2.50 hour used

    # Accrued, not yet booked: the usage fills the hold's first half, counted once.
    hold = Hold.objects.get(reservation=booked)
    assert (hold.status, hold.charged_minor) == (HoldStatus.OPEN, 0)
    assert money_position(organization_id=org.pk) == (50000, 125, 125)
    assert money_position(organization_id=org.pk).available == 50000 - 250

    reservation_transition(reservation=booked, to_status="releasing", cause="test",
                           actor_label="test")  # fmt: skip
    Reservation.objects.filter(pk=booked.pk).update(released_at=started + timedelta(minutes=40))
    usage_meter_run(now=started + timedelta(minutes=41))

    hold.refresh_from_db()
    assert (hold.status, hold.charged_minor) == (HoldStatus.RELEASED, 167)  # 40 min: 1.67
    assert money_position(organization_id=org.pk) == (50000 - 167, 0, 0)


# --- extensions: priced as the original, the same gate, charged ---------------------------


@pytest.mark.django_db
def test_extending_a_reserved_term_holds_and_charges_the_difference_at_once(capacity, org):
    credit(org, 90000)
    term = reserve_term(org, capacity)  # 399.00, not yet charged by the meter

    extended = reservation_extend(reservation=term, new_ends_at=term.ends_at + timedelta(days=7),
                                  actor_label="user:test")  # fmt: skip

    assert extended.total_amount == Decimal("798.00")  # 336 h × 2.375, as the term was priced
    assert sorted(
        LedgerEntry.objects.filter(reservation=term).values_list("kind", "amount_minor")
    ) == [("reserved_charge", -39900), ("reserved_charge", -39900)]
    assert set(Hold.objects.filter(reservation=term).values_list("status", "charged_minor")) == {
        (HoldStatus.CHARGED, 39900)
    }
    assert money_position(organization_id=org.pk) == (90000 - 79800, 0, 0)

    usage_meter_run()  # the term as booked was charged with the extension: not again
    assert balance_minor(organization=org) == 90000 - 79800
    # Each line covers its own time (the ledger CSV's period): the week booked, the week added.
    old_end = extended.ends_at - timedelta(days=7)
    assert sorted(
        LedgerEntry.objects.filter(reservation=term).values_list("period_start", "period_end")
    ) == [(term.starts_at, old_end), (old_end, extended.ends_at)]


@pytest.mark.django_db
def test_an_extension_charged_after_the_term_is_charged_for_the_time_it_adds(capacity, org):
    credit(org, 90000)
    term = reserve_term(org, capacity)
    usage_meter_run()  # the term as booked: charged by the meter
    old_end = term.ends_at

    reservation_extend(reservation=term, new_ends_at=old_end + timedelta(hours=12),
                       actor_label="user:test")  # fmt: skip
    reservation_extend(reservation=term, new_ends_at=old_end + timedelta(hours=36),
                       actor_label="user:test")  # fmt: skip

    lines = LedgerEntry.objects.filter(reservation=term).order_by("id")
    assert [(line.amount_minor, line.period_start, line.period_end) for line in lines] == [
        (-39900, term.starts_at, old_end),
        (-2850, old_end, old_end + timedelta(hours=12)),  # 12 h × 2.375
        (-5700, old_end + timedelta(hours=12), old_end + timedelta(hours=36)),
    ]


@pytest.mark.django_db
def test_an_extension_the_balance_does_not_cover_is_refused_and_nothing_changes(capacity, org):
    credit(org, 50000)
    term = reserve_term(org, capacity)
    old_end = term.ends_at

    with pytest.raises(PaymentRequired) as error:
        reservation_extend(reservation=term, new_ends_at=old_end + timedelta(days=7),
                           actor_label="user:test")  # fmt: skip

    assert error.value.code == "insufficient_funds"
    assert "extension's committed part (399.00 USD)" in str(error.value)
    term.refresh_from_db()
    assert (term.ends_at, term.total_amount) == (old_end, Decimal("399.00"))
    assert {a.period.upper for a in Allocation.objects.filter(reservation=term)} == {old_end}
    assert Hold.objects.filter(reservation=term).count() == 1
    assert not LedgerEntry.objects.filter(reservation=term).exists()


@pytest.mark.django_db
def test_the_spend_limit_refuses_an_extension(capacity, org):
    credit(org, 900000)
    booked = reserve_on_demand(org, capacity, hours=2)
    BillingAccount.objects.filter(organization=org).update(monthly_spend_limit_minor=100)

    with pytest.raises(PaymentRequired) as error:
        reservation_extend(reservation=booked, new_ends_at=booked.ends_at + timedelta(days=20),
                           actor_label="user:test")  # fmt: skip

    assert error.value.code == "spend_limit_exceeded"
    booked.refresh_from_db()
    assert booked.total_amount == Decimal("5.00")


@pytest.mark.django_db
def test_a_suspended_organisation_cannot_extend(capacity, org):
    credit(org, 5000)
    booked = reserve_on_demand(org, capacity, hours=2)
    BillingAccount.objects.filter(organization=org).update(funding_state="suspended")

    with pytest.raises(PaymentRequired) as error:
        reservation_extend(reservation=booked, new_ends_at=booked.starts_at + timedelta(days=29),
                           actor_label="user:test")  # fmt: skip

    assert error.value.code == "account_suspended"
    booked.refresh_from_db()
    assert booked.ends_at == booked.starts_at + timedelta(hours=2)


@pytest.mark.django_db
def test_an_on_demand_extension_holds_the_first_hour_of_its_extra_time(capacity, org):
    credit(org, 600)  # 6.00
    booked = reserve_on_demand(org, capacity, hours=2)  # 2.50 held

    reservation_extend(reservation=booked, new_ends_at=booked.ends_at + timedelta(hours=5),
                       actor_label="user:test")  # fmt: skip

    assert sorted(
        Hold.objects.filter(reservation=booked).values_list("amount_minor", flat=True)
    ) == [250, 250]
    assert money_position(organization_id=org.pk) == (600, 0, 500)
    with pytest.raises(PaymentRequired):  # 1.00 available: not another first hour (2.50)
        reservation_extend(reservation=booked, new_ends_at=booked.ends_at + timedelta(hours=8),
                           actor_label="user:test")  # fmt: skip


@pytest.mark.django_db
def test_a_hold_rounds_up_so_small_extensions_cannot_pile_up_on_nothing(capacity, org):
    # At 2.50/GPU-hour, 5 s of one GPU is 0.0035: half-up it would be held as 0.00, and
    # extension after extension would pass a gate with nothing available.
    credit(org, 250)
    booked = reserve_on_demand(org, capacity, hours=1)  # its first hour, 2.50, held: 0 left
    assert money_position(organization_id=org.pk).available == 0

    with pytest.raises(PaymentRequired) as error:
        reservation_extend(reservation=booked, new_ends_at=booked.ends_at + timedelta(seconds=5),
                           actor_label="user:test")  # fmt: skip

    assert error.value.code == "insufficient_funds"
    assert "committed part (0.01 USD)" in str(error.value)
    booked.refresh_from_db()
    assert booked.ends_at == booked.starts_at + timedelta(hours=1)
    credit(org, 1, key="c2")  # exactly what 5 s holds, rounded up
    reservation_extend(reservation=booked, new_ends_at=booked.ends_at + timedelta(seconds=5),
                       actor_label="user:test")  # fmt: skip
    assert sorted(
        Hold.objects.filter(reservation=booked).values_list("amount_minor", flat=True)
    ) == [1, 250]
    assert money_position(organization_id=org.pk).available == 0


@pytest.mark.django_db
def test_a_minute_of_one_gpu_is_held_to_the_cent_above(capacity, org):
    # 60 s at 2.50/GPU-hour is 0.041666…: held as 0.05, not 0.04; the total stays 0.04.
    credit(org, 4)
    start = tomorrow()
    with pytest.raises(PaymentRequired):
        reservation_create(organization=org, gpu_model=capacity.slug, gpu_count=1,
                           tier="on_demand", starts_at=start,
                           ends_at=start + timedelta(minutes=1))  # fmt: skip
    assert not Reservation.objects.filter(organization=org).exists()

    credit(org, 1, key="c2")
    booked = reservation_create(organization=org, gpu_model=capacity.slug, gpu_count=1,
                                tier="on_demand", starts_at=start,
                                ends_at=start + timedelta(minutes=1))  # fmt: skip
    assert booked.total_amount == Decimal("0.04")
    assert Hold.objects.get(reservation=booked).amount_minor == 5


@pytest.mark.django_db
def test_a_customers_early_stop_ends_billing_at_the_stop_not_at_the_teardown(capacity, org):
    # The stop's terms refund the unused time; the minute the site agent takes to tear the
    # workload down (releasing → completed) is not the customer's to pay.
    from marketplace.models import ReservationStatus as S
    from marketplace.services.transitions import reservation_transitions_write

    credit(org, 100000)
    start = timezone.now()
    booked = reservation_create(organization=org, gpu_model=capacity.slug, gpu_count=1,
                                tier="on_demand", starts_at=start,
                                ends_at=start + timedelta(hours=2))  # fmt: skip
    for step in (S.PROVISIONING, S.ACTIVE):
        booked = reservation_transition(reservation=booked, to_status=step, cause="",
                                        actor_label="t")  # fmt: skip
    activated = start - timedelta(minutes=10)  # it has run ten minutes
    Reservation.objects.filter(pk=booked.pk).update(activated_at=activated)
    booked.refresh_from_db()

    stopped = reservation_cancel(reservation=booked, actor_label="user:test")
    assert stopped.status == S.RELEASING and stopped.released_at is not None
    stop = stopped.released_at
    locked = Reservation.objects.select_for_update().get(pk=booked.pk)
    reservation_transitions_write(reservation=locked, moves=[(S.COMPLETED, "torn down")],
                                  actor_label="agent", now=stop + timedelta(seconds=75))  # fmt: skip
    usage_meter_run(now=stop + timedelta(minutes=2))

    booked.refresh_from_db()
    assert (booked.status, booked.released_at) == (S.COMPLETED, stop)
    billed = LedgerEntry.objects.filter(reservation=booked, kind=LedgerKind.USAGE)
    assert sum(e.gpu_seconds for e in billed) == int((stop - activated).total_seconds())


@pytest.mark.django_db
def test_the_balance_api_and_the_portal_show_what_is_held_and_available(capacity, org):
    from marketplace.models import Role
    from tests.clients import HttpsClient

    credit(org, 50000)
    reserve_term(org, capacity)
    client = HttpsClient()
    client.force_login(
        MembershipFactory(organization=org, role=Role.MEMBER, user__password="!").user
    )

    body = client.get("/api/v1/billing/balance").json()
    page = client.get("/billing/").content.decode()

    assert (body["balance"], body["held"], body["available"]) == ("500.00", "399.00", "101.00")
    assert '<strong id="available">101.00 USD</strong>' in page
    assert '<span id="held">399.00 USD</span> held for reservations' in page
