"""Usage by the second from delivered time only: no provisioning, outage or preempted time."""

from datetime import timedelta
from decimal import Decimal

import pytest

from billing.models import LedgerEntry, LedgerKind
from billing.selectors import balance_minor
from billing.services.usage import reservation_delivered_seconds, reservation_meter
from inventory.models import Outage, OutageCause
from marketplace.models import ReservationStatus, Tier
from tests.billing.conftest import T0, make_reservation

pytestmark = pytest.mark.django_db


def usage(reservation):
    return list(
        LedgerEntry.objects.filter(reservation=reservation, kind=LedgerKind.USAGE)
        .order_by("id")
        .values_list("amount_minor", "gpu_seconds")
    )


def test_it_charges_by_the_second_from_activation_not_from_the_start(org):
    # Booked from T0, provisioning took 7 min 13 s: that time is not charged.
    activated = T0 + timedelta(minutes=7, seconds=13)
    reservation = make_reservation(
        org, gpu_count=2, price=Decimal("3.6000"), activated_at=activated
    )

    reservation_meter(reservation_id=reservation.pk, now=activated + timedelta(seconds=1001))

    # 2 GPUs × 1001 s × 3.60/3600 = 2.002 → 2.00
    assert usage(reservation) == [(-200, 2002)]
    entry = LedgerEntry.objects.get(reservation=reservation)
    assert (entry.period_start, entry.period_end) == (
        activated,
        activated + timedelta(seconds=1001),
    )


def test_metering_again_charges_only_the_new_time_and_rounding_does_not_drift(org):
    reservation = make_reservation(org, gpu_count=1, price=Decimal("1.0000"), activated_at=T0)

    for seconds in (10, 20, 30, 30, 3600):
        reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(seconds=seconds))

    # Cumulative: 10 s → 0.00, 20 s → 0.01 (0.0056), 30 s → 0.01, 3600 s → 1.00
    assert usage(reservation) == [(0, 10), (-1, 10), (0, 10), (-99, 3570)]
    assert balance_minor(organization=org) == -100


def test_it_excludes_outages_on_the_reservations_nodes(org):
    reservation = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0)
    node = reservation.allocations.first().node
    Outage.objects.create(node=node, started_at=T0 + timedelta(minutes=10),
                          ended_at=T0 + timedelta(minutes=25), cause=OutageCause.HARDWARE_FAILURE)  # fmt: skip
    Outage.objects.create(node=node, started_at=T0 + timedelta(minutes=50),
                          cause=OutageCause.HEARTBEAT_MISSED)  # still open  # fmt: skip

    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))

    # 60 min − 15 min − 10 min (open outage up to now) = 35 min = 2100 s → 2.10
    assert usage(reservation) == [(-210, 2100)]


def test_an_outage_recorded_after_the_time_was_metered_gives_the_money_back(org):
    reservation = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0)
    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))
    Outage.objects.create(node=reservation.allocations.first().node, started_at=T0,
                          ended_at=T0 + timedelta(minutes=30), cause=OutageCause.GPU_FAILURE)  # fmt: skip

    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1, seconds=1))

    assert usage(reservation) == [(-360, 3600), (180, -1799)]
    assert balance_minor(organization=org) == -180  # 1801 s at 3.60/h = 1.801


def test_it_stops_at_release_and_charges_nothing_after_preemption(org):
    released = T0 + timedelta(minutes=30)
    reservation = make_reservation(
        org, tier=Tier.INTERRUPTIBLE, gpu_count=4, price=Decimal("0.9000"),
        status=ReservationStatus.PREEMPTED, activated_at=T0, released_at=released,
    )  # fmt: skip

    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=5))
    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=6))

    assert usage(reservation) == [(-180, 4 * 1800)]


def test_it_charges_nothing_for_a_reservation_that_never_became_active(org):
    reservation = make_reservation(org, status=ReservationStatus.FAILED, activated_at=None)

    assert reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=2)) is None
    assert (
        reservation_delivered_seconds(reservation=reservation, until=T0 + timedelta(hours=2)) == 0
    )
    assert not LedgerEntry.objects.exists()


def test_it_never_charges_past_the_booked_end(org):
    reservation = make_reservation(
        org, gpu_count=1, price=Decimal("1.0000"), hours=2, activated_at=T0
    )

    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=9))

    assert usage(reservation) == [(-200, 7200)]


def test_a_reserved_term_is_charged_once_up_front_and_not_by_the_second(org):
    reservation = make_reservation(
        org, tier=Tier.RESERVED, gpu_count=8, price=Decimal("1.5000"), hours=168,
        activated_at=T0, total=Decimal("2016.00"),
    )  # fmt: skip

    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))
    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=2))

    entries = list(LedgerEntry.objects.values_list("kind", "amount_minor"))
    assert entries == [(LedgerKind.RESERVED_CHARGE, -201600)]


def test_it_excludes_the_reservations_own_outages_once_even_when_the_node_outage_overlaps(org):
    from marketplace.models import ReservationOutage

    reservation = make_reservation(org, gpu_count=1, price=Decimal("3.6000"), activated_at=T0)
    node = reservation.allocations.first().node
    # Provisioning recorded 10:10–10:30 on the reservation; inventory has 10:20–10:40 on the node.
    ReservationOutage.objects.create(reservation=reservation, node=node, cause="gpu_failure",
                                     started_at=T0 + timedelta(minutes=10),
                                     ended_at=T0 + timedelta(minutes=30))  # fmt: skip
    Outage.objects.create(node=node, started_at=T0 + timedelta(minutes=20),
                          ended_at=T0 + timedelta(minutes=40), cause=OutageCause.HARDWARE_FAILURE)  # fmt: skip

    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))

    # 60 min − the union 10:10–10:40 (30 min) = 1800 s → 1.80
    assert usage(reservation) == [(-180, 1800)]
    assert (
        reservation_delivered_seconds(reservation=reservation, until=T0 + timedelta(hours=1))
        == 1800
    )
