"""A call-off racing the dispatcher that is preempting a victim at that moment: the victim
preempted stays the curtailment's (shed, and credited if forced), and is not told its notice
was withdrawn after it was carried out."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from marketplace.models import CurtailmentVictim, Event, Reservation, ReservationStatus
from marketplace.services.curtailment import curtailment_announce, curtailment_call_off
from marketplace.services.transitions import reservation_transition
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    fresh_rate_limits,
    market,
    org,
    owner,
)
from tests.marketplace.test_curtailment_megawatts import _book
from tests.races import until_a_backend_waits_for_this_one

S = ReservationStatus


@pytest.mark.django_db(transaction=True)
def test_a_call_off_does_not_withdraw_a_victim_the_dispatcher_is_preempting(market, org, owner):
    site, _ = market
    now = timezone.now()
    running = _book(org, gpus=2, start=now, active=True)
    curtailment = curtailment_announce(
        site=site, shed_at=now + timedelta(seconds=1), until=now + timedelta(hours=2),
        target_mw=Decimal("0.001"), reason="call", call_notice=True, now=now,
    )  # fmt: skip
    assert Reservation.objects.get(pk=running.pk).preempt_at is not None
    time.sleep(1.1)  # the notice has run out: the dispatcher takes it
    preempting, errors, call_off_waited = threading.Event(), [], []

    def dispatcher():
        close_old_connections()
        try:
            with transaction.atomic():
                due = Reservation.objects.select_for_update().get(pk=running.pk)
                reservation_transition(
                    reservation=due, to_status=S.PREEMPTED, cause="grid", actor_label="t"
                )
                preempting.set()
                # The call-off comes while this is not yet committed, and waits for it:
                call_off_waited.append(until_a_backend_waits_for_this_one())
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            preempting.set()
            connection.close()

    thread = threading.Thread(target=dispatcher)
    thread.start()
    assert preempting.wait(30)
    withdrawn = curtailment_call_off(curtailment=curtailment)
    thread.join(30)

    assert errors == []
    assert call_off_waited == [True]
    assert withdrawn == 0
    assert Reservation.objects.get(pk=running.pk).status == S.PREEMPTED
    assert CurtailmentVictim.objects.get(reservation=running).withdrawn_at is None
    assert not Event.objects.filter(
        object_id=running.public_id, type="reservation.interruption_withdrawn"
    ).exists()
    curtailment.refresh_from_db()
    assert curtailment.shed_kw == Decimal("1.610")
