"""The staff console in Chromium at a laptop's width: list tables are not clipped by the filter
panel. Screenshots under test-results/screenshots/<test name>/."""

from pathlib import Path

import pytest
from playwright.sync_api import expect

from billing.models import BillingAccount, LedgerEntry, LedgerKind
from tests.factories import NodeFactory, OrganizationFactory

SHOTS = Path(__file__).resolve().parents[2] / "test-results" / "screenshots"


@pytest.fixture
def staff_page(portal, live_server, django_user_model, client):
    staff = django_user_model.objects.create(
        username="staff", is_staff=True, is_superuser=True, email="staff@example.com"
    )
    client.force_login(staff)
    cookie = client.cookies["sessionid"]
    portal.context.add_cookies(
        [{"name": "sessionid", "value": cookie.value, "url": live_server.url}]
    )
    return portal


@pytest.mark.parametrize(
    "path",
    [
        "/admin/inventory/node/",
        "/admin/billing/billingaccount/",
        "/admin/billing/ledgerentry/",
    ],
)
def test_list_tables_are_not_clipped_by_the_filter_panel_at_1280px(staff_page, path, request):
    page = staff_page
    NodeFactory(hostname="a-rather-long-hostname-for-a-gpu-node-001.mo-i-rana.example", gpus=8)
    org = OrganizationFactory()
    BillingAccount.objects.create(organization=org)
    LedgerEntry.objects.create(
        organization=org, kind=LedgerKind.TOP_UP, amount_minor=10_000, currency="usd",
        description="a top-up with a description long enough to need room", idempotency_key="t1",
    )  # fmt: skip
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(page.base + path)
    folder = SHOTS / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / "list.png"), full_page=True)

    # The whole table is in view: no column behind the filter panel or a sideways scroll.
    fits = page.evaluate(
        "() => { const r = document.querySelector('#changelist .results');"
        " const t = document.querySelector('#result_list');"
        " return [t.offsetWidth, r.clientWidth, t.getBoundingClientRect().right]; }"
    )
    table_width, box_width, right = fits
    assert table_width <= box_width and right <= 1280, fits
    assert page.locator("#changelist-filter").is_visible()  # still there, above the list
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280


def test_the_staff_dashboard_draws_its_charts_from_the_vendored_library(staff_page, request):
    """Chart.js from our static files (nothing fetched elsewhere); every chart has its table."""
    page = staff_page
    NodeFactory(hostname="rana-001", gpus=8)
    outside = []
    page.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith(page.base) else None,
    )
    page.set_viewport_size({"width": 1280, "height": 900})
    page.goto(page.base + "/staff/")

    for name in ("fleet", "utilisation", "statuses"):
        canvas = page.locator(f'canvas[data-chart="{name}"]')
        expect(canvas).to_have_attribute("data-chart-drawn", "true")
        table = canvas.get_attribute("aria-describedby")
        expect(page.locator(f"#{table}")).to_be_attached()
    expect(page.locator("#fleet-table")).to_contain_text("8")
    folder = SHOTS / request.node.name
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / "dashboard.png"), full_page=True)
    assert outside == []
