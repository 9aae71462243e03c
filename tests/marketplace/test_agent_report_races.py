"""An agent's report that ends a workload races the customer stopping it, on real PostgreSQL:
whichever takes the reservation's row first ends it, the other finds it ended, and the usage
booked afterwards stops at that one end. Each order is forced: this test holds the row while
the racers come to wait for it (PostgreSQL's lock table says when), then lets them go."""

import threading
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.services.usage import reservations_book_now
from marketplace.models import Reservation, ReservationStatus, ReservationTransition
from marketplace.services.reservations import reservation_cancel
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.marketplace.test_agent_report_billing import _iso, _seen_running
from tests.marketplace.test_agent_report_delivery import (
    REPORT,
    _active_through_agent,
    _container,
    _heartbeat,
)
from tests.races import outcome_of, until_a_backend_waits_for_this_one

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


def _in_thread(call, outcomes: dict, name: str) -> threading.Thread:
    thread = threading.Thread(target=lambda: outcomes.__setitem__(name, outcome_of(call)))
    thread.start()
    return thread


def _usage_booked_seconds(r: Reservation) -> int:
    # An hour's run before now, to tell where billing stops.
    Reservation.objects.filter(pk=r.pk).update(activated_at=r.activated_at - timedelta(hours=1))
    for _ in range(2):  # a second run books nothing more
        reservations_book_now(reservation_ids=[r.pk])
    return sum(
        LedgerEntry.objects.filter(reservation=r, kind=LedgerKind.USAGE).values_list(
            "gpu_seconds", flat=True
        )
    )


def _ends(r: Reservation) -> list[str]:
    return list(
        ReservationTransition.objects.filter(reservation=r, to_status__in=[S.FAILED, S.RELEASING])
        .order_by("pk")
        .values_list("to_status", flat=True)
    )


@pytest.mark.parametrize("first", ["report", "stop"])
def test_an_exit_report_and_a_stop_racing_end_the_reservation_once(first):
    r, node, agent, _ = _active_through_agent()
    _seen_running(r, node, agent)
    _heartbeat(agent)
    exited_at = timezone.now() - timedelta(microseconds=1)  # after it was last seen running
    report = _container(r, "exited", exit_code=0, finished_at=_iso(exited_at))
    answers: list[int] = []
    outcomes: dict[str, str] = {}

    def report_exit():
        answers.append(agent.post(REPORT, {"containers": [report]}, format="json").status_code)

    def stop():
        reservation_cancel(reservation=Reservation.objects.get(pk=r.pk), actor_label="customer")

    racers = {"report": report_exit, "stop": stop}
    second = "stop" if first == "report" else "report"
    with transaction.atomic():
        Reservation.objects.select_for_update().get(pk=r.pk)  # the row, until both wait
        threads = [_in_thread(racers[first], outcomes, first)]
        assert until_a_backend_waits_for_this_one(20)
        threads.append(_in_thread(racers[second], outcomes, second))
        assert until_a_backend_waits_for_this_one(20, count=2)
    for thread in threads:
        thread.join(timeout=60)

    assert answers == [200]  # a report always applies; it finds nothing to end if it lost
    ended = Reservation.objects.get(pk=r.pk)
    stopped_by_then = timezone.now()
    if first == "report":
        assert outcomes == {"report": "ok", "stop": "cancel_not_allowed"}
        assert (ended.status, ended.released_at, _ends(r)) == (S.FAILED, exited_at, [S.FAILED])
    else:
        assert outcomes == {"stop": "ok", "report": "ok"}
        assert ended.status in (S.RELEASING, S.COMPLETED) and _ends(r) == [S.RELEASING]
    # Usage stops at the one end: the exit's time, or (stopped) no later than now.
    end = ended.released_at or stopped_by_then
    assert _usage_booked_seconds(ended) <= 2 * int(
        (end - ended.activated_at + timedelta(hours=1)).total_seconds()
    )
