"""SLA credits from recorded outages, cancellation refunds by the tier rules, staff credits."""

import getpass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from billing.models import LedgerEntry, LedgerKind
from billing.selectors import balance_minor
from billing.services.credits import (
    cancellation_settle,
    credit_issue,
    sla_credit_fraction,
    sla_credit_issue,
    sla_credits_issue_for_month,
)
from billing.services.usage import reservation_meter
from config.errors import ValidationFailed
from inventory.models import Outage, OutageCause
from marketplace.models import AuditEntry, ReservationStatus, Tier
from tests.billing.conftest import make_reservation

pytestmark = pytest.mark.django_db

MARCH = date(2026, 3, 1)
M0 = datetime(2026, 3, 1, tzinfo=UTC)
MONTH_SECONDS = 31 * 86400


@pytest.mark.parametrize(
    ("uptime", "fraction"),
    [("1", "0"), ("0.995", "0"), ("0.99499", "0.10"), ("0.99", "0.10"), ("0.98999", "0.25"),
     ("0.95", "0.25"), ("0.94999", "1.00"), ("0", "1.00")],
)  # fmt: skip
def test_sla_credit_tiers(uptime, fraction):
    assert sla_credit_fraction(Decimal(uptime)) == Decimal(fraction)


def reserved_for_march(org, total="3100.00"):
    reservation = make_reservation(
        org, tier=Tier.RESERVED, gpu_count=1, starts_at=M0, hours=31 * 24,
        activated_at=M0, status=ReservationStatus.COMPLETED, released_at=M0 + timedelta(days=31),
        total=Decimal(total),
    )  # fmt: skip
    reservation_meter(reservation_id=reservation.pk)  # the term charged up front, as booked
    return reservation


def down(reservation, seconds: int, at: datetime = M0 + timedelta(days=3)):
    Outage.objects.create(node=reservation.allocations.first().node, started_at=at,
                          ended_at=at + timedelta(seconds=seconds), cause=OutageCause.HARDWARE_FAILURE)  # fmt: skip


@pytest.mark.parametrize(
    ("down_seconds", "credit_minor"),
    [
        (int(MONTH_SECONDS * 0.005), 0),  # exactly 99.5 %: met
        (int(MONTH_SECONDS * 0.005) + 1, 31000),  # just under: 10 % of 3100.00
        (int(MONTH_SECONDS * 0.011), 77500),  # 98.9 %: 25 %
        (int(MONTH_SECONDS * 0.06), 310000),  # 94 %: 100 %
    ],
)
def test_a_reserved_term_gets_the_sla_credit_of_its_uptime(org, down_seconds, credit_minor):
    reservation = reserved_for_march(org)
    down(reservation, down_seconds)

    entry = sla_credit_issue(
        reservation_id=reservation.pk, month=MARCH, now=M0 + timedelta(days=40)
    )

    if credit_minor == 0:
        assert entry is None
        assert not LedgerEntry.objects.filter(kind=LedgerKind.SLA_CREDIT).exists()
    else:
        assert (entry.kind, entry.amount_minor, entry.idempotency_key) == (
            LedgerKind.SLA_CREDIT, credit_minor, f"sla:{reservation.pk}:2026-03",
        )  # fmt: skip


def test_an_sla_credit_is_issued_once_per_reservation_and_month(org):
    reservation = reserved_for_march(org)
    down(reservation, 86400 * 2)

    assert sla_credits_issue_for_month(month=MARCH, now=M0 + timedelta(days=40)) == 1
    assert sla_credits_issue_for_month(month=MARCH, now=M0 + timedelta(days=41)) == 0
    assert list(
        LedgerEntry.objects.filter(kind=LedgerKind.SLA_CREDIT).values_list(
            "amount_minor", flat=True
        )
    ) == [310000]


def test_on_demand_sla_credit_is_a_share_of_what_was_charged_net_of_outages(org):
    reservation = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), starts_at=M0,
                                   hours=10, activated_at=M0)  # fmt: skip
    down(reservation, 1800, at=M0 + timedelta(hours=1))  # 30 min of 10 h: 95 % → 25 %
    reservation_meter(reservation_id=reservation.pk, now=M0 + timedelta(hours=10))
    # 9.5 h × 3.60 = 34.20 charged
    entry = sla_credit_issue(
        reservation_id=reservation.pk, month=MARCH, now=M0 + timedelta(days=40)
    )

    assert entry.amount_minor == 855  # 25 % of 34.20
    assert balance_minor(organization=org) == -3420 + 855


def test_cancelling_a_reserved_term_credits_the_stated_refund_once(org):
    reservation = make_reservation(org, tier=Tier.RESERVED, gpu_count=1, starts_at=M0, hours=168,
                                   status=ReservationStatus.CANCELLED, total=Decimal("500.00"))  # fmt: skip
    reservation.cancellation = {
        "refund_amount": "250.00",
        "rule": "reserved, 24 hours' to 7 days' notice: 50 % refund.",
    }
    reservation.save(update_fields=["cancellation"])

    first = cancellation_settle(reservation_id=reservation.pk)
    second = cancellation_settle(reservation_id=reservation.pk)

    assert first.amount_minor == 25000 and second is None
    assert sorted(LedgerEntry.objects.values_list("kind", "amount_minor")) == [
        (LedgerKind.RESERVED_CHARGE, -50000), (LedgerKind.TERM_REFUND, 25000)
    ]  # fmt: skip
    assert balance_minor(organization=org) == -25000  # the fee


def test_staff_credit_needs_a_reason_and_adds_to_the_balance(org, django_user_model):
    staff = django_user_model.objects.create(username="staff", is_staff=True)
    with pytest.raises(ValidationFailed):
        credit_issue(organization=org, amount=Decimal("10.00"), reason=" ", created_by=staff)
    assert balance_minor(organization=org) == 0

    entry = credit_issue(
        organization=org, amount=Decimal("10.00"), reason="goodwill", created_by=staff
    )

    assert (entry.amount_minor, entry.description, entry.created_by) == (1000, "goodwill", staff)
    assert balance_minor(organization=org) == 1000


def test_the_credit_command_credits_once_per_key(org):
    from io import StringIO

    from django.core.management import call_command

    for _ in range(2):
        call_command(
            "billing_credit", org.slug, "500.00", "demo credit", key="demo", stdout=StringIO()
        )

    assert balance_minor(organization=org) == 50000
    # Money moved from the shell is in the audit log once, with who ran it.
    entry = LedgerEntry.objects.get(organization=org)
    audited = AuditEntry.objects.filter(organization=org, action="credit.issue")
    assert list(audited.values_list("actor", "object_id", "changes")) == [
        (
            f"shell:{getpass.getuser()}",
            entry.public_id,
            {"after": {"amount": "500.00", "currency": "usd", "reason": "demo credit"}},
        )
    ]


@pytest.mark.parametrize(("amount", "currency"), [("10.005", "usd"), ("1000.5", "jpy")])
def test_a_staff_credit_is_refused_unless_it_is_a_whole_minor_unit(org, amount, currency):
    # Never rounded: 10.005 USD is not credited as 10.01, nor ¥1,000.5 as ¥1,001.
    with pytest.raises(ValidationFailed) as refused:
        credit_issue(organization=org, amount=Decimal(amount), reason="goodwill",
                     created_by=None, currency=currency)  # fmt: skip

    assert (refused.value.code, refused.value.field) == ("amount_precision", "amount")
    assert not LedgerEntry.objects.filter(organization=org).exists()
    assert balance_minor(organization=org) == 0


@pytest.mark.parametrize(
    ("amount", "why"),
    [
        ("1e3", "Enter a number."),  # Decimal() alone read it as 1000.00
        ("１２", "Enter a number."),  # another script's digits: 12.00
        ("NaN", "Enter a number."),  # was a traceback
        ("Infinity", "Enter a number."),
        ("10.005", "Ensure that there are no more than 2 decimal places."),  # was 10.01
        ("-5", "Ensure this value is greater than or equal to 0.01."),
    ],
)
def test_the_credit_command_reads_the_amount_as_the_admin_does(org, amount, why):
    from io import StringIO

    from django.core.management import CommandError, call_command

    with pytest.raises(CommandError) as refused:
        call_command("billing_credit", org.slug, amount, "typo", stdout=StringIO())

    assert str(refused.value) == f"Not an amount: {amount!r} ({why})"
    assert not LedgerEntry.objects.filter(organization=org).exists()
    assert balance_minor(organization=org) == 0
