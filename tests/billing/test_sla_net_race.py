"""The forced-curtailment credit (the metering run) and the month's SLA credit (the hourly
task) racing for one reservation give its SLA share once (threads, each on its own connection
to real PostgreSQL: the reservation's row lock decides, not Python)."""

import threading
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import DatabaseError, connection

from billing.models import LedgerEntry, LedgerKind
from billing.services.credits import curtailment_forced_credit_issue, sla_credit_issue
from inventory.models import Site
from marketplace.models import (
    Curtailment,
    CurtailmentVictim,
    ReservationOutage,
    ReservationStatus,
    Tier,
)
from tests.billing.conftest import T0, make_reservation
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db(transaction=True)

H = timedelta(hours=1)


def _curtailed_term(org):
    """200.00 up front for 10 h, 30 minutes down, forced off after 4 h."""
    term = make_reservation(
        org, tier=Tier.RESERVED, price=Decimal("10.00"), hours=10,
        status=ReservationStatus.PREEMPTED, activated_at=T0, released_at=T0 + 4 * H,
    )  # fmt: skip
    ReservationOutage.objects.create(
        reservation=term, node=term.allocations.first().node,
        started_at=T0 + H, ended_at=T0 + H + H / 2,
    )  # fmt: skip
    curtailment = Curtailment.objects.create(
        site=Site.objects.get(pk=term.site_id), shed_at=term.released_at, reason="EEA3",
        forced_reason="firm load shed",
    )  # fmt: skip
    CurtailmentVictim.objects.create(
        curtailment=curtailment, reservation=term, tier=term.tier, draw_kw=Decimal("1.610"),
        draw_basis="rated", forced=True, outcome=CurtailmentVictim.Outcome.NOTICED, chosen_at=T0,
    )  # fmt: skip
    return term


@pytest.mark.parametrize("round_", range(3))
def test_the_curtailment_and_the_months_sla_credit_at_once_give_the_share_once(round_):
    org = MembershipFactory().organization
    term = _curtailed_term(org)
    start, errors = threading.Barrier(2), []

    def run(action):
        try:
            start.wait(10)
            action()
        except DatabaseError as exc:  # a deadlock or a duplicate key: reported below
            errors.append(exc)
        finally:
            connection.close()

    actions = [
        lambda: curtailment_forced_credit_issue(reservation_id=term.pk),
        lambda: sla_credit_issue(
            reservation_id=term.pk, month=date(2026, 3, 1), now=datetime(2026, 5, 1, tzinfo=UTC)
        ),
    ]
    threads = [threading.Thread(target=run, args=(a,)) for a in actions[:: 1 - 2 * (round_ % 2)]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert errors == []
    assert sorted(
        LedgerEntry.objects.filter(reservation=term).values_list("kind", "amount_minor")
    ) == [
        (LedgerKind.RESERVED_CHARGE, -20000), (LedgerKind.SLA_CREDIT, 8000),
        (LedgerKind.TERM_REFUND, 12000),
    ]  # fmt: skip
