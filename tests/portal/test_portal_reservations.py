"""Find GPUs, hold a price, reserve, cancel and extend: in the browser, against real PostgreSQL."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from playwright.sync_api import expect

from marketplace.models import Allocation, Reservation, ReservationStatus
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    make_reservation_rows,
    tomorrow,
)
from tests.provisioning_support import ssh_key

pytestmark = pytest.mark.usefixtures("allow_all_funding")


@pytest.fixture
def market():
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="texas-1", name="Texas One", region="us-central")
    make_nodes(site, h100, 2, gpus=8)
    make_rate(h100, "2.5000")
    return site, h100


def _search(
    page, *, gpus: int, start, hours: int, plan: str = "On-demand (by the second, cancel any time)"
):
    page.goto(page.base + "/gpus")
    page.get_by_label("GPU model").select_option(label="NVIDIA H100 SXM 80GB (80 GB)")
    page.get_by_label("GPUs", exact=True).fill(str(gpus))
    page.get_by_label("Plan").select_option(label=plan)
    page.get_by_label("Start (UTC)").fill(start.strftime("%Y-%m-%dT%H:%M"))
    page.get_by_label("Hours").fill(str(hours))
    page.get_by_role("button", name="Search").click()


def test_search_hold_the_price_reserve_then_cancel(signed_in, market):
    page, user, organization = signed_in
    start = tomorrow()
    _search(page, gpus=2, start=start, hours=3)

    offers = page.locator("#offers tbody tr")
    expect(offers).to_have_count(1)
    expect(offers.first).to_contain_text("Texas One")
    expect(offers.first).to_contain_text("15.00 USD")  # 2.50 × 2 GPUs × 3 h
    expect(offers.first).to_contain_text("42 % renewable")  # the site's share, 0.420
    expect(offers.first).to_contain_text("4.830 kWh")  # 2 × 700 W × 3 h × PUE 1.15
    expect(offers.first).to_contain_text("emissions unknown")  # no grid intensity given
    offers.first.get_by_role("button", name="Hold this price").click()

    expect(page).to_have_url(re.compile(r"/quotes/quo_"))
    expect(page.locator("#quote-total")).to_have_text("15.00 USD")
    expect(page.locator("#energy")).to_contain_text("4.830 kWh")
    expect(page.get_by_text("nothing is charged for time not used")).to_be_visible()
    page.get_by_label("SSH public keys").fill(ssh_key())
    # Due now is the first hour (2 GPUs × 2.50), not the 15.00 the whole period may cost.
    expect(page.locator("#due-now")).to_contain_text("5.00 USD")
    page.get_by_role("button", name="Reserve · 5.00 USD due now").click()

    expect(page).to_have_url(re.compile(r"/reservations/res_"))
    expect(page.locator("#status")).to_have_text("Pending")
    reservation = Reservation.objects.get(organization=organization)
    assert reservation.gpu_count == 2 and reservation.total_amount == Decimal("15.00")
    assert reservation.starts_at == start and reservation.ends_at == start + timedelta(hours=3)
    assert reservation.workload["ssh_public_keys"] == [ssh_key()]
    assert Allocation.objects.filter(reservation=reservation, is_live=True).count() == 2
    expect(page.locator("#history tbody tr").first.locator("td").last).to_have_text("ada")

    page.get_by_role("link", name="Cancel…").click()
    # On-demand: nothing was charged ahead, so no refund is promised.
    expect(page.locator("#terms")).to_contain_text("Nothing is refunded")
    page.get_by_label("Reason (optional)").fill("plans changed")
    page.get_by_role("button", name="Cancel", exact=True).click()

    expect(page.locator("#status")).to_have_text("Cancelled")
    expect(page.get_by_role("status")).to_contain_text("Cancelled. Charged only for the time")
    reservation.refresh_from_db()
    assert reservation.status == ReservationStatus.CANCELLED
    assert reservation.cancellation["reason"] == "plans changed"
    assert reservation.cancellation["actor_label"] == "user:ada"
    assert not Allocation.objects.filter(reservation=reservation, is_live=True).exists()
    expect(page.locator("#cancel")).to_have_count(0)  # no longer an allowed action


def test_a_bad_ssh_key_is_refused_on_its_field_and_nothing_is_reserved(signed_in, market):
    page, _, organization = signed_in
    _search(page, gpus=1, start=tomorrow(), hours=2)
    page.locator("#offers tbody tr").first.get_by_role("button", name="Hold this price").click()
    page.get_by_label("SSH public keys").fill("ssh-ed25519 not*base64")
    page.get_by_role("button", name=re.compile("Reserve")).click()

    expect(page.locator(".field.invalid")).to_contain_text("SSH public key")
    assert not Reservation.objects.filter(organization=organization).exists()


def test_bad_search_input_is_shown_on_the_form(signed_in, market):
    page, _, _ = signed_in
    page.goto(page.base + "/gpus?gpu_model=h100-sxm-80gb&gpu_count=0&plan=on_demand&hours=2")
    expect(page.locator(".field.invalid")).to_contain_text("greater than or equal to 1")
    expect(page.locator("#offers")).to_have_count(0)

    past = (tomorrow() - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M")
    page.goto(
        page.base + f"/gpus?gpu_model=h100-sxm-80gb&gpu_count=1&plan=on_demand&starts_at={past}"
    )
    expect(page.locator("#search")).to_contain_text("The start time is in the past")


def test_nothing_fits_says_so(signed_in, market):
    page, _, _ = signed_in
    _search(page, gpus=17, start=tomorrow(), hours=2)  # two nodes of 8
    expect(page.locator("#nothing")).to_contain_text("Nothing is free for this request.")


def test_extend_moves_the_end_and_refuses_when_the_gpus_are_booked_later(signed_in, market):
    page, _, organization = signed_in
    site, h100 = market
    start = tomorrow()
    mine = reservation_create(
        organization=organization, gpu_model=h100.slug, gpu_count=16, starts_at=start,
        ends_at=start + timedelta(hours=2), tier="on_demand", site=site.slug,
    )  # fmt: skip
    page.goto(page.base + f"/reservations/{mine.public_id}")
    page.get_by_label("New end (UTC)").fill((start + timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M"))
    page.get_by_role("button", name="See the cost").click()
    expect(page.locator("#added-amount")).to_have_text("80.00 USD")  # 16 × 2.50 × 2 h
    mine.refresh_from_db()
    assert mine.ends_at == start + timedelta(hours=2)  # nothing changes before confirming
    page.get_by_role("button", name="Extend for 80.00 USD").click()
    expect(page.get_by_role("status")).to_contain_text("total now 160.00 USD")
    mine.refresh_from_db()
    assert mine.ends_at == start + timedelta(hours=4)

    reservation_create(
        organization=organization, gpu_model=h100.slug, gpu_count=16,
        starts_at=start + timedelta(hours=5), ends_at=start + timedelta(hours=6),
        tier="on_demand", site=site.slug,
    )  # fmt: skip
    page.get_by_label("New end (UTC)").fill((start + timedelta(hours=8)).strftime("%Y-%m-%dT%H:%M"))
    page.get_by_role("button", name="See the cost").click()
    page.get_by_role("button", name=re.compile("Extend for")).click()
    expect(page.get_by_role("status")).to_contain_text("booked from")
    mine.refresh_from_db()
    assert mine.ends_at == start + timedelta(hours=4)
    expect(page.locator("#total")).to_have_text("160.00 USD")


def test_the_list_filters_with_its_form_and_pages_through_every_match(signed_in, market):
    page, _, organization = signed_in
    site, h100 = market
    cancelled = make_reservation_rows(
        organization, 52, site=site, gpu_model=h100, status=ReservationStatus.CANCELLED
    )
    make_reservation_rows(organization, 3, site=site, gpu_model=h100)  # pending: filtered out
    page.goto(page.base + "/dashboard")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Reservations").click()
    expect(page.locator("#showing")).to_have_text("Showing 1–50 of 55, newest first.")

    page.get_by_label("Status").select_option(label="Cancelled")
    page.get_by_label("Site").select_option(label="Texas One")
    page.get_by_role("button", name="Show").click()
    expect(page.locator("#showing")).to_have_text("Showing 1–50 of 52, newest first.")
    page.get_by_role("link", name="Next").click()

    expect(page.locator("#showing")).to_have_text("Showing 51–52 of 52, newest first.")
    expect(page.locator("#reservations tbody tr")).to_have_count(2)
    expect(page.locator("#reservations tbody tr").first).to_contain_text(cancelled[1].public_id)
    expect(page.get_by_label("Status")).to_have_value("cancelled")  # the filters stay set
    expect(page.get_by_label("Site")).to_have_value("texas-1")
