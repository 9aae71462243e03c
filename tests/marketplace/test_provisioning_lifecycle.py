"""The provision and release steps in-process, with the simulated driver (no broker needed).

The Celery worker runs exactly these steps; tests/e2e/test_celery_provisioning.py drives them
through a real worker and Redis.
"""

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from inventory.models import Node, NodeStatus, Outage, OutageCause
from marketplace.models import (
    Allocation,
    AttemptOutcome,
    ProvisioningAttempt,
    ProvisioningDispatch,
    ReservationOutage,
    ReservationStatus,
)
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.scheduler import reservations_dispatch_due
from marketplace.provisioning.services import (
    reservation_provision_step,
    reservation_release_step,
    reservation_worker_lock,
)
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create, ssh_key, statuses

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


def _end_now(reservation) -> None:
    """Make the reservation's period lie in the past (as if its end had come)."""
    now = timezone.now()
    type(reservation).objects.filter(pk=reservation.pk).update(
        starts_at=now - timedelta(hours=1), ends_at=now - timedelta(milliseconds=1)
    )


@pytest.fixture
def market():
    return market_create(nodes=2, gpus=4)


@pytest.fixture
def calls_log(tmp_path):
    path = tmp_path / "driver.log"

    def read() -> list[str]:
        if not path.exists():
            return []
        return [json.loads(line)["op"] for line in path.read_text().splitlines()]

    read.path = str(path)
    return read


def test_it_provisions_a_due_reservation_to_active_with_connection_details(market, calls_log):
    r = market.book(gpu_count=2, workload={"ports": [8888], "ssh_public_keys": [ssh_key()]})
    assert r.status == S.SCHEDULED

    result = reservation_provision_step(
        reservation_id=r.pk, driver=SimulatedDriver(log_path=calls_log.path)
    )

    r.refresh_from_db()
    assert result.outcome == "active"
    assert r.status == S.ACTIVE
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
    node = Allocation.objects.filter(reservation=r).first().node
    assert r.connection["host"] == f"{node.hostname}.sim.switchyard.test"
    assert r.connection["ssh_port"] == 22
    assert r.connection["ports"] == {"8888": 8888}
    assert r.activated_at is not None and r.released_at is None
    assert calls_log() == ["prepare", "start"]
    assert list(ProvisioningAttempt.objects.values_list("outcome", flat=True)) == ["succeeded"]


def test_without_ssh_keys_the_connection_shows_no_ssh_port(market, calls_log):
    # Nothing listens on 22 without a key: the schema's null, not a port that refuses.
    r = market.book(gpu_count=1, workload={"ports": [8888]})
    reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver(log_path=calls_log.path))
    r.refresh_from_db()
    assert r.connection["ssh_port"] is None
    assert [n["ssh_port"] for n in r.connection["nodes"]] == [None]
    assert r.connection["ports"] == {"8888": 8888}


def test_a_repeated_provision_of_an_active_reservation_does_nothing(market, calls_log):
    r = market.book()
    driver = SimulatedDriver(log_path=calls_log.path)
    reservation_provision_step(reservation_id=r.pk, driver=driver)
    activated_at = type(r).objects.get(pk=r.pk).activated_at

    again = reservation_provision_step(reservation_id=r.pk, driver=driver)

    r.refresh_from_db()
    assert again.outcome == "noop"
    assert r.activated_at == activated_at
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
    assert calls_log() == ["prepare", "start"]
    assert ProvisioningAttempt.objects.count() == 1


def test_a_provision_delivered_while_another_worker_holds_the_reservation_returns_at_once(
    market, calls_log
):
    r = market.book()
    with reservation_worker_lock(r.pk) as held:
        assert held
        with reservation_worker_lock(r.pk) as second:
            assert second is False
        busy = reservation_provision_step(
            reservation_id=r.pk, driver=SimulatedDriver(log_path=calls_log.path)
        )
        assert busy.outcome == "busy"
        assert calls_log() == []
        # It touched nothing: no move, no attempt.
        r.refresh_from_db()
        assert (r.status, statuses(r)) == (S.SCHEDULED, [S.SCHEDULED])
        assert not ProvisioningAttempt.objects.filter(reservation=r).exists()
    result = reservation_provision_step(
        reservation_id=r.pk, driver=SimulatedDriver(log_path=calls_log.path)
    )
    assert result.outcome == "active"


def test_it_does_not_provision_a_reservation_before_its_start(market, calls_log):
    r = market.book(starts_at=timezone.now() + timedelta(hours=2))
    assert r.status == S.PENDING

    counts = reservations_dispatch_due()
    result = reservation_provision_step(
        reservation_id=r.pk, driver=SimulatedDriver(log_path=calls_log.path)
    )

    r.refresh_from_db()
    assert counts == {"preempted": 0, "resold": 0, "started": 0, "ended": 0}
    assert result.outcome == "noop"
    assert r.status == S.PENDING
    assert calls_log() == []


def test_the_dispatcher_enqueues_due_starts_and_ends_once_after_commit(
    market, django_capture_on_commit_callbacks
):
    due, due_too = market.book(), market.book()
    active = market.book()
    reservation_provision_step(reservation_id=active.pk, driver=SimulatedDriver())
    _end_now(active)
    later = market.book(starts_at=timezone.now() + timedelta(hours=1))

    with django_capture_on_commit_callbacks() as callbacks:
        counts = reservations_dispatch_due(batch=1)
    with django_capture_on_commit_callbacks() as again:
        repeat = reservations_dispatch_due()

    assert counts == {"preempted": 0, "resold": 0, "started": 2, "ended": 1}
    assert len(callbacks) == 3  # one enqueue per batch, each after its commit
    assert repeat == {"preempted": 0, "resold": 0, "started": 0, "ended": 0} and again == []
    markers = ProvisioningDispatch.objects.values_list("reservation_id", "kind")
    assert sorted(markers) == sorted(
        [(due.pk, "provision"), (due_too.pk, "provision"), (active.pk, "release")]
    )
    # The tasks make the moves; the dispatcher changes no status.
    assert dict(type(due).objects.values_list("pk", "status")) == {
        due.pk: S.SCHEDULED,
        due_too.pk: S.SCHEDULED,
        active.pk: S.ACTIVE,
        later.pk: S.PENDING,
    }


def test_a_due_reservation_is_enqueued_again_once_its_marker_is_old(market):
    r = market.book()
    reservations_dispatch_due()
    ProvisioningDispatch.objects.update(enqueued_at=timezone.now() - timedelta(minutes=2))

    assert reservations_dispatch_due() == {"preempted": 0, "resold": 0, "started": 1, "ended": 0}
    assert ProvisioningDispatch.objects.get(reservation=r).enqueued_at > timezone.now() - (
        timedelta(seconds=5)
    )


def test_it_releases_an_ended_reservation_and_frees_its_gpus_at_once(market, calls_log):
    r = market.book(gpu_count=4)
    driver = SimulatedDriver(log_path=calls_log.path)
    reservation_provision_step(reservation_id=r.pk, driver=driver)
    _end_now(r)

    result = reservation_release_step(reservation_id=r.pk, driver=driver)

    r.refresh_from_db()
    assert result.outcome == "completed"
    assert statuses(r)[-2:] == [S.RELEASING, S.COMPLETED]
    assert r.released_at is not None and r.released_at >= r.activated_at
    assert Allocation.objects.filter(reservation=r, is_live=True).count() == 0
    assert calls_log() == ["prepare", "start", "stop"]
    assert reservation_release_step(reservation_id=r.pk, driver=driver).outcome == "noop"
    assert calls_log() == ["prepare", "start", "stop"]


def test_a_release_before_the_end_does_nothing(market):
    r = market.book()
    reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())

    assert reservation_release_step(reservation_id=r.pk, driver=SimulatedDriver()).outcome == "noop"
    r.refresh_from_db()
    assert r.status == S.ACTIVE


def test_a_transient_failure_is_retried_with_backoff_then_succeeds(market):
    r = market.book()

    first = reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver(failure_rate=1))
    second = reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver(failure_rate=1))
    r.refresh_from_db()
    assert (first.outcome, first.retry_in) == ("retry", 2.0)
    assert (second.outcome, second.retry_in) == ("retry", 4.0)
    assert r.status == S.PROVISIONING and r.activated_at is None

    third = reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())
    r.refresh_from_db()
    assert third.outcome == "active" and r.status == S.ACTIVE
    assert list(
        ProvisioningAttempt.objects.order_by("number").values_list("outcome", flat=True)
    ) == [
        "error",
        "error",
        "succeeded",
    ]


def test_it_fails_after_the_maximum_attempts_and_charges_nothing(market, settings):
    settings.PROVISIONING_MAX_ATTEMPTS = 2
    r = market.book(gpu_count=2)
    driver = SimulatedDriver(failure_rate=1)

    assert reservation_provision_step(reservation_id=r.pk, driver=driver).outcome == "retry"
    assert reservation_provision_step(reservation_id=r.pk, driver=driver).outcome == "failed"

    r.refresh_from_db()
    assert r.status == S.FAILED
    assert "failed 2 times" in r.status_reason
    assert r.activated_at is None  # billing counts activated_at → released_at: nothing
    assert Allocation.objects.filter(reservation=r, is_live=True).count() == 0


def test_a_failed_node_is_marked_and_the_reservation_moves_to_another_node_at_the_site(market):
    r = market.book(gpu_count=2)
    bad = Allocation.objects.filter(reservation=r).first().node
    good = next(n for n in market.nodes if n.pk != bad.pk)
    driver = SimulatedDriver(fail_hostnames=frozenset({bad.hostname}))

    moved = reservation_provision_step(reservation_id=r.pk, driver=driver)

    bad.refresh_from_db()
    assert moved.outcome == "retry" and moved.retry_in == 0
    assert bad.status == NodeStatus.MAINTENANCE
    outage = Outage.objects.get(node=bad)
    assert (outage.cause, outage.ended_at) == (OutageCause.HARDWARE_FAILURE, None)
    live = Allocation.objects.filter(reservation=r, is_live=True)
    assert set(live.values_list("node_id", flat=True)) == {good.pk}
    assert live.count() == 2
    assert Allocation.objects.filter(reservation=r, node=bad, is_live=True).count() == 0

    done = reservation_provision_step(reservation_id=r.pk, driver=driver)
    r.refresh_from_db()
    assert done.outcome == "active"
    assert r.connection["host"].startswith(good.hostname)


def test_a_failed_node_without_spare_gpus_at_the_site_fails_the_reservation(
    market, calls_log, django_capture_on_commit_callbacks
):
    other = market.book(gpu_count=4)  # fills one node; ours takes the other
    r = market.book(gpu_count=4)
    bad = Allocation.objects.filter(reservation=r).first().node
    driver = SimulatedDriver(fail_hostnames=frozenset({bad.hostname}), log_path=calls_log.path)

    with django_capture_on_commit_callbacks(execute=True):
        result = reservation_provision_step(reservation_id=r.pk, driver=driver)

    r.refresh_from_db(), other.refresh_from_db()
    assert result.outcome == "failed"
    assert r.status == S.FAILED
    assert f"No other free GPUs at {market.site.slug}" in r.status_reason
    assert r.activated_at is None
    assert Allocation.objects.filter(reservation=r, is_live=True).count() == 0
    assert calls_log() == ["prepare", "stop"]  # nothing left running for it
    assert other.status == S.SCHEDULED  # the other reservation was not touched
    assert Allocation.objects.filter(reservation=other, is_live=True).count() == 4


def test_a_node_failure_records_outages_only_on_active_reservations_of_that_node(market):
    a = market.book(gpu_count=2)
    b = market.book(gpu_count=2)
    elsewhere = market.book(gpu_count=4)
    for r in (a, b, elsewhere):
        reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())
    node_ab = Allocation.objects.filter(reservation=a).first().node
    assert Allocation.objects.filter(reservation=b).first().node == node_ab
    waiting = market.book(gpu_count=1, starts_at=timezone.now() + timedelta(hours=3))

    from marketplace.provisioning.services import node_mark_failed

    before = dict(type(a).objects.values_list("pk", "status"))
    node_mark_failed(node=node_ab, reason="PSU died")

    assert set(ReservationOutage.objects.values_list("reservation_id", flat=True)) == {a.pk, b.pk}
    assert ReservationOutage.objects.filter(ended_at__isnull=True).count() == 2
    # Recording the outage changes no reservation's status, on that node or elsewhere.
    assert dict(type(a).objects.values_list("pk", "status")) == before
    assert before[waiting.pk] == S.PENDING and before[elsewhere.pk] == S.ACTIVE


def test_an_outage_still_open_at_release_ends_with_the_reservation(market):
    r = market.book()
    reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())
    node = Allocation.objects.filter(reservation=r).first().node
    from marketplace.provisioning.services import node_mark_failed

    node_mark_failed(node=node, reason="fans")
    _end_now(r)
    reservation_release_step(reservation_id=r.pk, driver=SimulatedDriver())

    r.refresh_from_db()
    outage = ReservationOutage.objects.get(reservation=r)
    assert outage.ended_at == r.released_at


def test_an_attempt_left_running_by_a_dead_worker_counts_as_failed(market, settings):
    settings.PROVISIONING_MAX_ATTEMPTS = 1
    r = market.book()
    reservations_dispatch_due()
    ProvisioningAttempt.objects.create(
        reservation=r, kind="provision", number=1, started_at=timezone.now()
    )

    result = reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())

    r.refresh_from_db()
    assert result.outcome == "failed"
    assert r.status == S.FAILED
    assert ProvisioningAttempt.objects.get(number=1).outcome == AttemptOutcome.ABANDONED


def test_the_workload_of_a_reservation_that_failed_while_active_is_stopped_once(
    market, calls_log, django_capture_on_commit_callbacks
):
    from marketplace.services.transitions import reservation_transition

    r = market.book(gpu_count=2)
    driver = SimulatedDriver(log_path=calls_log.path)
    reservation_provision_step(reservation_id=r.pk, driver=driver)
    reservation_transition(reservation=r, to_status=S.FAILED, cause="staff", actor_label="staff")

    with django_capture_on_commit_callbacks() as callbacks:
        assert reservations_dispatch_due() == {
            "preempted": 0,
            "resold": 0,
            "started": 0,
            "ended": 1,
        }
    assert len(callbacks) == 1
    result = reservation_release_step(reservation_id=r.pk, driver=driver)
    again = reservation_release_step(reservation_id=r.pk, driver=driver)
    ProvisioningDispatch.objects.all().delete()

    assert (result.outcome, again.outcome) == ("torn_down", "noop")
    assert calls_log() == ["prepare", "start", "stop"]
    assert reservations_dispatch_due() == {"preempted": 0, "resold": 0, "started": 0, "ended": 0}
    r.refresh_from_db()
    assert r.status == S.FAILED  # no status change, only the stop


def test_a_provision_takes_nine_database_round_trips(market, django_assert_num_queries):
    # Throughput (bench/bench_provisioning.py): lease claim; begin, row lock, claim (moves with
    # their history and events, attempt, placement), the organisation's webhook endpoints,
    # commit; activate (with its history and event) and the endpoints again in a transaction
    # (begin and commit are not counted here: the test's transaction stands in for them);
    # lease release. More means a regression.
    r = market.book(workload={"ports": [8888]})

    with django_assert_num_queries(9):
        result = reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())

    r.refresh_from_db()
    assert result.outcome == "active" and r.status == S.ACTIVE
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
    attempt = ProvisioningAttempt.objects.get(reservation=r)
    assert (attempt.number, attempt.outcome, attempt.error) == (1, "succeeded", "")
    assert attempt.finished_at is not None and attempt.next_attempt_at is None


def test_a_pending_reservation_past_its_start_records_both_moves_in_order(market):
    r = market.book(starts_at=timezone.now() + timedelta(hours=2))
    type(r).objects.filter(pk=r.pk).update(starts_at=timezone.now() - timedelta(seconds=1))

    result = reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())

    r.refresh_from_db()
    assert result.outcome == "active"
    assert statuses(r) == [S.PENDING, S.SCHEDULED, S.PROVISIONING, S.ACTIVE]
    assert list(r.transitions.order_by("at", "id").values_list("cause", flat=True)) == [
        "created",
        "start time reached",
        "provisioning started",
        "workload running",
    ]
    assert r.status_reason == "workload running" and r.activated_at is not None


def test_a_reservation_cancelled_while_starting_is_not_activated_and_is_stopped(
    market, calls_log, django_capture_on_commit_callbacks
):
    from marketplace.services.reservations import reservation_cancel

    class CancelledMeanwhile(SimulatedDriver):
        def start_workload(self, target):
            super().start_workload(target)
            reservation_cancel(reservation=r, actor_label="user:test")

    r = market.book()
    with django_capture_on_commit_callbacks(execute=True):
        result = reservation_provision_step(
            reservation_id=r.pk, driver=CancelledMeanwhile(log_path=calls_log.path)
        )

    r.refresh_from_db()
    assert result.outcome == "noop"
    assert r.status == S.CANCELLED and r.activated_at is None and r.connection == {}
    assert statuses(r) == [S.SCHEDULED, S.PROVISIONING, S.CANCELLED]
    attempt = ProvisioningAttempt.objects.get(reservation=r)
    assert (attempt.outcome, attempt.error) == ("gave_up", "left provisioning meanwhile")
    assert calls_log() == ["prepare", "start", "stop"]


def test_a_node_taken_into_maintenance_since_the_booking_is_named_in_words(market):
    r = market.book(gpu_count=2)
    node = Allocation.objects.filter(reservation=r).first().node
    Node.objects.filter(pk__in=[n.pk for n in market.nodes]).update(status=NodeStatus.MAINTENANCE)

    step = reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver())

    r.refresh_from_db()
    assert step.outcome == "failed"
    # It read "Node abl-001 is maintenance."
    assert r.status_reason.startswith(f"Node {node.hostname} is in maintenance. No other free GPUs")
