"""An active workload whose container vanished or stalled (not its own exit) is restarted in
place on the same GPUs, with an outage until it is active again (not billed, counted by the
SLA); a crash loop past PROVISIONING_WORKLOAD_RESTARTS within the window ends it as before."""

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind
from billing.services.credits import cancellation_settle, reservation_month_uptime
from billing.services.metering import usage_meter_run
from billing.services.usage import reservation_delivered_seconds
from inventory.models import Node, NodeStatus
from marketplace.models import (
    AgentJob,
    Allocation,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    ReservationTransition,
)
from marketplace.provisioning import agent_reports, kicks
from marketplace.provisioning.agent_jobs import agent_job_enqueue
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import (
    WORKLOAD_LOST_CAUSE,
    reservation_outages_reconcile,
    reservation_provision_step,
    reservation_reallocate,
)
from marketplace.services.transitions import reservation_transition
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.marketplace.test_agent_report_delivery import (
    REPORT,
    _active_through_agent,
    _container,
    _heartbeat,
    _provision,
    _run_jobs,
)
from tests.provisioning_support import statuses
from tests.test_settings import SETUP, run

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


def _fresh(r) -> Reservation:
    return Reservation.objects.get(pk=r.pk)


def _gpus(r) -> set[int]:
    return set(
        Allocation.objects.filter(reservation=r, is_live=True).values_list("gpu_id", flat=True)
    )


def _back_to_active(r, agent) -> None:
    """The provisioning worker and the node's agent run the restart; then a heartbeat."""
    _provision(r)
    assert _run_jobs(agent) == ["stop", "prepare", "start"]
    _provision(r)
    assert _fresh(r).status == S.ACTIVE
    _heartbeat(agent)


def test_a_vanished_reserved_terms_workload_restarts_in_place_and_the_sla_counts_the_gap(
    monkeypatch, django_capture_on_commit_callbacks
):
    r, node, agent, _ = _active_through_agent(tier="reserved")
    gpus = _gpus(r)
    kicked = []
    monkeypatch.setattr(kicks, "enqueue_now", lambda task, rid: kicked.append((task, rid)))
    before = timezone.now()

    with django_capture_on_commit_callbacks(execute=True):
        response = agent.post(REPORT, {"containers": []}, format="json")

    assert response.status_code == 200
    restarting = _fresh(r)
    assert restarting.status == S.PROVISIONING
    assert restarting.placement_generation == 1
    assert restarting.released_at is None
    assert restarting.status_reason.endswith(
        "it restarts in place on the same GPUs (restart 1 of at most 3 within 1 h), and the "
        "time until it runs again counts as downtime of the term under the SLA."
    )
    assert _gpus(r) == gpus  # the same GPUs: a restart, not a move
    assert kicked == [(kicks.PROVISION_TASK, r.pk)]
    outage = ReservationOutage.objects.get(reservation=r)
    assert (outage.node_id, outage.cause, outage.ended_at) == (node.pk, WORKLOAD_LOST_CAUSE, None)
    assert before <= outage.started_at <= timezone.now()
    assert outage.detail.startswith("The workload's container is gone: node ")
    # Still open while it is being restarted.
    assert reservation_outages_reconcile() == (0, 0)

    _back_to_active(r, agent)

    jobs = sorted(AgentJob.objects.filter(reservation=r).values_list("kind", "generation"))
    assert jobs == [("prepare", 0), ("prepare", 1), ("start", 0), ("start", 1), ("stop", 0)]
    assert reservation_outages_reconcile() == (0, 1)
    outage.refresh_from_db()
    back = r.transitions.filter(to_status=S.ACTIVE).order_by("at").last().at
    assert outage.ended_at == back
    assert statuses(r)[-3:] == [S.ACTIVE, S.PROVISIONING, S.ACTIVE]
    assert _fresh(r).activated_at == r.activated_at  # the term's first activation stands
    # The SLA counts the gap as downtime; nothing is refunded (the term goes on).
    _measured, down = reservation_month_uptime(reservation=_fresh(r), month=back.date())
    assert down == int((back - outage.started_at).total_seconds())
    assert _fresh(r).cancellation == {}
    assert cancellation_settle(reservation_id=r.pk) is None
    # Running again, it is judged again: a running container changes nothing.
    agent.post(REPORT, {"containers": [_container(r, "running")]}, format="json")
    assert _fresh(r).status == S.ACTIVE


def test_an_on_demand_workload_is_not_billed_for_the_gap_of_its_restart():
    r, _node, agent, _ = _active_through_agent()
    agent.post(REPORT, {"containers": [_container(r, "paused")]}, format="json")
    outage = ReservationOutage.objects.get(reservation=r)

    _back_to_active(r, agent)
    reservation_outages_reconcile()

    outage.refresh_from_db()
    until = outage.ended_at + timedelta(seconds=100)
    gap = int((outage.ended_at - outage.started_at).total_seconds())
    assert reservation_delivered_seconds(reservation=_fresh(r), until=until) == (
        int((until - r.activated_at).total_seconds()) - gap
    )


def test_the_outage_of_a_restart_runs_on_when_the_restart_moves_off_the_node():
    """Its node fails while the workload is being restarted and it moves to another: the
    outage is not over at the move (it is not running anywhere) but when it is active."""
    r, node, agent, _ = _active_through_agent()
    agent.post(REPORT, {"containers": []}, format="json")
    Node.objects.filter(pk=node.pk).update(status=NodeStatus.MAINTENANCE)
    with transaction.atomic():
        locked = Reservation.objects.select_for_update().get(pk=r.pk)
        assert reservation_reallocate(reservation=locked, node=node, now=timezone.now()) == 2
    assert not Allocation.objects.filter(reservation=r, node=node, is_live=True).exists()

    assert reservation_outages_reconcile() == (0, 0)

    assert ReservationOutage.objects.get(reservation=r).ended_at is None


def test_past_the_allowed_restarts_within_the_window_the_next_vanish_ends_the_term_refunded(
    settings,
):
    settings.PROVISIONING_WORKLOAD_RESTARTS = 2
    r, node, agent, _ = _active_through_agent(tier="reserved")
    for _restart in range(2):
        agent.post(REPORT, {"containers": []}, format="json")
        assert _fresh(r).status == S.PROVISIONING
        _back_to_active(r, agent)
    credits_before = LedgerEntry.objects.filter(reservation=r, kind=LedgerKind.TERM_REFUND).count()

    agent.post(REPORT, {"containers": []}, format="json")

    ended = _fresh(r)
    assert ended.status == S.FAILED
    assert ended.placement_generation == 2  # not restarted again
    assert ended.status_reason.startswith(f"The workload's container is gone: node {node.hostname}")
    assert ended.status_reason.endswith(
        "; it was restarted in place 2 time(s) within 1 h, the most allowed, so it is not "
        "restarted again: the reservation ended, and the undelivered rest of the reserved "
        "term is refunded."
    )
    assert statuses(ended)[-2:] == [S.ACTIVE, S.FAILED]
    refund = ended.cancellation["refund_amount"]
    assert 0 < float(refund) <= float(ended.total_amount)
    reservation_outages_reconcile()
    assert (
        list(ReservationOutage.objects.filter(reservation=r, ended_at=None).values_list("pk")) == []
    )
    # One per restart, each from its report to its return (the first closed by the second
    # restart: no sweep ran between them), none for the end.
    backs = list(
        r.transitions.filter(to_status=S.ACTIVE).order_by("at").values_list("at", flat=True)
    )
    outages = ReservationOutage.objects.filter(reservation=r).order_by("started_at")
    assert [o.ended_at for o in outages] == backs[1:]
    usage_meter_run()
    credited = LedgerEntry.objects.filter(reservation=r, kind=LedgerKind.TERM_REFUND)
    assert credited.count() == credits_before + 1
    assert sum(credited.values_list("amount_minor", flat=True)) == round(float(refund) * 100)


def test_restarts_older_than_the_window_do_not_count(settings):
    settings.PROVISIONING_WORKLOAD_RESTARTS = 1
    r, _node, agent, _ = _active_through_agent()
    agent.post(REPORT, {"containers": []}, format="json")
    _back_to_active(r, agent)
    ReservationTransition.objects.filter(reservation=r, to_status=S.PROVISIONING).update(
        at=timezone.now() - timedelta(hours=1, seconds=1)
    )

    agent.post(REPORT, {"containers": []}, format="json")

    assert _fresh(r).status == S.PROVISIONING
    assert _fresh(r).status_reason.endswith(
        "(restart 1 of at most 1 within 1 h), and the time until it runs again is not charged."
    )


def test_with_restarts_turned_off_a_vanished_workload_ends_as_before(settings):
    settings.PROVISIONING_WORKLOAD_RESTARTS = 0
    r, _node, agent, _ = _active_through_agent()

    agent.post(REPORT, {"containers": [_container(r, "created")]}, format="json")

    ended = _fresh(r)
    assert ended.status == S.FAILED
    assert ended.status_reason == (
        "The workload is not running: its container is created; restarts in place are turned "
        "off: the reservation ended and the rest of its time is not charged. It wrote no log."
    )
    assert not ReservationOutage.objects.filter(reservation=r).exists()


def test_a_workload_that_exits_by_itself_after_a_restart_still_ends_the_term_unrefunded():
    r, _node, agent, _ = _active_through_agent(tier="reserved")
    agent.post(REPORT, {"containers": []}, format="json")
    _back_to_active(r, agent)

    agent.post(REPORT, {"containers": [_container(r, "exited", exit_code=0)]}, format="json")

    ended = _fresh(r)
    assert ended.status == S.FAILED
    assert ended.placement_generation == 1
    assert ended.status_reason.startswith("The workload exited with code 0 at an unknown time; ")
    assert "refund_amount" not in ended.cancellation
    assert cancellation_settle(reservation_id=r.pk) is None


def test_a_restart_that_cannot_start_fails_and_its_outage_ends_with_it():
    """The restarted start fails (the workload crashes before it is ready): failed while
    provisioned again, so a reserved term gets its rest back, and the outage ends there."""
    r, _node, agent, _ = _active_through_agent(tier="reserved")
    agent.post(REPORT, {"containers": []}, format="json")
    _provision(r)
    kinds = []
    while (job := agent.post("/api/v1/agent/jobs/lease", {}, format="json")).status_code == 200:
        kinds.append(job.data["kind"])
        if job.data["kind"] == "start":
            agent.post(
                f"/api/v1/agent/jobs/{job.data['id']}/fail",
                {"lease_id": job.data["lease_id"], "error": "exited with code 3"},
                format="json",
            )
        else:
            agent.post(
                f"/api/v1/agent/jobs/{job.data['id']}/complete",
                {"lease_id": job.data["lease_id"], "result": {}},
                format="json",
            )
    assert kinds == ["stop", "prepare", "start"]
    step = reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)
    assert step.outcome == "failed"

    failed = _fresh(r)
    assert failed.status == S.FAILED
    assert reservation_outages_reconcile() == (0, 1)
    outage = ReservationOutage.objects.get(reservation=r)
    assert outage.ended_at == failed.released_at
    credit = cancellation_settle(reservation_id=r.pk)
    assert credit is not None and credit.amount_minor > 0


def test_a_vanish_judged_while_a_stop_job_is_queued_changes_nothing(monkeypatch):
    """A release's stop job commits between the report's judgement and its restart: the
    stop wins; no restart job races it."""
    r, node, agent, _ = _active_through_agent()
    judged = agent_reports._judged

    def stop_meanwhile(*args, **kwargs):
        items = judged(*args, **kwargs)
        agent_job_enqueue(
            reservation_id=r.pk,
            node_id=node.pk,
            kind="stop",
            generation=r.placement_generation,
            payload={"container_name": f"sy-{r.public_id}"},
        )
        return items

    monkeypatch.setattr(agent_reports, "_judged", stop_meanwhile)
    transitions = r.transitions.count()

    assert agent.post(REPORT, {"containers": []}, format="json").status_code == 200

    unchanged = _fresh(r)
    assert (unchanged.status, unchanged.placement_generation) == (S.ACTIVE, 0)
    assert unchanged.transitions.count() == transitions
    assert not ReservationOutage.objects.filter(reservation=r).exists()
    assert not AgentJob.objects.filter(reservation=r, generation=1).exists()


def test_a_customer_stop_that_commits_while_the_report_is_judged_wins(monkeypatch):
    r, _node, agent, _ = _active_through_agent()
    judged = agent_reports._judged

    def stop_meanwhile(*args, **kwargs):
        items = judged(*args, **kwargs)
        reservation_transition(
            reservation=_fresh(r), to_status=S.RELEASING, cause="stopped", actor_label="customer"
        )
        return items

    monkeypatch.setattr(agent_reports, "_judged", stop_meanwhile)

    assert agent.post(REPORT, {"containers": []}, format="json").status_code == 200

    stopped = _fresh(r)
    assert (stopped.status, stopped.placement_generation) == (S.RELEASING, 0)
    assert not ReservationOutage.objects.filter(reservation=r).exists()


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PROVISIONING_WORKLOAD_RESTARTS": "-1"}, "PROVISIONING_WORKLOAD_RESTARTS"),
        ({"PROVISIONING_WORKLOAD_RESTARTS": "three"}, "PROVISIONING_WORKLOAD_RESTARTS"),
        (
            {"PROVISIONING_WORKLOAD_RESTART_WINDOW_SECONDS": "59"},
            "PROVISIONING_WORKLOAD_RESTART_WINDOW_SECONDS",
        ),
    ],
)
def test_a_malformed_restart_setting_stops_start_up(env, variable):
    result = run(SETUP, **env)

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("django.core.exceptions.ImproperlyConfigured: ")
    assert variable in last_line
