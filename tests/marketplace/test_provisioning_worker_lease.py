"""The per-reservation worker lock holds behind a transaction-mode pooler.

Such a pooler (PgBouncer pool_mode=transaction) gives each transaction whichever server
connection is free, so nothing may live in the database session between transactions. The
tests reproduce that by closing Django's connection while the lock is held: the next
statement runs on a new server session, as it would behind the pooler.
"""

import threading
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from marketplace.models import ReservationWorkerLease
from marketplace.provisioning.services import (
    reservation_provision_step,
    reservation_release_step,
    reservation_worker_lock,
    reservations_locked_by_workers,
)
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("allow_all_funding")]


def _claim_from_another_worker(reservation_id: int) -> bool:
    """Try the lock on a second connection, as a second worker process would."""
    outcome = []

    def run():
        try:
            with reservation_worker_lock(reservation_id) as held:
                outcome.append(held)
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return outcome[0]


def test_the_lock_stays_held_when_the_pooler_moves_the_session_to_another_connection():
    r = create_reservation()
    with reservation_worker_lock(r.pk) as held:
        assert held
        connection.close()  # the pooler hands our next transaction another server session
        assert _claim_from_another_worker(r.pk) is False
        assert reservations_locked_by_workers() == {r.pk}
    # Given back from whichever session we have now.
    assert reservations_locked_by_workers() == set()
    assert _claim_from_another_worker(r.pk) is True


def test_a_live_worker_keeps_its_lease_past_its_length(settings):
    r = create_reservation()
    settings.PROVISIONING_WORKER_LEASE_SECONDS = 1
    with reservation_worker_lock(r.pk) as held:
        assert held
        time.sleep(1.6)  # a slow driver call: the lease is renewed meanwhile
        assert _claim_from_another_worker(r.pk) is False
        assert ReservationWorkerLease.objects.get(pk=r.pk).expires_at > timezone.now()
    assert _claim_from_another_worker(r.pk) is True


def test_a_dead_workers_lease_lapses(settings):
    r = create_reservation()
    settings.PROVISIONING_WORKER_LEASE_SECONDS = 30
    with reservation_worker_lock(r.pk):
        lease = ReservationWorkerLease.objects.get(reservation_id=r.pk)
        remaining = lease.expires_at - timezone.now()
        assert timedelta(seconds=25) < remaining <= timedelta(seconds=30)
        # The worker is killed: nothing gives the lease back, and it lapses.
        ReservationWorkerLease.objects.filter(pk=r.pk).update(
            expires_at=timezone.now() - timedelta(seconds=1)
        )
        assert reservations_locked_by_workers() == set()
        assert _claim_from_another_worker(r.pk) is True
    # The dead worker's late exit does not remove a lease someone else took meanwhile.
    assert ReservationWorkerLease.objects.filter(reservation_id=r.pk).count() == 0


def create_reservation():
    market = market_create(nodes=1, gpus=1)
    return market.book()


def test_a_task_for_a_reservation_that_no_longer_exists_is_a_noop_and_leaves_no_lease():
    # A provision or release queued before its reservation was deleted (e.g. an old broker
    # message after the database was reset) must not crash on the lease's foreign key.
    r = create_reservation()
    missing = r.pk + 10_000
    assert reservation_provision_step(reservation_id=missing).outcome == "noop"
    assert reservation_release_step(reservation_id=missing).outcome == "noop"
    assert not ReservationWorkerLease.objects.exists()
