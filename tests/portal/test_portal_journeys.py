"""Issue 16's journeys in Chromium: quote → reserve → live reservation → extend with its cost →
stop with its refund, at phone width; live figures without reloading. Screenshots of every step
are saved under test-results/screenshots/<test name>/.
"""

import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from marketplace.models import Reservation, ReservationStatus
from marketplace.services.quotes import quote_create
from tests.factories import GpuModelFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
)
from tests.provisioning_support import ssh_key

pytestmark = pytest.mark.usefixtures("allow_all_funding")

PHONE = {"width": 375, "height": 812}
SHOTS = Path(__file__).resolve().parents[2] / "test-results" / "screenshots"


@pytest.fixture
def shot(request):
    """shot(page, "name"): a full-page screenshot in the test's own folder."""
    folder = SHOTS / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    taken = []

    def take(page, name: str) -> Path:
        path = folder / f"{len(taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path), full_page=True)
        taken.append(path)
        return path

    return take


@pytest.fixture
def market():
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="mo-i-rana", name="Mo i Rana", region="eu-north")
    make_nodes(site, h100, 2, gpus=8)
    make_rate(h100, "1234.5000")  # dear enough for thousands separators
    return site, h100


def _no_sideways_scroll(page) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    wide = page.evaluate(
        "[...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > 376)"
        ".filter(e => !(e.parentElement && e.parentElement.closest('.scroll'))).slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id)"
    )
    assert width <= PHONE["width"], f"{page.url} is {width}px wide at {PHONE['width']}px: {wide}"


def _run_now(reservation) -> None:
    """As if provisioned (it starts now), reachable over SSH."""
    Reservation.objects.filter(pk=reservation.pk).update(
        status=ReservationStatus.ACTIVE,
        connection={"host": "10.0.0.5", "ssh_port": 2222, "ports": {}},
    )


def test_from_the_catalogue_to_an_offer_a_held_price_and_a_reservation(signed_in, market, shot):
    """The journey's start in the browser: the catalogue before any search, a plan's "from"
    price as a link to its offers, the offer's node specs, then hold and confirm."""
    page, _, organization = signed_in
    page.set_viewport_size(PHONE)
    page.goto(page.base + "/gpus")
    card = page.locator("#model-h100-sxm-80gb")
    expect(card).to_contain_text("16 free now")
    _no_sideways_scroll(page)
    shot(page, "catalogue")
    monthly = card.locator("a[href*='plan=reserved_1m']")
    expect(monthly).to_have_text("from 1,086.3600 USD")  # reserved 1 month: 12 % off
    monthly.click()

    expect(page).to_have_url(re.compile(r"plan=reserved_1m"))
    offer = page.locator("#offers tbody tr").first
    expect(offer).to_contain_text("Mo i Rana")
    expect(offer).to_contain_text("vCPU")  # the node's specs beside the price
    _no_sideways_scroll(page)
    shot(page, "offer")
    offer.get_by_role("button", name=re.compile("^Hold this price")).click()

    expect(page).to_have_url(re.compile(r"/quotes/quo_"))
    expect(page.locator("h1")).to_have_text("Confirm: 1 × NVIDIA H100 SXM 80GB at Mo i Rana")
    # A reserved term is due whole, now: what the button says before anything happens.
    total = page.locator("#quote-total").inner_text()
    expect(page.locator("#due-now")).to_contain_text(total)
    page.get_by_label("SSH public keys").fill(ssh_key())
    shot(page, "quote")
    assert not Reservation.objects.filter(organization=organization).exists()
    page.get_by_role("button", name=f"Reserve · {total} due now").click()

    expect(page).to_have_url(re.compile(r"/reservations/res_"))
    reservation = Reservation.objects.get(organization=organization)
    assert (reservation.tier, reservation.term, reservation.gpu_count) == ("reserved", "1m", 1)
    _no_sideways_scroll(page)
    shot(page, "reserved")


def test_reserve_extend_and_stop_at_phone_width(signed_in, market, shot):
    page, _, organization = signed_in
    page.set_viewport_size(PHONE)
    start = timezone.now()
    quote = quote_create(
        organization=organization, gpu_model="h100-sxm-80gb", gpu_count=8, starts_at=start,
        ends_at=start + timedelta(hours=3), tier="on_demand",
    )  # fmt: skip

    page.goto(page.base + f"/quotes/{quote.public_id}")
    expect(page.locator("h1")).to_have_text("Confirm: 8 × NVIDIA H100 SXM 80GB at Mo i Rana")
    expect(page.locator("#quote-total")).to_have_text("29,628.00 USD")  # 8 × 1,234.50 × 3 h
    expect(page.locator("#due-now")).to_contain_text("9,876.00 USD")  # the first hour
    _no_sideways_scroll(page)
    shot(page, "quote")
    page.get_by_role("button", name=re.compile("^Reserve")).click()
    expect(page.locator(".field.invalid")).to_contain_text("Add an SSH key")  # none given
    page.get_by_label("SSH public keys").fill(ssh_key())
    page.get_by_role("button", name="Reserve · 9,876.00 USD due now").click()
    expect(page).to_have_url(re.compile(r"/reservations/res_"))

    reservation = Reservation.objects.get(organization=organization)
    _run_now(reservation)
    page.reload()
    expect(page.locator("#status")).to_have_text("Running")
    expect(page.locator("#charged")).to_contain_text(re.compile(r"^\d[\d,]*\.\d\d USD"))
    expect(page.locator("#connection")).to_contain_text("ssh -p 2222 root@10.0.0.5")
    _no_sideways_scroll(page)
    shot(page, "running")

    # Whole minutes are valid in the browser's own check (the value has no seconds).
    field = page.get_by_label("New end (UTC)")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}", field.input_value())
    reservation.refresh_from_db()
    new_end = (reservation.ends_at + timedelta(hours=2)).replace(second=0, microsecond=0)
    field.fill(new_end.strftime("%Y-%m-%dT%H:%M"))
    assert field.evaluate("el => el.checkValidity()") is True
    page.get_by_role("button", name="See the cost").click()
    expect(page.locator("#added-amount")).to_contain_text(",")
    shot(page, "extend-preview")
    page.get_by_role("button", name=re.compile("^Extend for")).click()
    expect(page.get_by_role("status")).to_contain_text("Extended to")
    reservation.refresh_from_db()
    assert reservation.ends_at == new_end

    page.get_by_role("link", name="Stop early…").click()
    expect(page.locator("#terms")).to_contain_text("Nothing is refunded")  # charged as used
    _no_sideways_scroll(page)
    shot(page, "stop-confirmation")
    assert Reservation.objects.get(pk=reservation.pk).status == ReservationStatus.ACTIVE
    page.get_by_role("button", name="Stop now", exact=True).click()
    expect(page.get_by_role("status")).to_contain_text("Stopped. Charged only for the time it ran.")
    assert Reservation.objects.get(pk=reservation.pk).status != ReservationStatus.ACTIVE
    shot(page, "stopped")

    for path in ("/dashboard", "/reservations", "/gpus", "/billing/"):
        page.goto(page.base + path)
        _no_sideways_scroll(page)
    page.goto(page.base + "/gpus?gpu_model=h100-sxm-80gb&gpu_count=1&plan=on_demand&hours=2")
    expect(page.locator("#offers")).to_be_visible()
    _no_sideways_scroll(page)
    shot(page, "offers")


def test_live_figures_and_an_interruption_update_without_reloading(signed_in, market, shot):
    page, _, organization = signed_in
    start = timezone.now()
    quote = quote_create(
        organization=organization, gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=start,
        ends_at=start + timedelta(hours=3), tier="interruptible",
    )  # fmt: skip
    from marketplace.services.reservations import reservation_create

    reservation = reservation_create(organization=organization, quote=quote)
    _run_now(reservation)
    page.clock.install()
    page.goto(page.base + "/dashboard")
    row = page.locator(f'tr[data-live-id="{reservation.public_id}"]')
    expect(row).to_contain_text("Running")
    expect(row).not_to_contain_text("Interruption")
    page.evaluate("document.title = 'not reloaded'")

    Reservation.objects.filter(pk=reservation.pk).update(
        preempt_at=timezone.now() + timedelta(minutes=3, seconds=30)
    )
    page.clock.fast_forward(16_000)  # one poll

    expect(row.locator("[data-live=interruption]")).to_have_text("Interruption in 3 min")
    assert page.title() == "not reloaded"
    shot(page, "dashboard-interruption")


def test_a_running_reservations_page_keeps_its_live_figures_whole(signed_in, market):
    """Each poll rewrites the charged amount, the time run and the time left, and nothing
    beside them: the amount used to lose its space before the note ("0.00 USDusage"), and the
    time run stayed as first drawn while the time left moved on."""
    page, _, organization = signed_in
    start = timezone.now()
    quote = quote_create(
        organization=organization, gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=start,
        ends_at=start + timedelta(hours=3), tier="on_demand",
    )  # fmt: skip
    from marketplace.services.reservations import reservation_create

    reservation = reservation_create(organization=organization, quote=quote)
    _run_now(reservation)
    Reservation.objects.filter(pk=reservation.pk).update(activated_at=reservation.starts_at)
    page.clock.install()
    page.goto(page.base + f"/reservations/{reservation.public_id}")
    expect(page.locator("#elapsed")).to_have_text(re.compile(r"^0 min \d\d s · 2 h 5\d min left$"))

    # As if it had started an hour earlier: the next poll says so.
    hour = timedelta(hours=1)
    Reservation.objects.filter(pk=reservation.pk).update(
        starts_at=reservation.starts_at - hour,
        activated_at=reservation.starts_at - hour,
        ends_at=reservation.ends_at - hour,
    )
    page.clock.fast_forward(16_000)  # one poll

    expect(page.locator("#elapsed")).to_have_text(re.compile(r"^1 h 0\d min · 1 h 5\d min left$"))
    expect(page.locator("#charged")).to_have_text(
        re.compile(r"^[\d,]+\.\d\d USD usage and commitments less refunds and credits; ")
    )


def test_the_usage_and_site_pages_draw_their_charts_beside_tables(signed_in, market, shot):
    page, _, _ = signed_in
    site, _ = market
    outside = []
    page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(page.base) else None)

    page.goto(page.base + "/billing/usage")
    for name in ("spend", "balance"):
        canvas = page.locator(f'canvas[data-chart="{name}"]')
        expect(canvas).to_have_attribute("data-chart-drawn", "true")
        expect(page.locator("#" + canvas.get_attribute("aria-describedby"))).to_be_visible()
    shot(page, "usage")

    page.goto(page.base + f"/sites/{site.slug}")
    expect(page.locator('canvas[data-chart="free"]')).to_have_attribute("data-chart-drawn", "true")
    expect(page.locator("#forecast-table tbody tr")).to_have_count(1)
    shot(page, "site")
    assert outside == []


def test_a_sites_page_draws_its_zones_power_prices_beside_a_table(signed_in, market, shot):
    from decimal import Decimal

    from inventory.models import ZonePrice
    from tests.factories import PriceZoneFactory

    page, _, _ = signed_in
    site, _ = market
    site.price_zone = PriceZoneFactory(code="ercot-west", name="ERCOT West")
    site.save(update_fields=["price_zone"])
    hour = timezone.now().replace(minute=0, second=0, microsecond=0)
    ZonePrice.objects.bulk_create(
        ZonePrice(
            zone=site.price_zone,
            starts_at=hour + timedelta(hours=i),
            ends_at=hour + timedelta(hours=i + 1),
            price_per_mwh=Decimal(20 + 3 * i),
            currency="usd",
            source="test",
            received_at=timezone.now(),
        )  # fmt: skip
        for i in range(24)
    )

    page.goto(page.base + f"/sites/{site.slug}")

    canvas = page.locator('canvas[data-chart="power"]')
    expect(canvas).to_have_attribute("data-chart-drawn", "true")
    expect(page.locator("#" + canvas.get_attribute("aria-describedby"))).to_contain_text(
        "ERCOT West"
    )
    expect(page.locator("#power-table tbody tr")).to_have_count(24)
    expect(page.locator("#power-table tbody tr").last).to_contain_text("89.00 USD")
    shot(page, "site-power-prices")
