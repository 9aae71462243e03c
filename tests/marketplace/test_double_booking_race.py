"""Many clients race for the last free GPUs on real PostgreSQL: the database decides."""

import threading
from collections import Counter

import pytest
from django.db import connection, connections

from config.errors import NotAvailable
from marketplace.models import Allocation, Reservation
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("allow_all_funding")]

CLIENTS = 24

OVERLAPS_SQL = """
SELECT count(*) FROM marketplace_allocation a JOIN marketplace_allocation b
  ON a.gpu_id = b.gpu_id AND a.id < b.id AND a.period && b.period
WHERE a.is_live AND b.is_live
"""


def race(*, gpu_model: str, gpu_count: int, starts_at, ends_at, **booking) -> Counter:
    orgs = [OrganizationFactory() for _ in range(CLIENTS)]
    barrier = threading.Barrier(CLIENTS)
    outcomes: list[str] = []
    lock = threading.Lock()

    def client(org):
        try:
            barrier.wait()
            reservation_create(
                organization=org,
                gpu_model=gpu_model,
                gpu_count=gpu_count,
                starts_at=starts_at,
                ends_at=ends_at,
                tier="on_demand",
                **booking,
            )
            result = "ok"
        except NotAvailable:
            result = "not_available"
        except Exception as exc:  # noqa: BLE001 - any other outcome is a failure to report
            result = f"error: {exc!r}"
        finally:
            connections.close_all()  # each thread has its own connection; close it
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=client, args=(org,)) for org in orgs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return Counter(outcomes)


def overlapping_live_pairs() -> int:
    with connection.cursor() as cur:
        cur.execute(OVERLAPS_SQL)
        return cur.fetchone()[0]


def test_exactly_as_many_clients_win_as_there_are_free_gpus():
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    site = SiteFactory()
    make_nodes(site, model, 2, gpus=4)
    starts_at, ends_at = tomorrow(), tomorrow(6)
    # One node is fully booked already, one GPU on the other too: 3 GPUs are left.
    reservation_create(
        organization=OrganizationFactory(),
        gpu_model=model.slug,
        gpu_count=4,
        starts_at=starts_at,
        ends_at=ends_at,
        tier="on_demand",
    )
    reservation_create(
        organization=OrganizationFactory(),
        gpu_model=model.slug,
        gpu_count=1,
        starts_at=starts_at,
        ends_at=ends_at,
        tier="on_demand",
    )

    outcomes = race(gpu_model=model.slug, gpu_count=1, starts_at=starts_at, ends_at=ends_at)

    assert outcomes == Counter({"ok": 3, "not_available": CLIENTS - 3})
    assert Reservation.objects.count() == 2 + 3
    assert Allocation.objects.filter(is_live=True).count() == 8
    assert overlapping_live_pairs() == 0


def test_multi_gpu_requests_win_capacity_divided_by_size():
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    make_nodes(SiteFactory(), model, 3, gpus=8)  # 24 GPUs, 2-GPU requests: 12 winners
    starts_at, ends_at = tomorrow(), tomorrow(6)

    outcomes = race(gpu_model=model.slug, gpu_count=2, starts_at=starts_at, ends_at=ends_at)

    assert outcomes["ok"] == 12
    assert outcomes["not_available"] == CLIENTS - 12
    assert Allocation.objects.filter(is_live=True).count() == 24
    assert overlapping_live_pairs() == 0


def test_racing_bookings_with_a_reliability_floor_never_spill_onto_a_less_reliable_node():
    from decimal import Decimal

    from inventory.models import Node

    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    site = SiteFactory()
    reliable, flaky = make_nodes(site, model, 2, gpus=4)
    Node.objects.filter(pk=reliable.pk).update(reliability_30d=Decimal("0.9990"))
    Node.objects.filter(pk=flaky.pk).update(reliability_30d=Decimal("0.9000"))

    outcomes = race(
        gpu_model=model.slug, gpu_count=1, starts_at=tomorrow(), ends_at=tomorrow(6),
        min_reliability=Decimal("0.99"),
    )  # fmt: skip

    assert outcomes == Counter({"ok": 4, "not_available": CLIENTS - 4})
    assert set(Allocation.objects.values_list("node_id", flat=True)) == {reliable.pk}
    assert Reservation.objects.count() == 4
    assert overlapping_live_pairs() == 0
