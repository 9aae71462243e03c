"""A new customer's first day in Chromium, at phone width, with real funding (no stand-ins
for the money gate): sign up through the mailed link, sign in, add a card with Stripe.js,
top up, search, hold a price, reserve, see it listed, extend, cancel with its refund in the
ledger, create an API key, invite a teammate, sign out. Every page on the way is checked for
what a customer would call a defect: an error status, sideways scrolling, a form control or
button without an accessible name, a time without its zone.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import re
from datetime import timedelta

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from billing.models import LedgerEntry, LedgerKind, TopUp, TopUpStatus
from billing.selectors import balance_minor
from marketplace.models import ApiKey, Invitation, Reservation, ReservationStatus
from tests.factories import GpuModelFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate
from tests.portal.test_portal_billing import eager_celery, stripe_js  # noqa: F401 - fixtures
from tests.provisioning_support import ssh_key

PHONE = {"width": 375, "height": 812}
PASSWORD = "a-long-passphrase-1"

# A date and time of day printed without a zone after it ("2026-03-02 14:00" alone).
_ZONELESS_TIME = re.compile(r"\b\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}(?::\d{2})?\b(?!\s*(?:UTC|Z|\+00))")


@pytest.fixture
def market():
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="mo-i-rana", name="Mo i Rana", region="eu-north")
    make_nodes(site, h100, 1, gpus=8)
    make_rate(h100, "2.5000")
    return site, h100


class Inspector:
    """Looks at every page the customer reaches; collects what a customer would complain of."""

    def __init__(self, page):
        self.page = page
        self.bad_responses: list[str] = []
        self.problems: list[str] = []
        page.on(
            "response",
            lambda r: (
                self.bad_responses.append(f"{r.status} {r.request.method} {r.url}")
                if r.status >= 500
                else None
            ),
        )

    def check(self, where: str) -> None:
        page = self.page
        page.wait_for_load_state("load")
        if self.bad_responses:
            self.problems.append(f"{where}: {self.bad_responses}")
            self.bad_responses = []
        width = page.evaluate("document.documentElement.scrollWidth")
        wide = page.evaluate(
            """() => [...document.querySelectorAll('body *')]
                .filter(e => e.getBoundingClientRect().right > 376)
                .filter(e => !(e.parentElement && e.parentElement.closest('.scroll, table')))
                .slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id)"""
        )
        if width > PHONE["width"]:
            self.problems.append(f"{where}: {page.url} is {width}px wide: {wide}")
        unnamed = page.evaluate(
            """() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
                .filter(e => e.type !== 'hidden' && e.offsetParent !== null)
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                        && !e.getAttribute('aria-labelledby') && !e.getAttribute('title')
                        && !(e.innerText || '').trim() && !e.getAttribute('placeholder'))
                .map(e => e.outerHTML.slice(0, 120))"""
        )
        if unnamed:
            self.problems.append(f"{where}: controls without an accessible name: {unnamed}")
        # A table whose header names the zone ("When (UTC)") needs it in no cell.
        text = page.evaluate(
            """() => { const main = document.querySelector('main').cloneNode(true);
                // What is code on purpose (an API field, a command) is not jargon.
                main.querySelectorAll('script, style, template, code').forEach(e => e.remove());
                main.querySelectorAll('table').forEach(t => {
                    if (/\\(UTC\\)/.test(t.tHead ? t.tHead.innerText : '')) t.remove(); });
                return main.innerText; }"""
        )
        jargon = re.findall(
            r"(?m)^\s*None\s*$|: None\b|\bnan\b|\b\d usd\b|\b[a-z]+_[a-z_]+\b|\{\{|\{%", text
        )
        if jargon:
            self.problems.append(f"{where}: jargon? {sorted(set(jargon))}")
        zoneless = _ZONELESS_TIME.findall(text)
        if zoneless:
            self.problems.append(f"{where}: times without their zone: {zoneless}")


def _fill_card(page, number: str) -> None:
    page.get_by_placeholder("number").fill(number)
    page.get_by_placeholder("exp_month").fill("12")
    page.get_by_placeholder("exp_year").fill("30")
    page.get_by_placeholder("cvc").fill("123")
    page.get_by_placeholder("postal_code").fill("10001")


def test_a_new_customers_first_day_at_phone_width(
    portal, live_server, settings, mailoutbox, stripe_js, eager_celery, market
):
    settings.SITE_URL = live_server.url
    page = portal
    page.set_viewport_size(PHONE)
    look = Inspector(page)

    # Sign up; the account is made through the mailed link.
    page.goto(page.base + "/signup")
    look.check("sign-up form")
    page.get_by_label("Username").fill("grace")
    page.get_by_label("Email").fill("grace@example.com")
    page.get_by_label("Organisation name").fill("Hopper Compute")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password confirmation").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Check your e-mail")
    look.check("sign-up sent")
    link = re.search(r"https?://\S+/signup/confirm/\S+", mailoutbox[-1].body).group(0)
    page.goto(link)
    look.check("sign-up confirm")
    page.get_by_role("button", name="Create account").click()
    expect(page).to_have_url(re.compile(r"/dashboard$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Hopper Compute")
    look.check("first dashboard")

    # Sign out and back in through the form.
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login"))
    look.check("signed out")
    page.get_by_label("Username").fill("grace")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/dashboard$"))

    # A card, then a top-up.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Billing").click()
    look.check("billing overview")
    page.get_by_role("navigation", name="Billing").get_by_role(
        "link", name="Payment methods"
    ).click()
    look.check("payment methods")
    page.get_by_role("link", name="Add a card").click()
    look.check("add a card")
    _fill_card(page, "4242424242424242")
    page.get_by_role("button", name="Save card").click()
    expect(page.get_by_text("Visa ending 4242 saved.")).to_be_visible()
    look.check("card saved")
    page.get_by_role("navigation", name="Billing").get_by_role("link", name="Top up").click()
    look.check("top-ups")
    page.get_by_label("Amount").fill("100.00")
    page.get_by_role("button", name="Top up").click()
    expect(page.get_by_text("Top-up of 100.00 USD requested; its status is below.")).to_be_visible()
    look.check("topped up")
    top_up = TopUp.objects.get()
    assert (top_up.amount_minor, top_up.status) == (10000, TopUpStatus.SUCCEEDED)
    organization = top_up.organization
    # A reload after the top-up must not charge the card again.
    page.reload()
    look.check("top-ups reloaded")
    assert TopUp.objects.count() == 1

    # Search, hold a price, reserve: 1 GPU for 4 hours from the next whole hour.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Find GPUs").click()
    look.check("catalogue")
    start = (timezone.now() + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)
    page.get_by_label("GPU model").select_option("h100-sxm-80gb")
    page.get_by_label("GPUs", exact=True).fill("1")
    page.get_by_label("Plan").select_option("on_demand")
    page.get_by_label("Start (UTC)").fill(start.strftime("%Y-%m-%dT%H:%M"))
    page.get_by_label("Hours").fill("4")
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#offers")).to_be_visible()
    look.check("offers")
    offer = page.locator("#offers tbody tr").first
    expect(offer).to_contain_text("2.5000 USD")
    expect(offer).to_contain_text("10.00 USD")  # 4 h × 2.50
    offer.get_by_role("button", name=re.compile("^Hold this price")).click()
    expect(page).to_have_url(re.compile(r"/quotes/quo_"))
    look.check("quote")
    expect(page.locator("#quote-total")).to_have_text("10.00 USD")
    expect(page.locator("#balance")).to_have_text("100.00 USD")
    page.get_by_label("SSH public keys").fill(ssh_key())
    page.get_by_role("button", name=re.compile("^Reserve")).click()
    expect(page).to_have_url(re.compile(r"/reservations/res_"))
    look.check("reserved")
    reservation = Reservation.objects.get(organization=organization)
    assert (reservation.gpu_count, reservation.starts_at) == (1, start)
    assert reservation.ends_at == start + timedelta(hours=4)
    # Back to the quote: it says it was used, and reserving again makes nothing.
    page.go_back()
    page.reload()
    look.check("quote after use")
    expect(page.get_by_text("This quote has been used")).to_be_visible()
    page.go_forward()

    # Listed on the dashboard and the reservations page.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Overview").click()
    look.check("dashboard with a reservation")
    # The top-up's receipt names it by its public id, never its sequential one.
    receipt = page.locator("main").get_by_text(re.compile("^.*Receipt: 100.00 USD"))
    expect(receipt).to_contain_text(f"top-up {top_up.public_id}.")
    expect(page.locator(f'tr[data-live-id="{reservation.public_id}"]')).to_be_visible()
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Reservations").click()
    look.check("reservations")
    row = page.locator(f'#reservations tr[data-live-id="{reservation.public_id}"]')
    expect(row).to_contain_text("10.00 USD")
    row.get_by_role("link").click()
    look.check("reservation")

    # Extend by two hours.
    new_end = reservation.ends_at + timedelta(hours=2)
    page.get_by_label("New end (UTC)").fill(new_end.strftime("%Y-%m-%dT%H:%M"))
    page.get_by_role("button", name="See the cost").click()
    look.check("extend preview")
    expect(page.locator("#added-amount")).to_have_text("5.00 USD")
    # The preview as it is now: signed-in pages are no-store, so Back cannot bring it again
    # (the browser will not resend its POST); a second tab left on it can.
    preview_url, preview_html = page.url, page.content()
    page.get_by_role("button", name=re.compile("^Extend for")).click()
    expect(page.get_by_role("status")).to_contain_text("Extended to")
    look.check("extended")
    reservation.refresh_from_db()
    assert reservation.ends_at == new_end
    expect(page.locator("#total")).to_have_text("15.00 USD")

    # That other tab confirming the same preview again extends nothing more, and says why.
    other_tab = page.context.new_page()
    other_tab.route(
        preview_url,
        lambda route: (
            route.fulfill(body=preview_html, content_type="text/html")
            if route.request.method == "GET"
            else route.continue_()
        ),
    )
    other_tab.goto(preview_url)
    other_tab.get_by_role("button", name=re.compile("^Extend for")).click()
    expect(other_tab.get_by_role("status").first).to_be_visible()
    other_tab.close()
    page.reload()
    look.check("extend resubmitted")
    reservation.refresh_from_db()
    assert reservation.ends_at == new_end

    # Cancel before it starts: nothing was charged ahead, nothing to refund.
    page.get_by_role("link", name="Cancel…").click()
    look.check("cancel confirmation")
    expect(page.locator("#effect")).to_contain_text("On-demand: charged only for time used")
    page.get_by_role("button", name="Cancel", exact=True).click()
    expect(page.get_by_role("status")).to_be_visible()
    look.check("cancelled")
    reservation.refresh_from_db()
    assert reservation.status == ReservationStatus.CANCELLED
    # Back to the confirmation and cancelling again: a clear answer, nothing changed.
    page.go_back()
    page.reload()
    look.check("cancel confirmation after cancelling")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Billing").click()
    expect(page.locator("#balance")).to_have_text("100.00 USD")
    page.get_by_role("navigation", name="Billing").get_by_role(
        "link", name="Usage and ledger"
    ).click()
    look.check("ledger")
    assert balance_minor(organization=organization) == 10000
    assert not LedgerEntry.objects.filter(organization=organization, kind=LedgerKind.USAGE).exists()

    # An API key, shown once.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="API keys").click()
    look.check("api keys")
    page.get_by_label("Name").fill("CI runner")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#new-key-secret")).to_contain_text("sy_live_")
    look.check("api key created")
    page.reload()
    look.check("api keys reloaded")
    assert ApiKey.objects.filter(organization=organization).count() == 1

    # A teammate.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Team").click()
    look.check("team")
    page.get_by_label("E-mail address").fill("linus@example.com")
    page.get_by_role("button", name="Send invitation").click()
    expect(page.locator(".messages")).to_contain_text("Invitation sent to linus@example.com")
    look.check("invited")
    assert Invitation.objects.filter(organization=organization).count() == 1

    # The pages not on the way, at phone width too.
    for path in ("/sites", "/resale", "/ssh-keys", "/webhooks", "/audit-log", "/team",
                 "/organizations/new", "/account/password", "/billing/statements", "/billing/invoices",
                 "/gpus?gpu_count=0&hours=-1", f"/reservations/{reservation.public_id}"):  # fmt: skip
        page.goto(page.base + path)
        look.check(path)

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/login"))
    page.goto(page.base + "/dashboard")
    expect(page).to_have_url(re.compile(r"/login"))
    assert not look.problems, "\n".join(look.problems)
