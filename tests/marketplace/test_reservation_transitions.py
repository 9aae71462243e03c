from datetime import timedelta

import pytest
from django.utils import timezone

from config.errors import InvalidTransition
from marketplace.models import Allocation, ReservationStatus, ReservationTransition
from marketplace.services.reservations import reservation_create
from marketplace.services.transitions import (
    ALLOWED_TRANSITIONS,
    reservation_allowed_actions,
    reservation_transition,
)
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus

# The path from creation (scheduled) to each status, through allowed steps only.
PATHS = {
    S.PENDING: [],
    S.SCHEDULED: [],
    S.PROVISIONING: [S.PROVISIONING],
    S.ACTIVE: [S.PROVISIONING, S.ACTIVE],
    S.RELEASING: [S.PROVISIONING, S.ACTIVE, S.RELEASING],
    S.COMPLETED: [S.PROVISIONING, S.ACTIVE, S.RELEASING, S.COMPLETED],
    S.CANCELLED: [S.CANCELLED],
    S.FAILED: [S.FAILED],
    S.PREEMPTED: [S.PROVISIONING, S.ACTIVE, S.PREEMPTED],
}


@pytest.fixture
def make_reservation():
    model = GpuModelFactory()
    make_rate(model, "2.2000")
    make_policy()
    site = SiteFactory()
    make_nodes(site, model, 4)

    def make(status=S.SCHEDULED, tier="interruptible", ahead=False):
        now = timezone.now()
        start = now + timedelta(days=1) if ahead or status == S.PENDING else now
        r = reservation_create(
            organization=OrganizationFactory(),
            gpu_model=model.slug,
            gpu_count=2,
            starts_at=start,
            ends_at=start + timedelta(hours=5),
            tier=tier,
        )
        for step in PATHS.get(status, []):
            r = reservation_transition(reservation=r, to_status=step, cause="test", actor_label="t")
        return r

    return make


ALL_PAIRS = [(a, b) for a in S.values for b in S.values]
REFUSED = [(a, b) for a, b in ALL_PAIRS if b not in ALLOWED_TRANSITIONS[a]]
ALLOWED = [(a, b) for a, b in ALL_PAIRS if b in ALLOWED_TRANSITIONS[a]]


@pytest.mark.parametrize("from_status,to_status", REFUSED)
def test_it_refuses_every_transition_not_in_the_table_and_changes_nothing(
    make_reservation, from_status, to_status
):
    r = make_reservation(from_status)
    before_transitions = ReservationTransition.objects.filter(reservation=r).count()
    before_allocations = sorted(
        Allocation.objects.filter(reservation=r).values_list("gpu_id", "period", "is_live")
    )

    with pytest.raises(InvalidTransition) as exc:
        reservation_transition(reservation=r, to_status=to_status, cause="x", actor_label="t")

    assert f"from {from_status} to {to_status}" in exc.value.message
    r.refresh_from_db()
    assert r.status == from_status
    assert ReservationTransition.objects.filter(reservation=r).count() == before_transitions
    assert (
        sorted(Allocation.objects.filter(reservation=r).values_list("gpu_id", "period", "is_live"))
        == before_allocations
    )


@pytest.mark.parametrize("from_status,to_status", ALLOWED)
def test_it_takes_every_allowed_transition_and_records_it(make_reservation, from_status, to_status):
    r = make_reservation(from_status)
    updated = reservation_transition(
        reservation=r, to_status=to_status, cause="because", actor_label="worker"
    )
    assert updated.status == to_status and updated.status_reason == "because"
    last = ReservationTransition.objects.filter(reservation=r).last()
    assert (last.from_status, last.to_status, last.cause, last.actor_label) == (
        from_status,
        to_status,
        "because",
        "worker",
    )
    live = Allocation.objects.filter(reservation=r, is_live=True).count()
    assert live == (2 if to_status in {S.SCHEDULED, S.PROVISIONING, S.ACTIVE, S.RELEASING} else 0)


def test_pending_goes_to_scheduled_cancelled_failed_or_preempted_only(make_reservation):
    # preempted: an interruptible reservation booked ahead whose site is curtailed meanwhile.
    assert ALLOWED_TRANSITIONS[S.PENDING] == {S.SCHEDULED, S.CANCELLED, S.FAILED, S.PREEMPTED}
    r = make_reservation(ahead=True)
    assert r.status == S.PENDING
    with pytest.raises(InvalidTransition):
        reservation_transition(reservation=r, to_status=S.ACTIVE, cause="x", actor_label="t")
    r = reservation_transition(reservation=r, to_status=S.SCHEDULED, cause="due", actor_label="t")
    assert r.status == S.SCHEDULED


def test_only_interruptible_reservations_can_be_preempted(make_reservation):
    r = make_reservation(S.ACTIVE, tier="on_demand")
    with pytest.raises(InvalidTransition) as exc:
        reservation_transition(reservation=r, to_status=S.PREEMPTED, cause="grid", actor_label="t")
    assert exc.value.code == "not_preemptible"
    r.refresh_from_db()
    assert r.status == S.ACTIVE


def test_activation_and_release_times_are_set_and_early_end_truncates_allocations(
    make_reservation,
):
    r = make_reservation(S.ACTIVE)
    assert r.activated_at is not None and r.released_at is None
    booked_end = r.ends_at

    r = reservation_transition(reservation=r, to_status=S.FAILED, cause="node", actor_label="t")

    assert r.released_at is not None
    for a in Allocation.objects.filter(reservation=r):
        assert not a.is_live
        assert a.period.lower == r.starts_at
        assert a.period.upper == r.released_at < booked_end


def test_cancelling_before_the_start_keeps_the_booked_period_on_record(make_reservation):
    r = make_reservation(ahead=True)
    r = reservation_transition(reservation=r, to_status=S.CANCELLED, cause="x", actor_label="t")
    assert {(a.period.lower, a.period.upper, a.is_live) for a in r.allocations.all()} == {
        (r.starts_at, r.ends_at, False)
    }


@pytest.mark.parametrize(
    "status,actions",
    [
        (S.PENDING, ["cancel", "extend"]),
        (S.SCHEDULED, ["cancel", "extend"]),
        (S.PROVISIONING, ["cancel", "extend"]),
        (S.ACTIVE, ["cancel", "extend"]),
        (S.RELEASING, []),
        (S.COMPLETED, []),
        (S.CANCELLED, []),
        (S.FAILED, []),
        (S.PREEMPTED, []),
    ],
)
def test_allowed_actions_follow_the_status(make_reservation, status, actions):
    assert reservation_allowed_actions(make_reservation(status)) == actions


def test_an_unknown_status_is_refused(make_reservation):
    r = make_reservation()
    with pytest.raises(InvalidTransition):
        reservation_transition(reservation=r, to_status="paused", cause="x", actor_label="t")
