"""A workload that stops delivering is billed to the last time it was seen running, not to the
agent's report that finds it gone: the heartbeat before the node's previous report (which
found it running), or its start, whichever is later; an exit to the runtime's exit time."""

from datetime import timedelta

import pytest
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.services.usage import reservations_book_now
from inventory.telemetry import buffer_client
from marketplace.models import Reservation, ReservationOutage, ReservationStatus
from marketplace.provisioning import agent_reports
from marketplace.provisioning.services import WORKLOAD_LOST_CAUSE
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.marketplace.test_agent_report_delivery import (
    REPORT,
    _active_through_agent,
    _container,
    _heartbeat,
    _provision,
    _run_jobs,
)
from tests.marketplace.test_ops_probe_node_reboot import _silent_then_offline
from tests.provisioning_support import agent_client, market_create

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


def _fresh(r) -> Reservation:
    return Reservation.objects.get(pk=r.pk)


def _seen_running(r, node, agent):
    """A heartbeat, then a report that shows the workload running; returns that heartbeat."""
    _heartbeat(agent)
    heard = agent_reports._last_heard(node)
    response = agent.post(REPORT, {"containers": [_container(r, "running")]}, format="json")
    assert response.status_code == 200
    return heard


def _iso(at) -> str:
    return at.isoformat().replace("+00:00", "Z")


def test_a_vanished_workload_is_not_billed_after_the_heartbeat_whose_report_saw_it_running():
    r, node, agent, _ = _active_through_agent()
    heard = _seen_running(r, node, agent)
    _heartbeat(agent)  # a node reboot: the next report no longer lists it

    response = agent.post(REPORT, {"containers": []}, format="json")

    assert response.status_code == 200
    assert _fresh(r).status == S.PROVISIONING
    outage = ReservationOutage.objects.get(reservation=r)
    assert (outage.cause, outage.started_at, outage.ended_at) == (WORKLOAD_LOST_CAUSE, heard, None)
    # Usage booked to a minute later stops at that heartbeat: 2 GPUs from the activation.
    until = timezone.now() + timedelta(minutes=1)
    Reservation.objects.filter(pk=r.pk).update(activated_at=r.activated_at - timedelta(hours=1))
    reservations_book_now(reservation_ids=[r.pk], now=until)
    booked = LedgerEntry.objects.filter(reservation=r, kind=LedgerKind.USAGE)
    assert sum(booked.values_list("gpu_seconds", flat=True)) == 2 * (
        int((until - r.activated_at + timedelta(hours=1)).total_seconds())
        - int((until - heard).total_seconds())
    )


def test_the_first_report_after_the_start_bills_from_the_activation_at_most():
    """Its node's previous report came before the workload started: what proves it ran is
    its start (the agent completes it once the container runs) and its activation."""
    market = market_create(nodes=1, gpus=4)
    r = market.book(gpu_count=2)
    _provision(r)
    node = market.nodes[0]
    agent = agent_client(node)
    _heartbeat(agent)
    assert agent.post(REPORT, {"containers": []}, format="json").status_code == 200
    assert _run_jobs(agent) == ["prepare", "start"]
    _provision(r)
    activated = _fresh(r).activated_at
    _heartbeat(agent)

    agent.post(REPORT, {"containers": []}, format="json")

    assert ReservationOutage.objects.get(reservation=r).started_at == activated


def test_without_a_record_of_the_nodes_last_report_the_outage_runs_from_this_report():
    r, node, agent, _ = _active_through_agent()
    _seen_running(r, node, agent)
    buffer_client().hdel(agent_reports.REPORTED_KEY, str(node.pk))  # Redis lost it
    _heartbeat(agent)
    before = timezone.now()

    agent.post(REPORT, {"containers": []}, format="json")

    assert before <= ReservationOutage.objects.get(reservation=r).started_at <= timezone.now()


@pytest.mark.parametrize("when", ["between", "before_seen", "future", "none"])
def test_a_workload_that_exited_is_billed_to_its_exit(when):
    r, node, agent, _ = _active_through_agent()
    heard = _seen_running(r, node, agent)
    _heartbeat(agent)
    exit_at = timezone.now() - timedelta(microseconds=1)
    finished = {
        "between": _iso(exit_at),
        "before_seen": _iso(heard - timedelta(minutes=5)),  # the node's clock is behind
        "future": _iso(timezone.now() + timedelta(hours=1)),
        "none": None,
    }[when]
    report = _container(r, "exited", exit_code=0, finished_at=finished)

    before = timezone.now()
    response = agent.post(REPORT, {"containers": [report]}, format="json")

    assert response.status_code == 200
    ended = _fresh(r)
    assert ended.status == S.FAILED
    if when == "between":
        assert ended.released_at == exit_at
    elif when == "future":
        assert before <= ended.released_at <= timezone.now()
    else:
        assert ended.released_at == heard
    # The usage booked stops there (an hour's run, to tell).
    Reservation.objects.filter(pk=r.pk).update(activated_at=r.activated_at - timedelta(hours=1))
    reservations_book_now(reservation_ids=[r.pk])
    booked = LedgerEntry.objects.filter(reservation=r, kind=LedgerKind.USAGE)
    assert sum(booked.values_list("gpu_seconds", flat=True)) == 2 * int(
        (ended.released_at - ended.activated_at + timedelta(hours=1)).total_seconds()
    )


def test_an_exit_time_as_go_prints_it_is_read():
    r, node, agent, _ = _active_through_agent()
    _seen_running(r, node, agent)
    _heartbeat(agent)
    exit_at = timezone.now()
    finished = exit_at.strftime("%Y-%m-%d %H:%M:%S.%f") + "123 +0000 UTC"  # nanoseconds

    agent.post(
        REPORT,
        {"containers": [_container(r, "exited", exit_code=1, finished_at=finished)]},
        format="json",
    )

    assert _fresh(r).released_at == exit_at


def test_a_vanish_past_the_restarts_ends_it_billed_to_the_heartbeat_that_saw_it_running(
    settings,
):
    settings.PROVISIONING_WORKLOAD_RESTARTS = 0
    r, node, agent, _ = _active_through_agent()
    heard = _seen_running(r, node, agent)
    _heartbeat(agent)

    agent.post(REPORT, {"containers": []}, format="json")

    ended = _fresh(r)
    assert (ended.status, ended.released_at) == (S.FAILED, heard)
    assert not ReservationOutage.objects.filter(reservation=r).exists()


def test_a_nodes_outage_still_open_ends_where_the_lost_workloads_begins():
    """Back from a reboot whose silence the sweep has not closed on the reservation yet: the
    two outages are back to back, at the heartbeat that last saw the workload running."""
    r, node, agent, _ = _active_through_agent()
    heard = _seen_running(r, node, agent)
    _silent_then_offline(node)
    silence = ReservationOutage.objects.get(reservation=r, ended_at=None)
    _heartbeat(agent)

    agent.post(REPORT, {"containers": []}, format="json")

    silence.refresh_from_db()
    lost = ReservationOutage.objects.get(reservation=r, cause=WORKLOAD_LOST_CAUSE)
    assert (silence.ended_at, lost.started_at) == (max(heard, silence.started_at), heard)
