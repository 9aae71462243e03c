"""GET reservations/{id}/telemetry: per GPU and minute, only while the GPU was the reservation's."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.utils import timezone

from inventory.models import GpuMinute
from marketplace.models import Allocation, Reservation
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    fresh_rate_limits,
    key_client,
    make_reservation,
    market,
    org,
    other_org,
    owner,
    owner_client,
)

pytestmark = pytest.mark.django_db


def iso(dt) -> str:
    return dt.isoformat().replace("+00:00", "Z")


@pytest.fixture
def reservation(owner_client, market):
    created = make_reservation(owner_client, gpu_count=2)
    return Reservation.objects.get(public_id=created["id"])


def minutes(gpu_id, start, count, *, util=90.0, power=600.0):
    GpuMinute.objects.bulk_create(
        GpuMinute(
            gpu_id=gpu_id,
            minute=start + timedelta(minutes=i),
            samples=2,
            temperature_c_max=60 + i,
            power_w_avg=power + i,
            utilization_pct_avg=util,
            memory_used_mib_max=70000 + i,
        )
        for i in range(count)
    )


def test_it_lists_each_gpus_minutes_inside_its_allocation_only(owner_client, reservation):
    allocations = list(Allocation.objects.filter(reservation=reservation).order_by("gpu__index"))
    start = reservation.starts_at
    # Two minutes before the reservation (another customer's), three inside it.
    for allocation in allocations:
        minutes(allocation.gpu_id, start - timedelta(minutes=2), 5)
    url = f"/api/v1/reservations/{reservation.public_id}/telemetry"

    body = owner_client.get(
        url, {"since": iso(start - timedelta(hours=1)), "until": iso(start + timedelta(hours=1))}
    ).json()

    assert body["reservation"] == reservation.public_id
    assert body["resolution_seconds"] == 60
    assert [(g["node"], g["index"]) for g in body["gpus"]] == [
        (a.node.hostname, a.gpu.index) for a in allocations
    ]
    points = body["gpus"][0]["points"]
    assert [p["t"] for p in points] == [iso(start + timedelta(minutes=i)) for i in range(3)]
    assert points[0] == {
        "t": iso(start),
        "utilization_pct": 90.0,
        "memory_used_mib": 70002,
        "power_w": 602.0,
        "temperature_c": 62,
    }


def test_the_window_is_checked(owner_client, reservation):
    url = f"/api/v1/reservations/{reservation.public_id}/telemetry"
    now = timezone.now()
    assert_error(
        owner_client.get(url, {"since": iso(now), "until": iso(now - timedelta(hours=1))}),
        400,
        field="since",
    )
    assert_error(
        owner_client.get(url, {"since": iso(now - timedelta(days=8)), "until": iso(now)}),
        400,
        field="since",
    )
    assert_error(owner_client.get(url, {"since": "yesterday"}), 400, field="since")


def test_another_organisation_gets_404(reservation, other_org):
    url = f"/api/v1/reservations/{reservation.public_id}/telemetry"
    assert_error(key_client(other_org).get(url), 404)


def test_a_reservation_without_readings_has_empty_series(owner_client, reservation):
    url = f"/api/v1/reservations/{reservation.public_id}/telemetry"
    start = reservation.starts_at
    body = owner_client.get(
        url, {"since": iso(start), "until": iso(start + timedelta(hours=1))}
    ).json()
    assert [g["points"] for g in body["gpus"]] == [[], []]


def test_a_seller_never_sees_the_minutes_of_time_it_sold():
    """The seller's allocation of a sold window is kept as the sale's record; the minutes in
    it are the buyer's (telemetry and measured energy)."""
    from marketplace.selectors.telemetry import reservation_telemetry
    from tests.marketplace.resale_helpers import buy, listing, market, time_passes_until

    m = market()
    sold = buy(m, listing(m, gpus=2, start_h=24, hours=2), hours=2)
    time_passes_until(m.start + 27 * timedelta(hours=1))
    m.term.refresh_from_db()
    sold.refresh_from_db()
    window_start = m.start + 24 * timedelta(hours=1)
    for gpu_id in Allocation.objects.filter(reservation=sold).values_list("gpu_id", flat=True):
        minutes(gpu_id, window_start, 10)

    def points(reservation):
        series = reservation_telemetry(
            reservation=reservation, since=window_start, until=window_start + timedelta(hours=1)
        )
        return sum(len(s.points) for s in series)

    assert points(sold) == 20
    assert points(m.term) == 0
