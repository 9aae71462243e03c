from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from config.errors import InvalidTransition, NotAvailable, ValidationFailed
from inventory.models import MaintenanceWindow, NodeStatus
from marketplace.models import Allocation, Reservation, ReservationStatus
from marketplace.services.reservations import (
    cancellation_terms,
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from marketplace.services.transitions import reservation_transition
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    rng,
    tomorrow,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


@pytest.fixture
def h100():
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    return model


@pytest.fixture
def node(h100):
    (n,) = make_nodes(SiteFactory(), h100, 1)
    return n


def book(h100, *, start, hours=10, tier="on_demand", term="none", gpus=2, days=None):
    return reservation_create(
        organization=OrganizationFactory(),
        gpu_model=h100.slug,
        gpu_count=gpus,
        starts_at=start,
        ends_at=start + (timedelta(days=days) if days else timedelta(hours=hours)),
        tier=tier,
        term=term,
    )


# --- cancellation terms: stated before -----------------------------------------------------


def test_on_demand_before_the_start_states_no_refund_as_nothing_was_charged(h100, node):
    r = book(h100, start=tomorrow())
    t = cancellation_terms(r)
    # Charged only as used: nothing was paid ahead, so nothing comes back and nothing is kept.
    assert (t.action, t.unused_amount, t.refund_fraction, t.refund_amount, t.fee_amount) == (
        "cancel",
        Decimal("0.00"),
        Decimal("1"),
        Decimal("0.00"),
        Decimal("0.00"),
    )
    assert "nothing was charged for time not used" in t.rule


def test_on_demand_after_the_start_states_no_refund_for_the_unused_time(h100, node):
    r = book(h100, start=timezone.now())
    r = reservation_transition(reservation=r, to_status=S.PROVISIONING, cause="", actor_label="t")
    r = reservation_transition(reservation=r, to_status=S.ACTIVE, cause="", actor_label="t")
    t = cancellation_terms(r, at=r.starts_at + timedelta(hours=4))
    assert (t.action, t.unused_amount, t.refund_amount, t.refund_fraction) == (
        "stop",
        Decimal("0.00"),
        Decimal("0.00"),
        Decimal("1"),
    )


def test_an_on_demand_cancel_naming_the_fraction_it_was_shown_goes_through(h100, node):
    r = book(h100, start=tomorrow())
    shown = cancellation_terms(r).refund_fraction

    r = reservation_cancel(reservation=r, actor_label="user:1", expected_refund_fraction=shown)

    assert r.status == S.CANCELLED
    assert (r.cancellation["refund_fraction"], r.cancellation["refund_amount"]) == ("1", "0.00")


@pytest.mark.parametrize(
    "notice,fraction,refund",
    [
        (timedelta(days=8), "1", "319.20"),
        (timedelta(days=7), "1", "319.20"),
        (timedelta(days=6, hours=23), "0.5", "159.60"),
        (timedelta(hours=24), "0.5", "159.60"),
        (timedelta(hours=23), "0", "0.00"),
    ],
)
def test_reserved_refunds_by_notice(h100, node, notice, fraction, refund):
    start = tomorrow() + timedelta(days=9)
    r = book(h100, start=start, tier="reserved", term="1w", days=7, gpus=1)
    assert r.total_amount == Decimal("319.20")  # 168 h × 2.00 × 0.95
    t = cancellation_terms(r, at=start - notice)
    assert (t.refund_fraction, t.refund_amount) == (Decimal(fraction), Decimal(refund))
    assert t.fee_amount == Decimal("319.20") - Decimal(refund)


# --- cancellation: applied after -----------------------------------------------------------


def test_cancelling_ahead_records_the_terms_frees_the_gpus_and_is_final(h100, node):
    r = book(h100, start=tomorrow(), gpus=8)
    stated = cancellation_terms(r)

    r = reservation_cancel(reservation=r, actor_label="user:1", reason="plans changed")

    assert r.status == S.CANCELLED
    assert r.cancellation["refund_amount"] == str(stated.refund_amount) == "0.00"
    assert r.cancellation["reason"] == "plans changed"
    assert Allocation.objects.filter(reservation=r, is_live=True).count() == 0
    book(h100, start=tomorrow(), gpus=8)  # the node is free again
    with pytest.raises(InvalidTransition) as exc:
        reservation_cancel(reservation=r, actor_label="user:1")
    assert "cancelled" in exc.value.message


def test_cancelling_an_active_reservation_stops_it_early(h100, node):
    r = book(h100, start=timezone.now())
    r = reservation_transition(reservation=r, to_status=S.PROVISIONING, cause="", actor_label="t")
    r = reservation_transition(reservation=r, to_status=S.ACTIVE, cause="", actor_label="t")
    r = reservation_cancel(reservation=r, actor_label="user:1")
    assert r.status == S.RELEASING
    assert r.cancellation["action"] == "stop"
    # GPUs stay held until the worker has torn the workload down.
    assert Allocation.objects.filter(reservation=r, is_live=True).count() == 2


@pytest.mark.parametrize("status", [S.RELEASING, S.COMPLETED, S.FAILED])
def test_cancel_is_refused_when_not_allowed_and_nothing_changes(h100, node, status):
    r = book(h100, start=timezone.now())
    path = {
        S.RELEASING: [S.PROVISIONING, S.ACTIVE, S.RELEASING],
        S.COMPLETED: [S.PROVISIONING, S.ACTIVE, S.RELEASING, S.COMPLETED],
        S.FAILED: [S.FAILED],
    }[status]
    for step in path:
        r = reservation_transition(reservation=r, to_status=step, cause="", actor_label="t")
    with pytest.raises(InvalidTransition) as exc:
        reservation_cancel(reservation=r, actor_label="user:1")
    assert exc.value.status_code == 409
    r.refresh_from_db()
    assert (r.status, r.cancellation) == (status, {})


# --- extend --------------------------------------------------------------------------------


def test_extending_keeps_the_gpus_and_the_rate(h100, node):
    start = tomorrow()
    r = book(h100, start=start)
    gpus = set(Allocation.objects.filter(reservation=r).values_list("gpu_id", flat=True))
    make_rate(h100, "9.0000", site=node.site)  # a new list price does not touch the booking

    r = reservation_extend(
        reservation=r, new_ends_at=start + timedelta(hours=12), actor_label="test"
    )

    assert r.ends_at == start + timedelta(hours=12)
    assert r.total_amount == Decimal("48.00")  # 12 h × 2 GPUs × 2.00
    assert r.breakdown["total"] == "48.00"
    assert set(Allocation.objects.filter(reservation=r).values_list("gpu_id", flat=True)) == gpus
    assert {(a.period.lower, a.period.upper) for a in Allocation.objects.filter(reservation=r)} == {
        (start, start + timedelta(hours=12))
    }


def test_extending_into_another_booking_is_refused_with_its_start(h100, node):
    start = tomorrow()
    first = book(h100, start=start, gpus=8)
    later = start + timedelta(hours=11)
    book(h100, start=later, hours=3, gpus=1)  # takes one of first's GPUs from 11 h on

    with pytest.raises(NotAvailable) as exc:
        reservation_extend(
            reservation=first, new_ends_at=start + timedelta(hours=12), actor_label="test"
        )

    assert later.isoformat() in exc.value.message
    first.refresh_from_db()
    assert (first.ends_at, first.total_amount) == (start + timedelta(hours=10), Decimal("160.00"))
    assert {a.period.upper for a in first.allocations.all()} == {start + timedelta(hours=10)}
    # Up to where the other booking starts is fine.
    reservation_extend(reservation=first, new_ends_at=later, actor_label="test")


def test_an_extension_is_in_the_history_and_a_refused_one_is_not(h100, node):
    start = tomorrow()
    r = book(h100, start=start)
    before = list(r.transitions.values_list("cause", flat=True))

    reservation_extend(reservation=r, new_ends_at=start + timedelta(hours=12), actor_label="alice")
    book(h100, start=start + timedelta(hours=13), hours=2, gpus=8)  # the node, from 13 h on
    with pytest.raises(NotAvailable):
        reservation_extend(reservation=r, new_ends_at=start + timedelta(hours=14), actor_label="x")

    history = list(r.transitions.order_by("at", "id"))
    assert [t.cause for t in history[: len(before)]] == before
    (extension,) = history[len(before) :]
    assert (extension.from_status, extension.to_status) == (r.status, r.status)
    assert extension.actor_label == "alice"
    assert extension.cause == (
        f"extended: end {(start + timedelta(hours=10)).isoformat()} → "
        f"{(start + timedelta(hours=12)).isoformat()}, total 48.00 USD"
    )


def test_extending_into_maintenance_is_refused(h100, node):
    start = tomorrow()
    r = book(h100, start=start)
    MaintenanceWindow.objects.create(
        node=node, period=rng(start + timedelta(hours=11), start + timedelta(hours=13)), reason="x"
    )
    with pytest.raises(NotAvailable):
        reservation_extend(
            reservation=r, new_ends_at=start + timedelta(hours=12), actor_label="test"
        )
    r.refresh_from_db()
    assert r.ends_at == start + timedelta(hours=10)


def test_extending_on_a_draining_node_is_refused(h100, node):
    start = tomorrow()
    r = book(h100, start=start)
    type(node).objects.filter(pk=node.pk).update(status=NodeStatus.DRAINING)
    with pytest.raises(NotAvailable):
        reservation_extend(
            reservation=r, new_ends_at=start + timedelta(hours=12), actor_label="test"
        )


def test_extend_refuses_an_earlier_end_and_a_finished_reservation(h100, node):
    start = tomorrow()
    r = book(h100, start=start)
    with pytest.raises(ValidationFailed):
        reservation_extend(
            reservation=r, new_ends_at=start + timedelta(hours=10), actor_label="test"
        )
    with pytest.raises(ValidationFailed):
        reservation_extend(
            reservation=r, new_ends_at=start + timedelta(days=400), actor_label="test"
        )
    r = reservation_cancel(reservation=r, actor_label="t")
    with pytest.raises(InvalidTransition):
        reservation_extend(
            reservation=r, new_ends_at=start + timedelta(hours=12), actor_label="test"
        )
    assert Reservation.objects.get(pk=r.pk).ends_at == start + timedelta(hours=10)
