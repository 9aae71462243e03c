"""The portal's site pages: where the GPUs are, and what is free at one site for a window."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest

from inventory.models import SiteStatus
from marketplace.models import Role
from marketplace.services.reservations import reservation_create
from tests.clients import HttpsClient
from tests.factories import GpuModelFactory, MembershipFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def world():
    make_policy()
    h100 = GpuModelFactory()
    texas = SiteFactory(slug="texas-1", name="Texas One", grid_operator="ERCOT",
                        grid_carbon_g_per_kwh=390, status=SiteStatus.ACTIVE)  # fmt: skip
    make_nodes(texas, h100, 2, gpus=8)
    make_rate(h100, "2.00")
    SiteFactory(slug="gone-1", name="Gone One", status=SiteStatus.RETIRED)
    org = OrganizationFactory()
    client = HttpsClient()
    client.force_login(MembershipFactory(organization=org, role=Role.MEMBER).user)
    return client, org, texas, h100


def test_the_site_list_shows_each_sites_power_and_capacity_but_not_retired_ones(world):
    client, _, texas, _ = world
    page = client.get("/sites").content.decode()
    assert "Texas One" in page and "ERCOT" in page and "390" in page
    assert "16 × NVIDIA H100 SXM 80GB" in page and "× h100-sxm-80gb" not in page
    assert "42 %" in page  # the factory's renewable share, 0.420
    assert "Gone One" not in page


def test_a_site_shows_what_is_free_for_the_window(world, allow_all_funding):
    client, org, texas, h100 = world
    start = tomorrow()
    window = {"starts_at": start.strftime("%Y-%m-%dT%H:%M"), "hours": 4}
    page = client.get("/sites/texas-1", window).content.decode()
    row = page.split('id="availability"')[1].split("</table>")[0]
    assert ">16<" in row and ">2<" in row  # 16 free, 2 whole free nodes

    reservation_create(
        organization=org, gpu_model=h100.slug, gpu_count=3, starts_at=start + timedelta(hours=1),
        ends_at=start + timedelta(hours=2), tier="on_demand", site="texas-1",
    )  # fmt: skip
    row = client.get("/sites/texas-1", window).content.decode().split('id="availability"')[1]
    cells = [c.split("<")[0] for c in row.split('<td class="num">')[1:5]]
    assert cells == ["13", "16", "8", "1"]  # free, healthy, most on one node, whole nodes

    later = {"starts_at": (start + timedelta(hours=3)).strftime("%Y-%m-%dT%H:%M"), "hours": 1}
    row = client.get("/sites/texas-1", later).content.decode().split('id="availability"')[1]
    assert [c.split("<")[0] for c in row.split('<td class="num">')[1:2]] == ["16"]


def test_bad_window_input_is_a_form_error(world):
    client, *_ = world
    response = client.get("/sites/texas-1", {"hours": 0})
    assert response.status_code == 400
    assert 'id="availability"' not in response.content.decode()
    response = client.get("/sites/texas-1", {"hours": 24, "starts_at": "not a time"})
    assert response.status_code == 400


def test_an_unknown_or_retired_site_is_not_found(world):
    client, *_ = world
    assert client.get("/sites/nope-1").status_code == 404
    assert client.get("/sites/gone-1").status_code == 404


def test_the_nav_marks_sites(world):
    client, *_ = world
    page = client.get("/sites/texas-1").content.decode()
    nav = page.split('<nav aria-label="Main">')[1].split("</nav>")[0]
    assert 'aria-current="page">Sites</a>' in nav
