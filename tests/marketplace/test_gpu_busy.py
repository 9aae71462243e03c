"""inventory_gpu.busy (migration marketplace 0009) follows every change to live allocations."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.db import connection

from marketplace.models import Allocation
from marketplace.services.reservations import (
    reservation_cancel,
    reservation_create,
    reservation_extend,
)
from marketplace.services.transitions import reservation_transition
from tests.marketplace.api_fixtures import allow_all_funding, market, org  # noqa: F401
from tests.marketplace.market_helpers import tomorrow

pytestmark = pytest.mark.django_db

MISMATCHES = """
SELECT count(*) FROM inventory_gpu g
WHERE g.busy IS DISTINCT FROM coalesce(
    (SELECT range_agg(a.period) FROM marketplace_allocation a WHERE a.gpu_id = g.id AND a.is_live),
    '{}')
"""


def busy_of(reservation) -> set[str]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT DISTINCT g.busy::text FROM inventory_gpu g JOIN marketplace_allocation a "
            "ON a.gpu_id = g.id WHERE a.reservation_id = %s",
            [reservation.pk],
        )
        return {row[0] for row in cur.fetchall()}


def mismatches() -> int:
    with connection.cursor() as cur:
        cur.execute(MISMATCHES)
        return cur.fetchone()[0]


def _reserve(org, start, hours):
    return reservation_create(
        organization=org,
        gpu_model="h100-sxm-80gb",
        gpu_count=8,
        starts_at=start,
        ends_at=start + timedelta(hours=hours),
        tier="on_demand",
        site="abilene-1",
    )


def test_busy_follows_booking_extending_stopping_cancelling_and_deleting(market, org):
    first = _reserve(org, tomorrow(), 2)
    second = _reserve(org, tomorrow(4), 1)  # best fit: the same node, later
    assert len(busy_of(first)) == 1 and mismatches() == 0
    assert Allocation.objects.filter(reservation=second).values("node").distinct().count() == 1

    reservation_extend(reservation=first, new_ends_at=tomorrow(3), actor_label="test")
    assert mismatches() == 0
    (busy,) = busy_of(first)
    assert busy.count("[") == 2  # both bookings of those GPUs, still apart

    reservation_cancel(reservation=second, actor_label="test", reason="")
    assert mismatches() == 0
    (busy,) = busy_of(first)
    assert busy.count("[") == 1

    for step in ("scheduled", "provisioning", "active", "releasing", "completed"):
        first = reservation_transition(
            reservation=first, to_status=step, cause="test", actor_label="t"
        )
    assert busy_of(first) == {"{}"}  # released: the period kept as history is not busy
    assert mismatches() == 0

    third = _reserve(org, tomorrow(10), 1)
    assert busy_of(third) != {"{}"}
    Allocation.objects.filter(reservation=third).delete()
    assert mismatches() == 0
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM inventory_gpu WHERE busy <> '{}'")
        assert cur.fetchone()[0] == 0
