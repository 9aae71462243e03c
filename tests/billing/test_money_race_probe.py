"""Money under concurrency, probed from outside: combinations of racing requests the other race
tests do not cover (a refund racing bookings, extend racing cancel / another extend / the
meter, a quote booked twice, limits and modes changed while bookings race).

Real PostgreSQL, one thread (and connection) per client, started together at a barrier. After
each race: no negative available balance, holds and charges within what funding allowed, one
winner where one is allowed, and the ledger still adds up to the balance.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.admin import BillingAccountAdminForm
from billing.models import (
    BillingAccount,
    BillingMode,
    Hold,
    HoldStatus,
    LedgerEntry,
    LedgerKind,
    Refund,
    TopUp,
    UsageAccrual,
)
from billing.selectors import balance_minor
from billing.services.accounts import billing_account_approve_postpaid, billing_settings_update
from billing.services.holds import money_position
from billing.services.metering import usage_meter_run
from billing.services.refunds import refund_create, refund_record_from_stripe
from billing.services.topups import top_up_succeed
from config.errors import ApplicationError
from marketplace.models import Reservation, ReservationStatus
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import (
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from tests.billing.conftest import make_reservation
from tests.billing.test_holds import capacity, credit, org  # noqa: F401 - fixtures
from tests.clients import HttpsClient
from tests.factories import UserFactory
from tests.marketplace.api_fixtures import key_client
from tests.marketplace.market_helpers import tomorrow
from tests.races import run_together, until_a_backend_waits_for_this_one

pytestmark = pytest.mark.django_db(transaction=True)  # the threads see committed rows

TERM = 39900  # a 1-week term of one GPU: 168 h × 2.375


def paid_top_up(org, amount_minor: int) -> TopUp:
    top_up = TopUp.objects.create(organization=org, amount_minor=amount_minor, currency="usd",
                                  payment_method_id="pm_card_visa")  # fmt: skip
    assert top_up_succeed(top_up_id=top_up.pk, payment_intent_id=f"pi_{org.pk}")
    top_up.refresh_from_db()
    return top_up


def extend_by_weeks(booked, weeks: int = 1, actor: str = "user:ext"):
    """A call extending `booked` by `weeks` past its end as booked now (for run_together)."""
    end = booked.ends_at + timedelta(days=7 * weeks)
    return lambda: reservation_extend(reservation=booked, new_ends_at=end, actor_label=actor)


def term(org, model, start_h: int = 24 * 8):
    return reservation_create(organization=org, gpu_model=model.slug, gpu_count=1,
                              tier="reserved", term="1w", starts_at=tomorrow(start_h),
                              ends_at=tomorrow(start_h + 168))  # fmt: skip


def assert_books_balance(org, *, prepaid: bool = True) -> None:
    """The balance is the ledger's sum (nothing lost), and (prepaid) nothing is committed
    beyond it."""
    lines = sum(LedgerEntry.objects.filter(organization=org).values_list("amount_minor", flat=True))
    assert balance_minor(organization=org) == lines
    position = money_position(organization_id=org.pk)
    assert position.balance >= 0, position
    if prepaid:
        assert position.available >= 0, position


# --- a staff refund racing bookings on the same balance ------------------------------------


@pytest.mark.parametrize("round_", range(3))
def test_a_refund_racing_bookings_never_pays_out_money_a_booking_holds(capacity, org, round_):
    """500.00 topped up: a refund of 400.00 and five terms of 399.00 race. Whichever decides
    first, the other kind is refused: at most one of them, never both."""
    top_up = paid_top_up(org, 50000)

    outcomes = run_together(
        lambda: refund_create(top_up=top_up, amount=Decimal("400.00"), reason="race"),
        *[lambda: term(org, capacity)] * 5,
    )

    assert not [o for o in outcomes if o.startswith("error")], outcomes
    booked = outcomes[1:].count("ok")
    refunded = outcomes[0] == "ok"
    assert booked + refunded == 1, outcomes
    assert Refund.objects.count() == refunded
    assert Reservation.objects.filter(organization=org).count() == booked
    held = sum(Hold.objects.filter(organization=org).values_list("amount_minor", flat=True))
    assert held + 40000 * refunded <= 50000
    if refunded:
        assert set(outcomes[1:]) == {"insufficient_funds"}
    else:
        assert outcomes[0] == "insufficient_balance"
    assert_books_balance(org)


# --- extend racing cancel, another extend, the meter ---------------------------------------


@pytest.mark.parametrize("round_", range(3))
def test_extend_and_cancel_of_one_term_at_once_leave_nothing_held_or_charged(capacity, org, round_):
    """A term 8 days ahead (cancelled with full notice: all given back) extended and cancelled
    at the same moment: either order ends cancelled with every cent back and nothing held."""
    credit(org, 100000)
    booked = term(org, capacity)

    outcomes = run_together(
        extend_by_weeks(booked),
        lambda: reservation_cancel(reservation=booked, actor_label="user:cancel"),
    )

    assert outcomes[1] == "ok", outcomes
    assert outcomes[0] in ("ok", "extend_not_allowed"), outcomes
    booked.refresh_from_db()
    assert booked.status == ReservationStatus.CANCELLED
    assert not Hold.objects.filter(reservation=booked, status=HoldStatus.OPEN).exists()
    usage_meter_run()
    assert balance_minor(organization=org) == 100000
    assert money_position(organization_id=org.pk) == (100000, 0, 0)
    assert_books_balance(org)


@pytest.mark.parametrize("round_", range(3))
def test_two_extensions_of_one_term_at_once_charge_what_was_funded_once(capacity, org, round_):
    """900.00: a term (399.00) and one more week (399.00), not two. Extensions to +1 and +2
    weeks race: exactly one lands, and the money charged is the term as it ends."""
    credit(org, 90000)
    booked = term(org, capacity)
    one = booked.ends_at + timedelta(days=7)

    outcomes = run_together(extend_by_weeks(booked, 1, "a"), extend_by_weeks(booked, 2, "b"))

    assert not [o for o in outcomes if o.startswith("error")], outcomes
    assert outcomes.count("ok") == 1, outcomes
    booked.refresh_from_db()
    assert booked.ends_at == one and booked.total_amount == Decimal("798.00")
    usage_meter_run()
    charged = -sum(
        LedgerEntry.objects.filter(reservation=booked, kind=LedgerKind.RESERVED_CHARGE).values_list(
            "amount_minor", flat=True
        )
    )
    assert charged == 79800
    assert money_position(organization_id=org.pk) == (90000 - 79800, 0, 0)
    assert_books_balance(org)


@pytest.mark.parametrize("round_", range(3))
def test_the_same_extension_twice_at_once_lands_once(capacity, org, round_):
    credit(org, 200000)
    booked = term(org, capacity)

    outcomes = run_together(*[extend_by_weeks(booked, actor="x")] * 2)

    assert outcomes.count("ok") == 1, outcomes
    assert Hold.objects.filter(reservation=booked).count() == 2
    usage_meter_run()
    assert balance_minor(organization=org) == 200000 - 2 * TERM
    assert_books_balance(org)


@pytest.mark.parametrize("round_", range(3))
def test_an_extension_racing_the_meter_charges_the_term_and_its_extension_once(
    capacity, org, round_
):
    """A term not yet charged by the meter: its extension charges the term as booked and the
    difference; the meter charging the same term at the same moment charges nothing twice."""
    credit(org, 90000)
    booked = term(org, capacity)

    outcomes = run_together(
        extend_by_weeks(booked),
        usage_meter_run,
    )

    assert outcomes == ["ok", "ok"]
    usage_meter_run()
    charges = sorted(
        LedgerEntry.objects.filter(reservation=booked, kind=LedgerKind.RESERVED_CHARGE).values_list(
            "amount_minor", flat=True
        )
    )
    assert charges == [-TERM, -TERM]
    assert money_position(organization_id=org.pk) == (90000 - 2 * TERM, 0, 0)
    assert set(Hold.objects.filter(reservation=booked).values_list("status", flat=True)) == {
        HoldStatus.CHARGED
    }
    assert_books_balance(org)


@pytest.mark.parametrize("round_", range(3))
def test_on_demand_extensions_racing_meter_runs_book_every_second_once(org, round_):
    """Running on-demand reservations extended while metering runs race: the extension books
    usage up to its moment ("extended"), the run up to the hour; nothing is booked twice."""
    credit(org, 10_000_000)
    now = timezone.now()
    start = now - timedelta(hours=2, minutes=30)
    price = Decimal("3.6000")
    running = [
        make_reservation(org, gpu_count=2, price=price, starts_at=start, activated_at=start)
        for _ in range(4)
    ]

    def extend(reservation):
        return lambda: reservation_extend(reservation=reservation,
                                          new_ends_at=reservation.ends_at + timedelta(hours=3),
                                          actor_label="user:ext")  # fmt: skip

    outcomes = run_together(*[lambda: usage_meter_run(now=now)] * 3, *map(extend, running))

    assert outcomes == ["ok"] * 7, outcomes
    final = timezone.now()
    for reservation in running:
        lines = LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.USAGE)
        gpu_seconds = sum(e.gpu_seconds for e in lines)
        assert 0 < gpu_seconds <= 2 * int((final - start).total_seconds())
        periods = sorted((e.period_start, e.period_end) for e in lines)
        for (_, end), (begin, _) in zip(periods, periods[1:], strict=False):
            assert end <= begin, periods  # no second booked by two lines
        accrual = UsageAccrual.objects.get(reservation=reservation, closed_at__isnull=True)
        assert accrual.booked_gpu_seconds == gpu_seconds
        assert accrual.booked_minor == -sum(e.amount_minor for e in lines)
    assert_books_balance(org)


# --- one quote booked twice; limits and modes changed while bookings race ------------------


@pytest.mark.parametrize("round_", range(3))
def test_one_quote_booked_twice_at_once_books_and_holds_once(capacity, org, round_):
    credit(org, 100000)
    quote = quote_create(organization=org, gpu_model=capacity.slug, gpu_count=1,
                         starts_at=tomorrow(), ends_at=tomorrow(168), tier="reserved",
                         term="1w")  # fmt: skip

    outcomes = run_together(*[lambda: reservation_create(organization=org, quote=quote)] * 2)

    assert outcomes.count("ok") == 1, outcomes
    assert Reservation.objects.filter(organization=org).count() == 1
    assert Hold.objects.filter(organization=org).count() == 1
    assert money_position(organization_id=org.pk) == (100000, 0, TERM)
    assert_books_balance(org)


@pytest.mark.parametrize("round_", range(3))
def test_a_spend_limit_lowered_while_bookings_race_binds_every_booking_decided_after_it(
    capacity, org, round_
):
    """Postpaid, limit 2000.00; the owner lowers it to 500.00 while eight terms race. Each
    booking is decided under the account lock before or after the change: what was booked
    before counts, and nothing booked after it takes the month over 500.00."""
    BillingAccount.objects.filter(organization=org).update(
        mode=BillingMode.POSTPAID, monthly_spend_limit_minor=200000
    )
    lowered = []

    def lower():
        account = billing_settings_update(organization=org, monthly_spend_limit=Decimal("500.00"))
        lowered.append(account.monthly_spend_limit_minor)

    outcomes = run_together(lower, *[lambda: term(org, capacity)] * 8)

    assert outcomes[0] == "ok" and lowered == [50000]
    assert set(outcomes[1:]) <= {"ok", "spend_limit_exceeded"}, outcomes
    booked = outcomes[1:].count("ok")
    assert 1 <= booked <= 5  # at most 2000.00 / 399.00 under the old limit
    holds = list(Hold.objects.filter(organization=org).order_by("id"))
    assert len(holds) == booked
    # Once the lower limit is in place, the account's commitment never grows past it by a
    # booking decided after the change.
    with pytest.raises(ApplicationError) as error:
        term(org, capacity)
    assert error.value.code == "spend_limit_exceeded"
    assert_books_balance(org, prepaid=False)


@pytest.mark.parametrize("round_", range(3))
def test_switching_to_postpaid_while_bookings_race_never_overdraws_the_prepaid_balance(
    capacity, org, round_
):
    """500.00 prepaid: one term fits. Staff approve postpaid while five terms race: the
    bookings decided while prepaid are held against the balance, those after are invoiced."""
    credit(org, 50000)
    staff = UserFactory(is_staff=True)

    outcomes = run_together(
        lambda: billing_account_approve_postpaid(organization=org, approved_by=staff),
        *[lambda: term(org, capacity)] * 5,
    )

    assert outcomes[0] == "ok", outcomes
    assert set(outcomes[1:]) <= {"ok", "insufficient_funds"}, outcomes
    account = BillingAccount.objects.get(organization=org)
    assert account.mode == BillingMode.POSTPAID
    prepaid_holds = Hold.objects.filter(
        organization=org, created_at__lt=account.postpaid_approved_at
    )
    assert sum(h.amount_minor for h in prepaid_holds) <= 50000
    assert balance_minor(organization=org) == 50000
    assert_books_balance(org, prepaid=False)


@pytest.mark.parametrize("round_", range(2))
def test_one_quote_booked_from_the_api_and_the_portal_at_once_books_once(capacity, org, round_):
    """The same customer books one quote through the API (a key) and the portal (a session) in
    the same moment: one reservation and one hold, the other told the quote is used."""
    credit(org, 100000)
    owner = org.memberships.first().user
    quote = quote_create(organization=org, gpu_model=capacity.slug, gpu_count=1,
                         starts_at=tomorrow(), ends_at=tomorrow(168), tier="reserved",
                         term="1w")  # fmt: skip
    api, portal = key_client(org), HttpsClient()
    portal.force_login(owner)
    statuses = []

    def by_api():
        statuses.append(("api", api.post("/api/v1/reservations", {"quote": quote.public_id},
                                         format="json").status_code))  # fmt: skip

    def by_portal():
        statuses.append(("portal", portal.post(f"/quotes/{quote.public_id}").status_code))

    outcomes = run_together(by_api, by_portal)

    assert outcomes == ["ok", "ok"], outcomes
    assert Reservation.objects.filter(organization=org).count() == 1, statuses
    assert Hold.objects.filter(organization=org).count() == 1
    assert money_position(organization_id=org.pk) == (100000, 0, TERM)
    codes = dict(statuses)
    assert sorted(c < 400 for c in codes.values()) == [False, True], statuses
    assert_books_balance(org)


@pytest.mark.parametrize("round_", range(2))
def test_a_stripe_dashboard_refund_delivered_twice_while_bookings_race_is_taken_once(
    capacity, org, round_
):
    """500.00 topped up; the same Stripe Dashboard refund of 400.00 arrives twice (refund and
    charge events) while four terms of 399.00 race. The refund is recorded once, whatever
    the order; a booking decided after it sees 100.00 and is refused."""
    top_up = paid_top_up(org, 50000)

    def dashboard_refund():
        refund_record_from_stripe(top_up_id=top_up.pk, stripe_refund_id="re_dash_1",
                                  amount_minor=40000, currency="usd", status="succeeded")  # fmt: skip

    outcomes = run_together(dashboard_refund, dashboard_refund, *[lambda: term(org, capacity)] * 4)

    assert outcomes[:2] == ["ok", "ok"], outcomes
    assert set(outcomes[2:]) <= {"ok", "insufficient_funds"}, outcomes
    assert outcomes[2:].count("ok") <= 1
    assert Refund.objects.filter(stripe_refund_id="re_dash_1").count() == 1
    assert LedgerEntry.objects.filter(organization=org, kind=LedgerKind.REFUND).count() == 1
    assert balance_minor(organization=org) == 10000
    lines = sum(LedgerEntry.objects.filter(organization=org).values_list("amount_minor", flat=True))
    assert lines == 10000


# --- staff changing an account's currency while a booking is decided ----------------------


def test_a_currency_change_in_the_admin_racing_a_booking_leaves_no_hold_in_another_currency(
    capacity, org, client, django_user_model, monkeypatch
):
    """Postpaid, nothing on the ledger yet: staff may still change the currency (the form
    checks that no money is held). A booking decided between that check and the save must not
    leave a USD hold on a EUR account: the check and the save are one decision under the
    account's lock, as the gate's is. The booking is let in right after the form's check."""
    BillingAccount.objects.filter(organization=org).update(mode=BillingMode.POSTPAID)
    staff = django_user_model.objects.create(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])
    form = {"currency": "eur", "recharge_threshold_minor": account.recharge_threshold_minor,
            "recharge_amount_minor": account.recharge_amount_minor}  # fmt: skip
    checked = threading.Event()
    original_clean = BillingAccountAdminForm.clean

    def clean_then_let_the_booking_in(self):
        cleaned = original_clean(self)
        checked.set()
        until_a_backend_waits_for_this_one()  # the booking waits for the lock: go on and save
        return cleaned

    monkeypatch.setattr(BillingAccountAdminForm, "clean", clean_then_let_the_booking_in)
    responses = []

    def book():
        assert checked.wait(10)
        term(org, capacity)

    outcomes = run_together(lambda: responses.append(client.post(url, form).status_code), book)

    account.refresh_from_db()
    assert outcomes[0] == "ok", outcomes
    open_holds = Hold.objects.filter(organization=org, status=HoldStatus.OPEN)
    assert set(open_holds.values_list("currency", flat=True)) <= {account.currency}
    if account.currency == "eur":  # the change first: the booking is refused, nothing held
        assert responses == [302] and outcomes[1] == "currency_mismatch", outcomes
        assert not Reservation.objects.filter(organization=org).exists()
        assert not open_holds.exists()
    else:  # the booking first: the change is refused, the hold stays in USD
        assert responses == [200] and outcomes[1] == "ok", (responses, outcomes)
        assert open_holds.count() == 1
