"""A container stopped from outside its workload (the agent's `stopped_by`: the runtime's stop
or kill, a reboot) is not the customer's exit: it restarts in place with an outage from when
it was last seen running, and a reserved term is charged nothing for the gap. The same exit
without `stopped_by` (an older agent, or the workload's own) still ends the reservation."""

from datetime import timedelta

import pytest
from django.utils import timezone

from billing.services.credits import cancellation_settle, reservation_month_uptime
from config.dates import iso_utc
from marketplace.models import Reservation, ReservationOutage, ReservationStatus
from marketplace.provisioning import agent_reports, kicks
from marketplace.provisioning.services import WORKLOAD_LOST_CAUSE, reservation_outages_reconcile
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.marketplace.test_agent_report_delivery import (
    REPORT,
    _active_through_agent,
    _container,
    _heartbeat,
)
from tests.marketplace.test_agent_report_restart import _back_to_active
from tests.provisioning_support import statuses

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


def _fresh(r) -> Reservation:
    return Reservation.objects.get(pk=r.pk)


def _runtime_time(moment) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_a_terms_workload_stopped_through_the_runtime_restarts_in_place_and_the_sla_counts_it(
    monkeypatch, django_capture_on_commit_callbacks
):
    r, node, agent, _ = _active_through_agent(tier="reserved")
    kicked = []
    monkeypatch.setattr(kicks, "enqueue_now", lambda task, rid: kicked.append((task, rid)))
    finished = timezone.now()
    # An operator's `podman stop`: the workload caught SIGTERM and exited 0 by itself.
    stopped = _container(r, "exited", exit_code=0, finished_at=_runtime_time(finished),
                         stopped_by="runtime", log_tail="checkpoint written")  # fmt: skip

    with django_capture_on_commit_callbacks(execute=True):
        response = agent.post(REPORT, {"containers": [stopped]}, format="json")

    assert response.status_code == 200
    restarting = _fresh(r)
    assert (restarting.status, restarting.placement_generation) == (S.PROVISIONING, 1)
    assert restarting.released_at is None
    assert restarting.status_reason == (
        f"The workload was stopped from outside it: node {node.hostname}'s container runtime "
        "stopped or killed its container (a site operator, or the runtime shutting down), with "
        f"code 0 at {_runtime_time(finished)}; it restarts in place on the same GPUs (restart 1 "
        "of at most 3 within 1 h), and the time until it runs again counts as downtime of the "
        "term under the SLA. Last log lines:\ncheckpoint written"
    )
    assert kicked == [(kicks.PROVISION_TASK, r.pk)]
    outage = ReservationOutage.objects.get(reservation=r)
    # Nothing later proves it ran (no earlier report): the outage runs from its exit.
    assert (outage.node_id, outage.cause, outage.ended_at) == (node.pk, WORKLOAD_LOST_CAUSE, None)
    assert outage.started_at == finished

    _back_to_active(r, agent)

    assert reservation_outages_reconcile() == (0, 1)
    outage.refresh_from_db()
    back = r.transitions.filter(to_status=S.ACTIVE).order_by("at").last().at
    assert outage.ended_at == back
    assert statuses(r)[-3:] == [S.ACTIVE, S.PROVISIONING, S.ACTIVE]
    _measured, down = reservation_month_uptime(reservation=_fresh(r), month=back.date())
    assert down == int((back - finished).total_seconds())
    # The term goes on: nothing ended, nothing to refund.
    assert _fresh(r).cancellation == {}
    assert cancellation_settle(reservation_id=r.pk) is None


@pytest.mark.parametrize("extra", [{}, {"stopped_by": None}, {"stopped_by": ""}])
def test_an_exit_143_without_stopped_by_is_the_workloads_own_and_ends_the_term(extra):
    """An older agent's report, or the workload exiting 143 itself: the code alone proves
    nothing, so it ends the reservation as before, the term not refunded."""
    r, _node, agent, _ = _active_through_agent(tier="reserved")
    exited = _container(r, "exited", exit_code=143, finished_at="2026-12-08T04:05:06Z", **extra)

    assert agent.post(REPORT, {"containers": [exited]}, format="json").status_code == 200

    ended = _fresh(r)
    assert ended.status == S.FAILED
    assert ended.placement_generation == 0
    assert ended.status_reason.startswith(
        "The workload exited with code 143 at 2026-12-08T04:05:06Z; the reservation ended. A "
        "reserved term is charged in full when it is booked: the rest of the term is not "
        "refunded when its workload ends itself."
    )
    assert "refund_amount" not in ended.cancellation
    assert not ReservationOutage.objects.filter(reservation=r).exists()


def test_a_workload_stopped_by_a_reboot_restarts_in_place_from_when_it_was_last_seen_running():
    r, node, agent, _ = _active_through_agent()
    seen = agent_reports._last_heard(node)
    # A report finds it running after that heartbeat; the node reboots; the agent's first
    # report after it finds the container ended before the boot.
    agent.post(REPORT, {"containers": [_container(r, "running")]}, format="json")
    _heartbeat(agent)
    finished = timezone.now()
    rebooted = _container(r, "exited", exit_code=143, finished_at=_runtime_time(finished),
                          stopped_by="reboot")  # fmt: skip

    agent.post(REPORT, {"containers": [rebooted]}, format="json")

    restarting = _fresh(r)
    assert restarting.status == S.PROVISIONING
    assert restarting.status_reason.startswith(
        f"The workload was stopped by a restart of node {node.hostname}: its container ended "
        f"with code 143 at {_runtime_time(finished)}, before the node last booted; it restarts "
        "in place on the same GPUs (restart 1 of at most 3 within 1 h), and the time until it "
        "runs again is not charged."
    )
    outage = ReservationOutage.objects.get(reservation=r)
    # Billed to the heartbeat before the report that found it running, not to its exit.
    assert abs((outage.started_at - seen).total_seconds()) < 0.001
    assert outage.started_at < finished


def test_a_cause_this_server_does_not_know_is_still_a_stop_from_outside():
    r, node, agent, _ = _active_through_agent()
    stopped = _container(r, "exited", exit_code=137, stopped_by="bmc-power-cycle")

    assert agent.post(REPORT, {"containers": [stopped]}, format="json").status_code == 200

    restarting = _fresh(r)
    assert restarting.status == S.PROVISIONING
    assert restarting.status_reason.startswith(
        f"The workload was stopped from outside it on node {node.hostname}, with code 137 at "
        "an unknown time; it restarts in place"
    )
    assert "bmc" not in restarting.status_reason  # not quoted: only known words reach it


@pytest.mark.parametrize("cause", ["x" * 33, ["runtime"], True])
def test_a_malformed_stopped_by_is_a_400_and_changes_nothing(cause):
    r, _node, agent, _ = _active_through_agent()
    stopped = _container(r, "exited", exit_code=0, stopped_by=cause)

    response = agent.post(REPORT, {"containers": [stopped]}, format="json")

    assert response.status_code == 400
    assert response.json()["error"]["field"].startswith("containers")
    unchanged = _fresh(r)
    assert (unchanged.status, unchanged.placement_generation) == (S.ACTIVE, 0)
    assert not ReservationOutage.objects.filter(reservation=r).exists()


def test_past_the_allowed_restarts_a_stop_from_outside_ends_the_term_refunded(settings):
    settings.PROVISIONING_WORKLOAD_RESTARTS = 0
    r, node, agent, _ = _active_through_agent(tier="reserved")
    finished = timezone.now()
    stopped = _container(r, "exited", exit_code=143, finished_at=_runtime_time(finished),
                         stopped_by="runtime")  # fmt: skip

    agent.post(REPORT, {"containers": [stopped]}, format="json")

    ended = _fresh(r)
    assert ended.status == S.FAILED
    assert ended.status_reason.endswith(
        "; restarts in place are turned off: the reservation ended, and the undelivered rest "
        "of the reserved term is refunded. It wrote no log."
    )
    assert ended.released_at == finished
    assert ended.cancellation["failed_at"] == iso_utc(finished)
    assert float(ended.cancellation["refund_amount"]) > 0
    assert ended.released_at - ended.activated_at < timedelta(seconds=30)
