"""The staff console in Chromium at a laptop's width: list tables are not clipped by the filter
panel. Screenshots under test-results/screenshots/<test name>/."""

from pathlib import Path

import pytest

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
