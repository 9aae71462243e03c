"""The reservation detail's connection details (only while active) and outages, via the API."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import Allocation, Reservation, ReservationOutage
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.services import reservation_provision_step
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    fresh_rate_limits,
    make_reservation,
    market,
    org,
    owner,
    owner_client,
)
from tests.provisioning_support import ssh_key

pytestmark = pytest.mark.django_db


def _start_now() -> str:
    return timezone.now().isoformat().replace("+00:00", "Z")


def test_the_connection_appears_once_active_and_goes_when_released(owner_client, market):
    created = make_reservation(
        owner_client,
        starts_at=_start_now(),
        gpu_count=2,
        workload={"ports": [8888, 6006], "ssh_public_keys": [ssh_key()]},
    )
    url = f"/api/v1/reservations/{created['id']}"
    assert created["status"] == "scheduled" and created["connection"] is None
    reservation = Reservation.objects.get(public_id=created["id"])

    reservation_provision_step(reservation_id=reservation.pk, driver=SimulatedDriver())
    active = owner_client.get(url).json()
    host = f"{Allocation.objects.filter(reservation=reservation).first().node.hostname}"
    host += ".sim.switchyard.test"
    stopped = owner_client.post(f"{url}/cancel", {}, format="json").json()

    assert active["status"] == "active"
    assert active["connection"] == {
        "host": host,
        "ssh_port": 22,
        "ports": {"8888": 8888, "6006": 6006},
        "simulated": True,  # the simulated driver: nothing runs there
        "nodes": [
            {
                "host": host,
                "ssh_port": 22,
                "ports": {"8888": 8888, "6006": 6006},
                "gpu_indexes": [0, 1],
            }
        ],
    }
    # Releasing: the workload is being stopped, so it is no longer offered to connect to.
    assert stopped["status"] == "releasing"
    assert stopped["connection"] is None
    assert Reservation.objects.get(pk=reservation.pk).connection["host"] == host  # still recorded


def test_a_reservation_not_yet_active_shows_no_connection_even_if_one_is_recorded(
    owner_client, market
):
    created = make_reservation(owner_client, starts_at=_start_now())
    Reservation.objects.filter(public_id=created["id"]).update(
        connection={"host": "n1.example", "ssh_port": 22, "ports": {}}
    )

    body = owner_client.get(f"/api/v1/reservations/{created['id']}").json()

    assert body["status"] == "scheduled"
    assert body["connection"] is None


def test_the_detail_lists_the_reservations_outages_oldest_first(owner_client, market):
    created = make_reservation(owner_client, starts_at=_start_now())
    reservation = Reservation.objects.get(public_id=created["id"])
    reservation_provision_step(reservation_id=reservation.pk, driver=SimulatedDriver())
    node = Allocation.objects.filter(reservation=reservation).first().node
    t0 = timezone.now().replace(microsecond=0) - timedelta(hours=1)
    ReservationOutage.objects.create(
        reservation=reservation,
        node=node,
        started_at=t0 + timedelta(minutes=30),
        cause="missed_heartbeats",
    )
    ReservationOutage.objects.create(
        reservation=reservation,
        node=node,
        started_at=t0,
        ended_at=t0 + timedelta(minutes=5),
        cause="node_failure",
        detail="internal detail",
    )

    body = owner_client.get(f"/api/v1/reservations/{created['id']}").json()

    def iso(dt):
        return dt.isoformat().replace("+00:00", "Z")

    assert body["outages"] == [
        {
            "started_at": iso(t0),
            "ended_at": iso(t0 + timedelta(minutes=5)),
            "cause": "node_failure",
        },
        {
            "started_at": iso(t0 + timedelta(minutes=30)),
            "ended_at": None,
            "cause": "missed_heartbeats",
        },
    ]


def test_a_reservation_without_outages_lists_none(owner_client, market):
    created = make_reservation(owner_client)

    assert created["outages"] == []
    assert owner_client.get(f"/api/v1/reservations/{created['id']}").json()["outages"] == []
