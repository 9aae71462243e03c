"""Measured energy: a reservation that has run is counted at the power its GPUs reported
(× the site's PUE) over its metered time, at rated power where there was no reading."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from psycopg.types.range import Range

from inventory.models import GpuMinute
from marketplace.models import Allocation, Reservation, ReservationOutage
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.services import reservation_provision_step
from marketplace.selectors.telemetry import reservation_energy
from marketplace.services.energy import energy_measured
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    fresh_rate_limits,
    make_reservation,
    market,
    org,
    owner,
    owner_client,
)

pytestmark = pytest.mark.django_db


def test_measured_arithmetic_and_the_unread_rest_at_rated_power():
    # 2 GPU-hours read at 350 W mean (700 Wh) + 1 GPU-hour unread at 700 W TDP = 1400 Wh.
    energy = energy_measured(
        measured_wh=Decimal(700),
        measured_gpu_seconds=7200,
        metered_gpu_seconds=10800,
        tdp_watts=700,
        pue=Decimal("1.20"),
        renewable_share=Decimal("0.5"),
        grid_carbon_g_per_kwh=400,
    )
    assert (energy.kwh, energy.kg_co2e, energy.basis, energy.measured_share) == (
        Decimal("1.680"),
        Decimal("0.336"),
        "measured",
        Decimal("0.667"),
    )
    nothing_read = energy_measured(
        measured_wh=Decimal(0),
        measured_gpu_seconds=0,
        metered_gpu_seconds=3600,
        tdp_watts=700,
        pue=Decimal("1.20"),
        renewable_share=Decimal("0.5"),
        grid_carbon_g_per_kwh=None,
    )
    assert (nothing_read.kwh, nothing_read.basis, nothing_read.kg_co2e) == (
        Decimal("0.840"),
        "estimated",
        None,
    )
    with pytest.raises(TypeError):
        energy_measured(
            measured_wh=1.5,
            measured_gpu_seconds=60,
            metered_gpu_seconds=60,
            tdp_watts=700,
            pue=Decimal("1.2"),
            renewable_share=Decimal(0),
            grid_carbon_g_per_kwh=None,
        )


@pytest.fixture
def ran(owner_client, market):
    """A 2-GPU reservation active since t0 (a whole minute), allocations from t0."""
    created = make_reservation(
        owner_client, gpu_count=2, starts_at=timezone.now().isoformat(), workload={}
    )
    reservation = Reservation.objects.get(public_id=created["id"])
    reservation_provision_step(reservation_id=reservation.pk, driver=SimulatedDriver())
    t0 = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=30)
    Reservation.objects.filter(pk=reservation.pk).update(starts_at=t0, activated_at=t0)
    Allocation.objects.filter(reservation=reservation).update(
        period=Range(t0, reservation.ends_at, "[)")
    )
    reservation = Reservation.objects.select_related("site", "gpu_model").get(pk=reservation.pk)
    return reservation, t0


def readings(reservation, t0, count, power=360.0):
    for allocation in Allocation.objects.filter(reservation=reservation):
        GpuMinute.objects.bulk_create(
            GpuMinute(gpu_id=allocation.gpu_id, minute=t0 + timedelta(minutes=i), samples=2,
                      power_w_avg=power)
            for i in range(-5, count)  # five minutes before t0: another customer's
        )  # fmt: skip


def test_a_reservation_that_ran_is_counted_at_its_measured_power(owner_client, ran):
    reservation, t0 = ran
    readings(reservation, t0, 10)
    pue = reservation.site.pue
    # 20 GPU-minutes at 360 W = 120 Wh read; 10 more GPU-minutes unread at TDP.
    tdp = reservation.gpu_model.tdp_watts
    energy = reservation_energy(reservation=reservation, now=t0 + timedelta(minutes=15))
    board_wh = Decimal(120) + Decimal(tdp) * 600 / 3600
    assert energy.kwh == (board_wh * pue / 1000).quantize(Decimal("0.001"))
    assert (energy.basis, energy.measured_share) == ("measured", Decimal("0.667"))

    body = owner_client.get(f"/api/v1/reservations/{reservation.public_id}").json()
    assert body["energy"]["basis"] == "measured"
    assert "measured board power" in body["energy"]["method"]


def test_outage_time_is_neither_measured_nor_metered(ran):
    reservation, t0 = ran
    readings(reservation, t0, 10)
    ReservationOutage.objects.create(
        reservation=reservation,
        node=Allocation.objects.filter(reservation=reservation).first().node,
        started_at=t0,
        ended_at=t0 + timedelta(minutes=5),
        cause="gpu_failure",
    )
    energy = reservation_energy(reservation=reservation, now=t0 + timedelta(minutes=10))
    # 5 minutes metered, all read: 2 GPUs × 5 min × 360 W = 60 Wh.
    assert energy.kwh == (Decimal(60) * reservation.site.pue / 1000).quantize(Decimal("0.001"))
    assert energy.measured_share == Decimal("1.000")


def test_before_it_runs_the_booked_period_is_estimated(owner_client, market):
    created = make_reservation(owner_client, gpu_count=2)
    assert created["status"] == "pending"
    body = owner_client.get(f"/api/v1/reservations/{created['id']}").json()
    assert (body["energy"]["basis"], body["energy"]["measured_share"]) == ("estimated", None)


def test_the_portal_page_shows_gpu_use_per_minute_and_the_measured_energy(ran):
    from tests.marketplace.market_helpers import member_client

    reservation, t0 = ran
    now = timezone.now().replace(second=0, microsecond=0)
    for i, allocation in enumerate(Allocation.objects.filter(reservation=reservation)):
        GpuMinute.objects.create(
            gpu_id=allocation.gpu_id,
            minute=now - timedelta(minutes=2),
            samples=2,
            utilization_pct_avg=90.0 + 10 * i,
            memory_used_mib_max=1000,
            power_w_avg=300.0,
            temperature_c_max=60 + i,
        )
    page = member_client(reservation.organization, "member").get(
        f"/reservations/{reservation.public_id}"
    )
    html = page.content.decode()
    minute = (now - timedelta(minutes=2)).strftime("%H:%M")
    assert (
        f'<tr><td>{minute}</td><td>2</td><td class="num">95.0 %</td>'
        '<td class="num">2000 MiB</td><td class="num">600 W</td><td class="num">61 °C</td></tr>'
    ) in html
    assert "Energy (measured)" in html


def test_the_portal_page_charts_gpu_use_beside_its_table(ran):
    """The same minutes as the table, oldest first: mean utilisation and total power."""
    import json

    from tests.marketplace.market_helpers import member_client

    reservation, _ = ran
    now = timezone.now().replace(second=0, microsecond=0)
    for minutes_ago, util in ((3, 40.0), (2, 80.0)):
        for allocation in Allocation.objects.filter(reservation=reservation):
            GpuMinute.objects.create(
                gpu_id=allocation.gpu_id, minute=now - timedelta(minutes=minutes_ago),
                samples=2, utilization_pct_avg=util, memory_used_mib_max=1000,
                power_w_avg=250.0, temperature_c_max=60,
            )  # fmt: skip

    html = (
        member_client(reservation.organization, "member")
        .get(f"/reservations/{reservation.public_id}")
        .content.decode()
    )

    chart = json.loads(
        html.split('<script id="gpu-chart" type="application/json">')[1].split("</script>")[0]
    )["use"]
    first, second = ((now - timedelta(minutes=m)).strftime("%H:%M") for m in (3, 2))
    assert chart["labels"] == [first, second]
    assert chart["datasets"][0]["data"] == [40.0, 80.0]
    assert chart["datasets"][1]["data"] == [500, 500]  # 2 GPUs × 250 W
    assert 'aria-describedby="gpu-use"' in html
