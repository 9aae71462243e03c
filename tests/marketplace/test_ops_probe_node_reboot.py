"""Operator's and customer's probes of restart in place: a node reboots and every container
on it vanishes at once (several reservations of mixed tiers); its agent comes back and
reports an empty list. Each workload runs again on its GPUs, and nobody pays for the time
from the node going silent until their workload is active again."""

from datetime import timedelta

import pytest
from django.utils import timezone

from billing.services.usage import outage_intervals, reservation_delivered_seconds
from config.dates import iso_utc
from inventory.models import Node, NodeStatus, Outage, OutageCause
from inventory.services import node_mark_offline, status_change
from marketplace.models import (
    Allocation,
    Reservation,
    ReservationOutage,
    ReservationStatus,
)
from marketplace.provisioning.drivers import SiteAgentDriver
from marketplace.provisioning.services import (
    WORKLOAD_LOST_CAUSE,
    reservation_outages_reconcile,
    reservation_provision_step,
)
from marketplace.services.curtailment import reservations_preempt_due
from marketplace.services.reservations import reservation_create
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.marketplace.test_agent_report_delivery import (
    REPORT,
    _active_through_agent,
    _heartbeat,
    _provision,
    _run_jobs,
)
from tests.marketplace.test_agent_report_resale_pause import _complete, paused  # noqa: F401
from tests.provisioning_support import agent_client, market_create

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


def _fresh(r) -> Reservation:
    return Reservation.objects.get(pk=r.pk)


def _silent_then_offline(node: Node, *, seconds: int = 95) -> Outage:
    """The node stops heartbeating (it reboots) and the sweeper marks it offline; the
    marketplace mirrors the silence onto the reservations it serves."""
    silent_since = timezone.now() - timedelta(seconds=seconds)
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=silent_since)
    node_mark_offline(node=Node.objects.get(pk=node.pk), reason=f"No heartbeat for {seconds} s.")
    reservation_outages_reconcile()
    return Outage.objects.get(node=node, ended_at=None)


def _covered(r, lo, hi) -> bool:
    """Whether billing's outages of the reservation cover [lo, hi) without a gap."""
    for start, end in outage_intervals(reservation=_fresh(r), until=hi):
        if start <= lo < end:
            lo = end
    return lo >= hi


def test_a_node_that_went_offline_and_rebooted_bills_nothing_until_the_workload_runs_again():
    r, node, agent, _ = _active_through_agent()
    silence = _silent_then_offline(node)
    assert ReservationOutage.objects.filter(reservation=r, ended_at=None).count() == 1

    # Back from the reboot: a heartbeat (the node resumes, its silence outage ends), then the
    # agent's first report lists no container (the reboot took them all).
    _heartbeat(agent)
    silence.refresh_from_db()
    assert silence.ended_at is not None
    assert Node.objects.get(pk=node.pk).status == NodeStatus.AVAILABLE
    assert agent.post(REPORT, {"containers": []}, format="json").status_code == 200
    assert _fresh(r).status == S.PROVISIONING
    reservation_outages_reconcile()  # the sweep closes the node's outage at its end

    _provision(r)
    assert _run_jobs(agent) == ["stop", "prepare", "start"]
    _provision(r)
    back = _fresh(r).transitions.filter(to_status=S.ACTIVE).order_by("at").last().at
    reservation_outages_reconcile()

    # Down from the node's silence until the restarted workload answers: not a second billed.
    # (The test's node fell silent before its activation: down from the activation.)
    down_from = max(silence.started_at, r.activated_at)
    assert _covered(r, down_from, back)
    lost = ReservationOutage.objects.get(reservation=r, cause=WORKLOAD_LOST_CAUSE)
    assert lost.ended_at == back
    assert not ReservationOutage.objects.filter(reservation=r, ended_at=None).exists()
    until = back + timedelta(seconds=60)
    delivered = (down_from - r.activated_at) + (until - back)
    assert reservation_delivered_seconds(reservation=_fresh(r), until=until) in (
        int(delivered.total_seconds()),
        int(delivered.total_seconds()) + 1,  # whole seconds of two pieces
    )


def test_a_vanish_on_a_node_in_maintenance_moves_the_workload_and_bills_no_gap():
    """Staff put the node in maintenance (a hardware fault: an outage on the node) and the
    container vanishes: the restart cannot run there and moves; the time from the report until
    it answers on its new node is down, not only its time on the failed node."""
    r, node, agent, market = _active_through_agent()
    status_change(
        action="set_maintenance", node=node, actor=None, actor_label="staff", reason="PSU fault"
    )
    Outage.objects.create(
        node=node, started_at=timezone.now(), cause=OutageCause.HARDWARE_FAILURE, detail="PSU"
    )
    reservation_outages_reconcile()
    reported_at = timezone.now()
    assert agent.post(REPORT, {"containers": []}, format="json").status_code == 200
    assert _fresh(r).status == S.PROVISIONING

    # The node is out of service: the restart moves to the other node.
    step = reservation_provision_step(reservation_id=r.pk, driver=SiteAgentDriver(), check_window=0)
    assert step.outcome == "retry"
    other = next(n for n in market.nodes if n.pk != node.pk)
    assert set(
        Allocation.objects.filter(reservation=r, is_live=True).values_list("node_id", flat=True)
    ) == {other.pk}
    reservation_outages_reconcile()  # the node's outage ends for it at the move
    other_agent = agent_client(other)
    _provision(r)
    assert _run_jobs(other_agent) == ["prepare", "start"]
    _provision(r)
    assert _fresh(r).status == S.ACTIVE
    back = _fresh(r).transitions.filter(to_status=S.ACTIVE).order_by("at").last().at
    reservation_outages_reconcile()

    assert _covered(r, reported_at, back)
    assert not ReservationOutage.objects.filter(reservation=r, ended_at=None).exists()


def _all_active_on_one_node():
    """An on-demand, a reserved term and an interruptible reservation on one node, each made
    active through the node's agent, which has heartbeated since."""
    market = market_create(nodes=1, gpus=8)
    start = timezone.now()
    on_demand = market.book(gpu_count=2)
    term = reservation_create(
        organization=OrganizationFactory(),
        gpu_model=market.gpu_model.slug,
        gpu_count=2,
        starts_at=start,
        ends_at=start + timedelta(days=7),
        tier="reserved",
        term="1w",
        site=market.site.slug,
    )
    spot = market.book(gpu_count=2, tier="interruptible")
    node = market.nodes[0]
    agent = agent_client(node)
    for r in (on_demand, term, spot):
        _provision(r)
    assert sorted(_run_jobs(agent)) == ["prepare"] * 3 + ["start"] * 3
    for r in (on_demand, term, spot):
        _provision(r)
        assert _fresh(r).status == S.ACTIVE
    _heartbeat(agent)
    return (on_demand, term, spot), node, agent


def test_a_reboot_restarts_every_tier_on_the_node_and_a_due_notice_still_preempts(
    django_capture_on_commit_callbacks,
):
    (on_demand, term, spot), node, agent = _all_active_on_one_node()
    preempt_at = timezone.now() + timedelta(minutes=5)
    Reservation.objects.filter(pk=spot.pk).update(
        preempt_at=preempt_at, preempt_reason="Grid curtailment at the site."
    )
    notices = agent.post(REPORT, {"containers": []}, format="json").data["notices"]

    # Every workload restarts on its own GPUs, each with its own outage, and the restarting
    # interruptible one gets no notice for a container it does not have yet.
    assert notices == []
    for r in (on_demand, term, spot):
        restarting = _fresh(r)
        assert (restarting.status, restarting.placement_generation) == (S.PROVISIONING, 1)
        outage = ReservationOutage.objects.get(reservation=r)
        assert (outage.cause, outage.node_id, outage.ended_at) == (
            WORKLOAD_LOST_CAUSE,
            node.pk,
            None,
        )
    assert "counts as downtime of the term under the SLA" in _fresh(term).status_reason
    assert "is not charged" in _fresh(spot).status_reason

    # The workloads come back; the interruptible one's notice reaches its new container.
    for r in (on_demand, term, spot):
        _provision(r)
    assert sorted(_run_jobs(agent)) == ["prepare"] * 3 + ["start"] * 3 + ["stop"] * 3
    for r in (on_demand, term, spot):
        _provision(r)
        assert _fresh(r).status == S.ACTIVE
    _heartbeat(agent)
    running = [
        {"name": f"sy-{r.public_id}", "reservation": r.public_id, "state": "running"}
        for r in (on_demand, term, spot)
    ]
    notices = agent.post(REPORT, {"containers": running}, format="json").data["notices"]
    assert [(n["reservation"], n["preempt_at"]) for n in notices] == [
        (spot.public_id, iso_utc(preempt_at))
    ]
    reservation_outages_reconcile()
    assert not ReservationOutage.objects.filter(ended_at=None).exists()


def test_an_interruptible_restart_still_running_at_its_notice_is_preempted_and_its_gap_free():
    (_on_demand, _term, spot), _node, agent = _all_active_on_one_node()
    agent.post(REPORT, {"containers": []}, format="json")
    assert _fresh(spot).status == S.PROVISIONING
    Reservation.objects.filter(pk=spot.pk).update(
        preempt_at=timezone.now(), preempt_reason="Grid curtailment at the site."
    )

    assert reservations_preempt_due() == 1

    preempted = _fresh(spot)
    assert preempted.status == S.PREEMPTED
    reservation_outages_reconcile()
    outage = ReservationOutage.objects.get(reservation=spot)
    assert outage.ended_at == preempted.released_at
    ran = (outage.started_at - preempted.activated_at).total_seconds()
    delivered = reservation_delivered_seconds(reservation=preempted, until=preempted.released_at)
    assert delivered in (int(ran), int(ran) + 1)  # whole seconds of the whole and of the gap


def test_a_reboot_restarts_the_buyer_of_a_resold_window_and_leaves_the_paused_seller(
    paused,  # noqa: F811 (the fixture imported above)
):
    """The seller's term is paused (its whole node resold for now, its container stopped);
    the buyer runs on those GPUs. The node reboots: the buyer's workload restarts, the
    seller's term stays active and paused, with no outage and no restart counted."""
    term, agent, stop = paused
    _complete(agent, stop)
    buyer = Reservation.objects.exclude(pk=term.pk).get()
    _provision(buyer)
    assert _run_jobs(agent) == ["prepare", "start"]
    _provision(buyer)
    assert _fresh(buyer).status == S.ACTIVE
    _heartbeat(agent)
    term_before = (_fresh(term).placement_generation, term.transitions.count())

    assert agent.post(REPORT, {"containers": []}, format="json").status_code == 200

    restarting = _fresh(buyer)
    assert (restarting.status, restarting.placement_generation) == (S.PROVISIONING, 1)
    assert ReservationOutage.objects.get(reservation=buyer).cause == WORKLOAD_LOST_CAUSE
    seller = _fresh(term)
    assert seller.status == S.ACTIVE
    assert (seller.placement_generation, seller.transitions.count()) == term_before
    assert not ReservationOutage.objects.filter(reservation=term).exists()
