"""The staff dashboard's figures, the GPU catalogue before any search, and a site's free GPUs
over the next 14 days (issue 16, items 3 to 5), without a browser."""

import json
import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from billing.models import LedgerEntry, LedgerKind, UsageAccrual
from inventory.models import FleetMinute
from inventory.services import status_change
from marketplace.models import (
    ProvisioningAttempt,
    Reservation,
    ReservationOutage,
    ReservationStatus,
    Role,
)
from marketplace.portal.forms import PLANS
from marketplace.services.reservations import reservation_create
from tests.clients import HttpsClient
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory, UserFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    member_client,
    tomorrow,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet():
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="mo-i-rana", name="Mo i Rana", status="active")
    a, b = make_nodes(site, h100, 2, gpus=8)
    make_rate(h100, "2.0000")
    return site, h100, a, b


@pytest.fixture
def staff_client():
    client = HttpsClient()
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


def test_the_dashboard_is_for_staff_only(fleet):
    assert HttpsClient().get("/staff/").status_code == 302
    org = OrganizationFactory()
    response = member_client(org, Role.OWNER).get("/staff/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_dashboard_shows_the_fleet_its_use_money_and_risks(
    fleet,
    staff_client,
    allow_all_funding,  # noqa: F811
):
    site, h100, a, b = fleet
    org = OrganizationFactory(name="Fjord Labs")
    now = timezone.now()
    # 2 GPUs from now for two days, then 8 tomorrow: the whole other node.
    running = reservation_create(
        organization=org, gpu_model=h100.slug, gpu_count=2, starts_at=now,
        ends_at=now + timedelta(days=2), tier="interruptible", site=site.slug,
    )  # fmt: skip
    Reservation.objects.filter(pk=running.pk).update(status=ReservationStatus.ACTIVE)
    busy_node = running.allocations.first().node
    other = b if busy_node == a else a
    booked = reservation_create(
        organization=org, gpu_model=h100.slug, gpu_count=8, starts_at=tomorrow(),
        ends_at=tomorrow(2), tier="on_demand", site=site.slug,
    )  # fmt: skip
    assert booked.allocations.first().node == other
    status_change(action="drain", node=other, actor=None, actor_label="test", reason="fans")
    for kind, amount, key in (
        (LedgerKind.USAGE, -1_000, "u1"),
        (LedgerKind.TOP_UP, 123_456, "t1"),
        (LedgerKind.REFUND, -500, "r1"),
    ):
        LedgerEntry.objects.create(
            organization=org, kind=kind, amount_minor=amount, currency="usd",
            description="test", idempotency_key=key,
        )  # fmt: skip
    ProvisioningAttempt.objects.create(
        reservation=booked, kind="provision", number=1, outcome="error",
        error="image pull failed: not found", started_at=now - timedelta(hours=1),
    )  # fmt: skip

    response = staff_client.get("/staff/")

    html = response.content.decode()
    assert response.status_code == 200
    fleet_row = html.split('id="fleet-table"')[1].split("</tbody>")[0]
    # in use 2, idle 6 on the busy node; the drained node's 8 are out of service
    assert (
        '<td class="num">2</td><td class="num">6</td><td class="num">8</td><td class="num">0</td>'
    ) in fleet_row
    assert "2 in use, 6 idle, 8 on nodes out of service; 0 failed." in html
    risks = html.split('id="out-of-service"')[1].split("</table>")[0]
    assert other.hostname in risks and booked.public_id in risks and "Fjord Labs" in risks
    assert "image pull failed: not found" in html
    assert "Provisioning failures, last 7 days: 1" in html
    exposure = html.split('id="exposure-table"')[1].split("</table>")[0]
    assert "<td>Mo i Rana</td>" in exposure and '<td class="num">48</td>' in exposure  # 2 × 24 h
    money = html.split('id="money-table"')[1].split("</table>")[0]
    assert "10.00 USD" in money and "1,234.56 USD" in money and "5.00 USD" in money
    charts = json.loads(
        html.split('<script id="staff-charts" type="application/json">')[1].split("</script>")[0]
    )
    assert charts["statuses"]["labels"][:4] == ["Pending", "Scheduled", "Starting", "Running"]
    assert charts["statuses"]["datasets"][0]["data"][0] == 1  # the booked one
    assert charts["statuses"]["datasets"][0]["data"][3] == 1  # the running one
    assert len(charts["utilisation"]["labels"]) == 30


def test_utilisation_is_the_metered_time_and_the_telemetry_not_the_booked_time(
    fleet,
    staff_client,
    allow_all_funding,  # noqa: F811
):
    from config.staff import utilisation_by_day

    site, h100, a, _b = fleet
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    now = today + timedelta(hours=12)
    yesterday = today - timedelta(days=1)
    org = OrganizationFactory()

    def booked(gpus, tier="on_demand", **fields):
        start = timezone.now()
        r = reservation_create(
            organization=org, gpu_model=h100.slug, gpu_count=gpus, starts_at=start,
            ends_at=start + timedelta(days=40), tier=tier,
            term="1m" if tier == "reserved" else "none", site=site.slug,
        )  # fmt: skip
        Reservation.objects.filter(pk=r.pk).update(**fields)
        return r

    # On demand: what its usage lines metered, spread over their intervals (1 h across
    # midnight: half each day), whatever its own times say.
    metered = booked(2, status=ReservationStatus.ACTIVE, starts_at=yesterday,
                     activated_at=yesterday)  # fmt: skip
    LedgerEntry.objects.create(
        organization=org, kind=LedgerKind.USAGE, amount_minor=-400, currency="usd",
        reservation=metered, gpu_seconds=7200, description="usage", idempotency_key="u1",
        period_start=today - timedelta(minutes=30), period_end=today + timedelta(minutes=30),
    )  # fmt: skip
    # Accrued since and not booked to the ledger yet (it books hourly): 1,800 GPU-s up to
    # the last metering run, then 6 minutes of 2 GPUs while its clock runs.
    UsageAccrual.objects.create(
        reservation=metered, organization=org, currency="usd", price_per_gpu_hour="2.0000",
        gpu_seconds=7200 + 1800, booked_gpu_seconds=7200, accrued_minor=500, booked_minor=400,
        booked_until=today + timedelta(minutes=30), accrued_until=now - timedelta(minutes=6),
        running=True, gpu_count=2,
    )  # fmt: skip
    # A reserved term (charged whole, not metered): its active time less its outage, 4 GPUs.
    term = booked(4, tier="reserved", status=ReservationStatus.ACTIVE,
                  starts_at=now - timedelta(hours=3), activated_at=now - timedelta(hours=2))  # fmt: skip
    ReservationOutage.objects.create(
        reservation=term, node=a, started_at=now - timedelta(hours=1),
        ended_at=now - timedelta(minutes=30), cause="hardware_failure",
    )  # fmt: skip
    # Booked from yesterday but never started: nothing delivered, nothing counted.
    booked(8, status=ReservationStatus.PROVISIONING, starts_at=yesterday)
    # Telemetry: two minutes today of the GPUs that reported.
    FleetMinute.objects.bulk_create(
        [
            FleetMinute(minute=today + timedelta(hours=1), gpus=16, utilization_gpus=16,
                        utilization_pct_sum=16 * 40.0, power_w_sum=5000),
            FleetMinute(minute=today + timedelta(hours=2), gpus=16, utilization_gpus=8,
                        utilization_pct_sum=8 * 70.0, power_w_sum=5000),
        ]
    )  # fmt: skip

    rows = utilisation_by_day(now=now, days=2)

    assert [r["day"] for r in rows] == [yesterday.date(), today.date()]
    assert rows[0]["gpu_hours"] == 1.0  # 3,600 of the 7,200 GPU-s
    assert rows[0]["gpu_busy_pct"] is None  # no telemetry that day
    # 3,600 + 1,800 + 720 GPU-s metered, 4 × 1.5 h of the reserved term
    today_seconds = 3600 + 1800 + 720 + 4 * 1.5 * 3600
    assert rows[1]["gpu_hours"] == round(today_seconds / 3600, 1)
    assert rows[1]["share"] == round(today_seconds / (16 * 12 * 3600), 4)
    assert rows[1]["gpu_busy_pct"] == round((16 * 40 + 8 * 70) / 24, 1)

    html = staff_client.get("/staff/").content.decode()
    table = html.split('id="utilisation-table"')[1].split("</table>")[0]
    assert "GPU utilisation (telemetry)" in table


def test_the_catalogue_shows_each_model_before_any_search(
    fleet,
    allow_all_funding,  # noqa: F811
):
    site, h100, *_ = fleet
    GpuModelFactory(slug="unused", name="Never installed")
    org = OrganizationFactory()
    start = tomorrow()
    reservation_create(
        organization=org, gpu_model=h100.slug, gpu_count=8, starts_at=start,
        ends_at=start + timedelta(hours=1), tier="on_demand", site=site.slug,
    )  # fmt: skip

    html = member_client(org, Role.MEMBER).get("/gpus").content.decode()

    card = html.split(f'id="model-{h100.slug}"')[1].split("</article>")[0]
    assert "NVIDIA H100 SXM 80GB" in card and "80 GB" in card
    assert (
        f'href="/gpus?gpu_model={h100.slug}&amp;gpu_count=1&amp;plan=on_demand">from 2.0000 USD</a>'
    ) in card
    prices = {
        plan: card.split(f'plan={plan}">from ')[1].split("</a>")[0]
        for plan in re.findall(r"plan=(\w+)\">from ", card)
    }
    # Every tier and term sold, each a search link the search form understands.
    assert set(prices) == set(PLANS)
    assert prices == {
        "on_demand": "2.0000 USD",
        "interruptible": "0.9000 USD",  # 55 % off
        "reserved_1w": "1.9000 USD",  # 5 % off
        "reserved_1m": "1.7600 USD",  # 12 % off
        "reserved_3m": "1.6000 USD",  # 20 % off
        "reserved_1y": "1.3000 USD",  # 35 % off
    }
    assert len(set(prices.values())) == 6
    labels = re.findall(r"<dt>([^<]+)</dt>", card)
    assert labels == ["On-demand", "Interruptible", "Reserved, 1 week", "Reserved, 1 month",
                      "Reserved, 3 months", "Reserved, 1 year"]  # fmt: skip
    assert "<strong>16</strong> free now" in card
    assert "<strong>8</strong> free for the next 7 days" in card  # 8 booked tomorrow
    assert "At Mo i Rana" in card
    assert 'id="model-unused"' not in html
    assert 'id="offers"' not in html


def test_a_site_page_shows_free_gpus_for_each_of_the_next_14_days(
    fleet,
    allow_all_funding,  # noqa: F811
):
    site, h100, *_ = fleet
    org = OrganizationFactory()
    day_after = (timezone.now() + timedelta(days=2)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    reservation_create(
        organization=org, gpu_model=h100.slug, gpu_count=8, starts_at=day_after + timedelta(hours=3),
        ends_at=day_after + timedelta(hours=4), tier="on_demand", site=site.slug,
    )  # fmt: skip

    html = member_client(org, Role.MEMBER).get(f"/sites/{site.slug}").content.decode()

    table = html.split('id="forecast-table"')[1].split("</table>")[0]
    cells = table.split("<tbody>")[1].split("<td")
    assert table.count('<th scope="col"') == 14
    assert "NVIDIA H100 SXM 80GB" in table
    free = [c.split(">", 1)[1].split("<")[0] for c in cells[1:]]
    assert free[:4] == ["16", "16", "8", "16"]  # the day after tomorrow has 8 booked
    assert Decimal(len(free)) == 14


def test_the_usage_page_charts_spend_by_model_balance_and_hours_with_tables(
    fleet,
    allow_all_funding,  # noqa: F811
):
    site, h100, *_ = fleet
    l40s = GpuModelFactory(slug="l40s-48gb", name="NVIDIA L40S", memory_gb=48, tdp_watts=350)
    make_nodes(site, l40s, 1, gpus=4)
    make_rate(l40s, "1.0000")
    org = OrganizationFactory()
    start = tomorrow()
    big = reservation_create(
        organization=org, gpu_model=h100.slug, gpu_count=2, starts_at=start,
        ends_at=start + timedelta(hours=1), tier="on_demand", site=site.slug,
    )  # fmt: skip
    small = reservation_create(
        organization=org, gpu_model=l40s.slug, gpu_count=1, starts_at=start,
        ends_at=start + timedelta(hours=1), tier="on_demand", site=site.slug,
    )  # fmt: skip
    for kind, amount, reservation, seconds, key in (
        (LedgerKind.TOP_UP, 100_000, None, 0, "t"),
        (LedgerKind.USAGE, -2_000, big, 7200, "u1"),
        (LedgerKind.USAGE, -500, small, 1800, "u2"),
    ):
        LedgerEntry.objects.create(
            organization=org, kind=kind, amount_minor=amount, currency="usd", description="x",
            reservation=reservation, gpu_seconds=seconds, idempotency_key=key,
            period_start=timezone.now() if reservation else None,
        )  # fmt: skip

    html = member_client(org, Role.MEMBER).get("/billing/usage").content.decode()

    assert "Charged in this period: <strong>25.00 USD</strong>" in html
    charts = json.loads(
        html.split('<script id="usage-charts" type="application/json">')[1].split("</script>")[0]
    )
    today = timezone.now().date().isoformat()
    spend = {d["label"]: d["data"] for d in charts["spend"]["datasets"]}
    day = charts["spend"]["labels"].index(today)
    assert (spend["NVIDIA H100 SXM 80GB"][day], spend["NVIDIA L40S"][day]) == (20.0, 5.0)
    assert charts["balance"]["datasets"][0]["data"][day] == 975.0
    assert charts["balance"]["datasets"][0]["data"][0] == 0.0  # 30 days ago: nothing yet
    assert charts["reservations"]["labels"] == [big.public_id, small.public_id]
    assert charts["reservations"]["datasets"][0]["data"] == [2.0, 0.5]
    table = html.split('id="spend-table"')[1].split("</table>")[0]
    assert '<th scope="row">NVIDIA L40S</th>' in table and ">5.00 USD<" in table


def test_the_sites_pages_name_gpu_models_and_statuses_in_words(
    fleet,
    allow_all_funding,  # noqa: F811
):
    site, h100, *_ = fleet
    client = member_client(OrganizationFactory(), Role.MEMBER)

    for path in ("/sites", f"/sites/{site.slug}"):
        html = client.get(path).content.decode()
        assert "16 × NVIDIA H100 SXM 80GB" in html, path
        assert f"× {h100.slug}" not in html, path
        assert ">active<" not in html and ">Active<" in html, path
