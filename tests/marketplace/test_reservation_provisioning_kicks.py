"""reservation_create and reservation_cancel hand due work to the provisioning worker at once.

The tasks are published to a queue of this test's own on the configured Redis (the `broker`
fixture); no worker consumes it, so what was enqueued can be read back from Redis.
"""

import json
import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import Reservation, ReservationStatus
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.kicks import PROVISION_TASK, RELEASE_TASK
from marketplace.provisioning.services import reservation_provision_step
from marketplace.services.reservations import reservation_cancel
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (broker_fixture is a fixture)
    broker_fixture,
    broker_url_for_this_process,
    market_create,
    redis_test_client,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus
CLOSED_PORT_BROKER = "redis://127.0.0.1:1/0"


@pytest.fixture
def market():
    return market_create(nodes=1, gpus=4)


def _enqueued(queue: str) -> list[tuple[str, str]]:
    """(task name, args) of every message waiting in `queue`, oldest first."""
    raw = reversed(redis_test_client().lrange(queue, 0, -1))  # kombu LPUSHes
    return [(m["headers"]["task"], m["headers"]["argsrepr"]) for m in map(json.loads, raw)]


def test_creating_a_reservation_that_starts_now_enqueues_its_provision_after_commit(
    market, broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        r = market.book()
    assert r.status == S.SCHEDULED
    assert _enqueued(broker) == []  # nothing is sent before the booking commits

    for callback in callbacks:
        callback()

    assert _enqueued(broker) == [(PROVISION_TASK, f"[{r.pk}]")]


def test_a_reservation_booked_ahead_enqueues_nothing(
    market, broker, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        r = market.book(starts_at=timezone.now() + timedelta(hours=2))

    assert r.status == S.PENDING
    assert _enqueued(broker) == []


def test_a_reservation_is_still_made_when_redis_is_unreachable_and_the_failure_is_logged(
    market, broker, caplog, django_capture_on_commit_callbacks
):
    caplog.set_level(logging.WARNING, logger="config.celery")
    with broker_url_for_this_process(CLOSED_PORT_BROKER):
        with django_capture_on_commit_callbacks(execute=True):
            r = market.book()

    assert Reservation.objects.get(pk=r.pk).status == S.SCHEDULED
    (failure,) = [m for m in caplog.messages if "could not enqueue" in m]
    assert failure.startswith(f"could not enqueue {PROVISION_TASK} for reservation {r.pk}: ")
    assert failure.endswith("(the sweeper will retry)")
    assert _enqueued(broker) == []


def test_stopping_an_active_reservation_early_enqueues_its_release_after_commit(
    market, broker, django_capture_on_commit_callbacks
):
    r = market.book()
    assert reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver()).outcome == (
        "active"
    )
    r.refresh_from_db()

    with django_capture_on_commit_callbacks() as callbacks:
        stopped = reservation_cancel(reservation=r, actor_label="user:test")
    assert stopped.status == S.RELEASING
    assert _enqueued(broker) == []

    for callback in callbacks:
        callback()

    assert _enqueued(broker) == [(RELEASE_TASK, f"[{r.pk}]")]


def test_cancelling_before_activation_enqueues_no_release(
    market, broker, django_capture_on_commit_callbacks
):
    r = market.book(starts_at=timezone.now() + timedelta(hours=2))

    with django_capture_on_commit_callbacks(execute=True):
        cancelled = reservation_cancel(reservation=r, actor_label="user:test")

    assert cancelled.status == S.CANCELLED
    assert _enqueued(broker) == []
