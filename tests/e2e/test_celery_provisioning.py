"""The reservation lifecycle through a real Celery worker on Redis and the test database.

The worker is `celery -A config worker` in a subprocess whose DATABASE_URL is pytest-django's
test database (transaction=True, so it sees what the test commits) and whose broker is a
Redis db of its own, flushed first. This process publishes to the same db.
"""

import logging
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from config.celery import app
from marketplace.models import (
    AttemptOutcome,
    ProvisioningAttempt,
    ProvisioningDispatch,
    Reservation,
    ReservationStatus,
)
from marketplace.provisioning.kicks import PROVISION_TASK, provisioning_kick
from marketplace.provisioning.scheduler import reservations_dispatch_due, reservations_sweep_stuck
from marketplace.provisioning.services import reservations_locked_by_workers
from marketplace.services.curtailment import curtailment_announce
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (the *_fixture names are fixtures)
    broker_fixture,
    broker_idle,
    broker_url_for_this_process,
    driver_log_fixture,
    e2e_redis_url,
    market_create,
    redis_test_client,
    statuses,
    unacked_count,
    wait_for,
    worker_fixture,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.usefixtures("allow_all_funding"),
]
S = ReservationStatus
CLOSED_PORT_BROKER = "redis://127.0.0.1:1/0"


def _status(reservation: Reservation) -> str:
    return Reservation.objects.values_list("status", flat=True).get(pk=reservation.pk)


def _wait_status(reservation, status, *, timeout):
    wait_for(
        lambda: _status(reservation) == status,
        timeout=timeout,
        what=f"{reservation.public_id} to be {status} (it is {_status(reservation)})",
    )
    reservation.refresh_from_db()
    return reservation


def test_a_curtailment_preempts_interruptible_work_at_shed_time_and_stops_it(worker, driver_log):
    worker.start(beat=True, PROVISIONING_DISPATCH_INTERVAL_SECONDS="1")
    market = market_create(nodes=1, gpus=4)
    interruptible = market.book(gpu_count=2, tier="interruptible")
    protected = market.book(gpu_count=2)
    interruptible = _wait_status(interruptible, S.ACTIVE, timeout=15)
    _wait_status(protected, S.ACTIVE, timeout=15)

    shed_at = timezone.now() + timedelta(seconds=2)
    # The grid operator's call gives 2 s: shorter than the usual minimum notice, so it is taken
    # as given (a staff announcement would wait out CURTAILMENT_MIN_NOTICE).
    curtailment_announce(
        site=market.site, shed_at=shed_at, reason="Frequency response", call_notice=True
    )
    assert _status(interruptible) == S.ACTIVE  # the notice runs until shed_at

    r = _wait_status(interruptible, S.PREEMPTED, timeout=15)
    assert timedelta(0) <= r.released_at - shed_at < timedelta(seconds=3)
    wait_for(
        lambda: driver_log(r) == ["prepare", "start", "stop"],
        timeout=15,
        what="the preempted workload to be stopped",
    )
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE, S.PREEMPTED]
    assert _status(protected) == S.ACTIVE
    assert "stop" not in driver_log(protected)


def test_a_reservation_goes_from_scheduled_to_active_to_completed_on_time(
    worker, driver_log, settings
):
    # Beat inside the worker, dispatching every second: the real schedule, nothing called by hand.
    worker.start(beat=True, PROVISIONING_DISPATCH_INTERVAL_SECONDS="1")
    settings.RESERVATION_MIN_SECONDS = 1  # a four-second booking, to watch it end on time
    market = market_create(nodes=1, gpus=4)
    r = market.book(gpu_count=2, seconds=4, workload={"ports": [8080]})

    r = _wait_status(r, S.ACTIVE, timeout=15)
    assert r.connection["ports"] == {"8080": 8080}
    r = _wait_status(r, S.COMPLETED, timeout=20)

    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE, S.RELEASING, S.COMPLETED]
    # Tolerance: the dispatch interval (1 s here, 5 s by default) plus queue latency.
    assert r.activated_at - r.starts_at < timedelta(seconds=3)
    assert r.released_at - r.ends_at < timedelta(seconds=3)
    assert r.allocations.filter(is_live=True).count() == 0
    assert driver_log(r) == ["prepare", "start", "stop"]


@pytest.mark.parametrize("recovery", ["sweeper", "redelivery"])
def test_a_worker_killed_mid_provisioning_is_restarted_and_the_reservation_ends_active(
    worker, driver_log, broker, recovery
):
    # The killed worker's lease on the reservation lapses 2 s after its last renewal.
    env = {"SIMULATED_DRIVER_LATENCY_SECONDS": "3", "PROVISIONING_WORKER_LEASE_SECONDS": "2"}
    if recovery == "redelivery":
        # Redis gives an unacknowledged task back after the visibility timeout.
        env["CELERY_VISIBILITY_TIMEOUT_SECONDS"] = "4"
    worker.start(**env)
    market = market_create(nodes=1, gpus=4)
    r = market.book()  # starts now: reservation_create enqueues its provision on commit

    wait_for(lambda: driver_log(r) == ["prepare"], timeout=15, what="the driver to be preparing")
    worker.kill()  # SIGKILL the whole worker while prepare is in progress
    assert _status(r) == S.PROVISIONING
    assert unacked_count(broker) == 1  # the message was never acknowledged

    worker.start(**{**env, "SIMULATED_DRIVER_LATENCY_SECONDS": "0.2"})
    if recovery == "sweeper":
        # No redelivery for 600 s (the default visibility timeout): the sweeper finds the
        # reservation nobody is working on (once the dead worker's lease lapsed) and enqueues
        # it again.
        wait_for(
            lambda: reservations_locked_by_workers() == set(),
            timeout=5,
            what="the killed worker's lease to lapse",
        )
        assert reservations_sweep_stuck(stuck_after=timedelta(0)) == {"requeued": 1, "failed": 0}
    r = _wait_status(r, S.ACTIVE, timeout=30)

    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
    outcomes = list(
        ProvisioningAttempt.objects.filter(reservation=r)
        .order_by("number")
        .values_list("outcome", flat=True)
    )
    assert outcomes[0] == AttemptOutcome.ABANDONED
    assert outcomes[-1] == AttemptOutcome.SUCCEEDED
    assert driver_log(r).count("start") == 1


def test_a_reservation_made_while_redis_is_unreachable_is_provisioned_once_it_is_back(
    worker, broker, caplog
):
    worker.start()
    market = market_create(nodes=1, gpus=4)

    caplog.set_level(logging.WARNING, logger="marketplace.provisioning.scheduler")
    with broker_url_for_this_process(CLOSED_PORT_BROKER):
        with transaction.atomic():
            kicked = market.book()  # reservation_create kicks on commit: that send fails
            provisioning_kick(kicked.pk)  # a second kick in the same transaction fails too
        other = market.book()
        counts = reservations_dispatch_due()  # its enqueues after commit fail too

    assert counts == {"preempted": 0, "resold": 0, "started": 2, "ended": 0}
    assert Reservation.objects.filter(pk__in=[kicked.pk, other.pk]).count() == 2
    assert [_status(kicked), _status(other)] == [S.SCHEDULED, S.SCHEDULED]
    failures = [m for m in caplog.messages if "could not enqueue" in m]
    # Three kicks (two of kicked, one of other), then the dispatcher's batch: logged, not raised.
    assert len(failures) == 4
    assert redis_test_client().llen(broker) == 0
    # The failed enqueues left no marker: the next tick does not wait for the redispatch delay.
    assert ProvisioningDispatch.objects.count() == 0

    # Redis is back: the next dispatcher run catches both up.
    assert reservations_dispatch_due() == {"preempted": 0, "resold": 0, "started": 2, "ended": 0}
    for r in (kicked, other):
        r = _wait_status(r, S.ACTIVE, timeout=20)
        assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]


def test_a_reservation_due_while_redis_was_down_is_dispatched_by_beat_once_it_is_back(worker):
    market = market_create(nodes=1, gpus=4)
    with broker_url_for_this_process(CLOSED_PORT_BROKER):
        r = market.book()  # its kick on commit fails: nothing is queued
    assert _status(r) == S.SCHEDULED

    worker.start(beat=True, PROVISIONING_DISPATCH_INTERVAL_SECONDS="1")
    r = _wait_status(r, S.ACTIVE, timeout=20)
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]


def test_duplicate_deliveries_make_one_transition_and_one_set_of_driver_calls(
    worker, driver_log, broker
):
    worker.start(concurrency=3, SIMULATED_DRIVER_LATENCY_SECONDS="1")
    market = market_create(nodes=1, gpus=4)
    r = market.book()

    reservations_dispatch_due()
    for _ in range(3):  # the same task delivered again, while the first copy runs
        app.send_task(PROVISION_TASK, args=[r.pk])
    r = _wait_status(r, S.ACTIVE, timeout=20)
    wait_for(lambda: broker_idle(broker), timeout=15, what="the worker to finish every copy")
    for _ in range(2):  # and again once it is active
        app.send_task(PROVISION_TASK, args=[r.pk])
    wait_for(lambda: broker_idle(broker), timeout=15, what="the worker to finish the late copies")

    r.refresh_from_db()
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
    assert driver_log(r) == ["prepare", "start"]
    assert list(
        ProvisioningAttempt.objects.filter(reservation=r).values_list("outcome", flat=True)
    ) == [AttemptOutcome.SUCCEEDED]
    assert r.activated_at is not None and r.activated_at < timezone.now()
