"""Colour contrast (WCAG 2.1 AA, success criterion 1.4.3) measured in Chromium on the portal's
pages: every visible piece of text against the background it is drawn on.

For each element holding text, the browser's computed colour is composited over the
backgrounds of its ancestors (their alpha included) and the contrast ratio is worked out from
the relative luminance, as WCAG defines them. Normal text needs 4.5:1, large text (24 px, or
18.66 px bold) 3:1. Text on a background image, disabled controls and hidden text are left out,
as the criterion does. The page is measured as it first renders and again with every
`<details>` opened, so text in collapsed tables is measured too.
"""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from marketplace.models import Reservation, ReservationStatus
from marketplace.services.api_keys import api_key_create, api_key_revoke
from marketplace.services.quotes import quote_create
from marketplace.services.resale import listing_create
from marketplace.services.reservations import reservation_create
from marketplace.services.ssh_keys import ssh_key_create
from tests.factories import GpuModelFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
)
from tests.marketplace.ssh_key_helpers import key_bytes, ssh_key

pytestmark = pytest.mark.usefixtures("allow_all_funding")

# Returns [{text, selector, ratio, needed, colour, background}] for text below its threshold.
CONTRAST_JS = r"""
() => {
  const parse = (value) => {
    const m = value.match(/rgba?\(([^)]+)\)/);
    if (!m) return null;
    const p = m[1].split(/[ ,\/]+/).filter(Boolean).map(Number);
    return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1};
  };
  const over = (top, bottom) => {
    const a = top.a + bottom.a * (1 - top.a);
    if (a === 0) return {r: 0, g: 0, b: 0, a: 0};
    const mix = (t, b) => (t * top.a + b * bottom.a * (1 - top.a)) / a;
    return {r: mix(top.r, bottom.r), g: mix(top.g, bottom.g), b: mix(top.b, bottom.b), a};
  };
  const luminance = (c) => {
    const lin = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * lin(c.r) + 0.7152 * lin(c.g) + 0.0722 * lin(c.b);
  };
  const background = (element) => {
    const layers = [];
    for (let e = element; e; e = e.parentElement) {
      const style = getComputedStyle(e);
      if (style.backgroundImage && style.backgroundImage !== 'none') return null;
      const c = parse(style.backgroundColor);
      if (c && c.a > 0) { layers.push(c); if (c.a >= 1) break; }
    }
    let result = {r: 255, g: 255, b: 255, a: 1};  // the canvas
    for (const layer of layers.reverse()) result = over(layer, result);
    return result;
  };
  const describe = (e) => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') +
    (e.className && typeof e.className === 'string' ? '.' + e.className.trim().split(/\s+/).join('.') : '');
  const failures = [];
  for (const element of document.querySelectorAll('body *')) {
    if (['SCRIPT', 'STYLE', 'NOSCRIPT', 'TEMPLATE', 'OPTION', 'CANVAS', 'SVG'].includes(element.tagName)) continue;
    const own = [...element.childNodes].filter(n => n.nodeType === 3).map(n => n.textContent.trim()).join(' ').trim();
    if (!own) continue;
    if (element.disabled || element.closest('[aria-hidden="true"]')) continue;
    const rect = element.getBoundingClientRect();
    if (rect.width <= 1 || rect.height <= 1) continue;  // visually hidden (clip, 1 px boxes)
    const style = getComputedStyle(element);
    if (style.visibility !== 'visible' || style.display === 'none') continue;
    let opacity = 1;
    for (let e = element; e; e = e.parentElement) opacity *= Number(getComputedStyle(e).opacity);
    if (opacity === 0) continue;
    const bg = background(element);
    if (!bg) continue;  // on an image: not measurable this way
    const colour = parse(style.color);
    const fg = over({...colour, a: colour.a * opacity}, bg);
    const [hi, lo] = [luminance(fg), luminance(bg)].sort((x, y) => y - x);
    const ratio = (hi + 0.05) / (lo + 0.05);
    const size = parseFloat(style.fontSize);
    const large = size >= 24 || (size >= 18.66 && Number(style.fontWeight) >= 700);
    const needed = large ? 3 : 4.5;
    if (ratio + 1e-6 < needed) {
      failures.push({text: own.slice(0, 40), selector: describe(element), ratio: Math.round(ratio * 100) / 100,
                     needed, colour: style.color, background: `rgb(${Math.round(bg.r)}, ${Math.round(bg.g)}, ${Math.round(bg.b)})`});
    }
  }
  return failures;
}
"""


def contrast_failures(page) -> list[dict]:
    found = page.evaluate(CONTRAST_JS)
    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
    seen = {(f["selector"], f["text"]) for f in found}
    found += [f for f in page.evaluate(CONTRAST_JS) if (f["selector"], f["text"]) not in seen]
    return found


def test_the_contrast_check_finds_text_too_faint_to_read(portal):
    """The measure itself: grey on white below 4.5:1 is caught, large text at 3:1 is not."""
    portal.set_content(
        "<body style='background:#fff'>"
        "<p id='faint' style='color:#999'>faint</p>"  # 2.85:1
        "<p id='ok' style='color:#767676'>just enough</p>"  # 4.54:1
        "<p id='large' style='color:#949494;font-size:24px'>large</p>"  # 3.03:1
        "<div style='background:rgba(0,0,0,.8)'><p id='dark' style='color:#555'>on dark</p></div>"
        "</body>"
    )
    failing = {f["selector"]: f for f in portal.evaluate(CONTRAST_JS)}
    assert set(failing) == {"p#faint", "p#dark"}
    assert failing["p#faint"]["ratio"] == 2.85


@pytest.fixture
def lab(signed_in):
    """A signed-in owner with something on every page: reservations in several states (one
    with an interruption announced), a held quote, an API key."""
    page, user, organization = signed_in
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="mo-i-rana", name="Mo i Rana", region="eu-north")
    make_nodes(site, h100, 2, gpus=8)
    make_rate(h100, "2.5000")
    now = timezone.now()

    def book(**kwargs):
        return reservation_create(
            organization=organization, gpu_model=h100.slug, gpu_count=1, starts_at=now,
            ends_at=now + timedelta(hours=6), tier="interruptible", site=site.slug, **kwargs,
        )  # fmt: skip

    running = book()
    Reservation.objects.filter(pk=running.pk).update(
        status=ReservationStatus.ACTIVE,
        activated_at=now,
        connection={"host": "10.0.0.5", "ssh_port": 2222, "ports": {}},
        preempt_at=now + timedelta(minutes=20),
        preempt_reason="Grid curtailment at Mo i Rana",
    )
    for status in (ReservationStatus.FAILED, ReservationStatus.CANCELLED):
        Reservation.objects.filter(pk=book().pk).update(status=status, status_reason="test")
    quote = quote_create(
        organization=organization, gpu_model=h100.slug, gpu_count=1, starts_at=now,
        ends_at=now + timedelta(hours=2), tier="on_demand",
    )  # fmt: skip
    # A reserved term with part of it listed for resale (its page has the resale form).
    term_start = now + timedelta(days=1)
    term = reservation_create(
        organization=organization, gpu_model=h100.slug, gpu_count=8, starts_at=term_start,
        ends_at=term_start + timedelta(days=8), tier="reserved", term="1w", site=site.slug,
    )  # fmt: skip
    listing_create(
        organization=organization, reservation=term, gpu_count=2,
        starts_at=term_start + timedelta(days=1), ends_at=term_start + timedelta(days=2),
        price_per_gpu_hour=Decimal("1.5000"),
    )  # fmt: skip
    key, _secret = api_key_create(
        organization=organization, name="ci", scopes=["read"], created_by=user
    )
    api_key_revoke(api_key=key)  # shown as revoked
    return page, running, quote, site


def _term_path() -> str:
    """The lab's reserved term's page: its listings and the form to list more."""
    return f"/reservations/{Reservation.objects.get(tier='reserved').public_id}"


def test_every_portal_page_meets_wcag_aa_contrast(lab, live_server):
    page, running, quote, site = lab
    paths = [
        "/dashboard",
        "/gpus",
        "/gpus?gpu_model=h100-sxm-80gb&gpu_count=1&plan=on_demand",
        "/gpus?gpu_model=h100-sxm-80gb&gpu_count=64&plan=on_demand",  # nothing fits
        "/sites",
        f"/sites/{site.slug}",
        "/reservations",
        f"/reservations/{running.public_id}",
        f"/reservations/{running.public_id}/cancel",
        _term_path(),
        "/resale",
        f"/quotes/{quote.public_id}",
        "/api-keys",
        "/ssh-keys",
        "/team",
        "/billing/",
        "/billing/usage",
        "/billing/payment-methods",
        "/billing/invoices",
        "/billing/statements",
        "/webhooks",
        "/audit-log",
    ]
    failures = {}
    for path in paths:
        response = page.goto(live_server.url + path)
        assert response.status < 400, path
        found = contrast_failures(page)
        if found:
            failures[path] = found
    # Refusals as they are shown: a form's errors (400), and a message after a redirect.
    page.goto(live_server.url + "/gpus?gpu_model=h100-sxm-80gb&gpu_count=0&plan=on_demand")
    assert page.locator(".errors, p.error").count() > 0
    failures["/gpus (bad input)"] = contrast_failures(page)
    page.goto(f"{live_server.url}/reservations/{running.public_id}")
    page.locator("form[action$='/cancel'] button, a[href$='/cancel']").first.click()
    page.locator("main form button[type=submit]").last.click()
    page.wait_for_load_state()
    assert page.locator(".messages li").count() > 0
    failures["after cancelling"] = contrast_failures(page)
    failures = {path: found for path, found in failures.items() if found}
    page.context.clear_cookies()
    for path in ("/login", "/signup"):
        page.goto(live_server.url + path)
        found = contrast_failures(page)
        if found:
            failures[path] = found
    assert failures == {}


def test_the_staff_dashboard_and_console_meet_wcag_aa_contrast(lab, live_server, client):
    from django.contrib.auth import get_user_model

    page, running, _quote, _site = lab
    staff = get_user_model().objects.create(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    page.context.clear_cookies()
    page.context.add_cookies(
        [{"name": "sessionid", "value": client.cookies["sessionid"].value, "url": live_server.url}]
    )
    node = running.allocations.first().node
    failures = {}
    for path in (
        "/staff/",
        "/admin/",
        "/admin/inventory/node/",
        f"/admin/inventory/node/{node.pk}/change/",
        "/admin/marketplace/reservation/",
        f"/admin/marketplace/reservation/{running.pk}/change/",
    ):
        response = page.goto(live_server.url + path)
        assert response.status < 400, path
        found = contrast_failures(page)
        if found:
            failures[path] = found
    assert failures == {}


# Visible form controls without an accessible name, positive tabindexes (which reorder focus),
# and the focusable elements in page order.
CONTROLS_JS = r"""
() => {
  const visible = (e) => {
    const r = e.getBoundingClientRect(), s = getComputedStyle(e);
    return r.width > 0 && r.height > 0 && s.visibility === 'visible' && s.display !== 'none';
  };
  const name = (e) => {
    if (e.getAttribute('aria-label')) return e.getAttribute('aria-label').trim();
    const by = e.getAttribute('aria-labelledby');
    if (by) return by.split(/\s+/).map(id => (document.getElementById(id) || {}).textContent || '').join(' ').trim();
    if (e.labels && e.labels.length) return [...e.labels].map(l => l.textContent).join(' ').trim();
    if (e.tagName === 'BUTTON' || e.tagName === 'A') return e.textContent.trim();
    if (e.type === 'submit' || e.type === 'button') return (e.value || '').trim();
    return (e.getAttribute('title') || '').trim();
  };
  const describe = (e) => e.tagName.toLowerCase() + (e.name ? `[name=${e.name}]` : '') + (e.id ? '#' + e.id : '');
  const controls = [...document.querySelectorAll('input:not([type=hidden]), select, textarea, button, a[href]')].filter(visible);
  return {
    unnamed: controls.filter(e => !name(e)).map(describe),
    reordered: [...document.querySelectorAll('[tabindex]')].filter(e => Number(e.getAttribute('tabindex')) > 0).map(describe),
    order: controls.filter(e => !e.disabled && e.tabIndex >= 0).map(describe),
  };
}
"""


def test_the_control_check_finds_unnamed_controls_and_reordered_focus(portal):
    portal.set_content(
        "<label>Name <input name=a></label><input name=b aria-label='B'>"
        "<input name=c><button></button><a href='#' tabindex='2'>x</a>"
    )
    found = portal.evaluate(CONTROLS_JS)
    assert found["unnamed"] == ["input[name=c]", "button"]
    assert found["reordered"] == ["a"]


def test_every_control_has_a_label_and_focus_follows_the_page(lab, live_server):
    """Labels and focus order (WCAG 1.3.1, 2.4.3, 2.4.7, 4.1.2): every visible control has an
    accessible name, nothing reorders focus, Tab visits the controls in page order starting
    with the skip link, and the focused control is drawn visibly."""
    page, running, quote, site = lab
    problems = {}
    for path in (
        "/dashboard",
        "/gpus",
        "/gpus?gpu_model=h100-sxm-80gb&gpu_count=1&plan=on_demand",
        f"/sites/{site.slug}",
        "/reservations",
        f"/reservations/{running.public_id}",
        _term_path(),
        "/resale",
        f"/quotes/{quote.public_id}",
        "/api-keys",
        "/ssh-keys",
        "/team",
        "/billing/",
        "/billing/usage",
    ):
        page.goto(live_server.url + path)
        found = page.evaluate(CONTROLS_JS)
        if found["unnamed"] or found["reordered"]:
            problems[path] = {k: found[k] for k in ("unnamed", "reordered")}
        # Tab through the first controls: page order, each with a visible focus indicator.
        page.evaluate("document.activeElement && document.activeElement.blur()")
        visited = []
        for _ in range(min(12, len(found["order"]))):
            page.keyboard.press("Tab")
            visited.append(
                page.evaluate(
                    """() => { const e = document.activeElement, s = getComputedStyle(e);
                       const shown = (s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) > 0)
                                     || s.boxShadow !== 'none';
                       return [e.tagName.toLowerCase() + (e.name ? `[name=${e.name}]` : '')
                               + (e.id ? '#' + e.id : ''), shown]; }"""
                )
            )
        expected = found["order"][: len(visited)]
        if [v[0] for v in visited] != expected:
            problems.setdefault(path, {})["order"] = ([v[0] for v in visited], expected)
        hidden_focus = [v[0] for v in visited if not v[1]]
        if hidden_focus:
            problems.setdefault(path, {})["focus not visible"] = hidden_focus
    assert problems == {}
    # The first stop is the skip link, and it leads to the main content.
    page.goto(live_server.url + "/dashboard")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    assert page.evaluate("document.activeElement.getAttribute('href')") == "#main"


# Names and descriptions that point nowhere: an aria-describedby or aria-labelledby id, or a
# label's `for`, with no element of that id (a screen reader then reads no help and no error),
# and groups of checkboxes or radios of one name outside a fieldset with a legend (one label
# cannot name a group: it was `<label for="">`).
REFERENCES_JS = r"""
() => {
  const describe = (e) => e.tagName.toLowerCase() + (e.name ? `[name=${e.name}]` : '') + (e.id ? '#' + e.id : '');
  const problems = [];
  for (const e of document.querySelectorAll('[aria-describedby], [aria-labelledby]')) {
    for (const attr of ['aria-describedby', 'aria-labelledby']) {
      for (const id of (e.getAttribute(attr) || '').split(/\s+/).filter(Boolean)) {
        if (!document.getElementById(id)) problems.push(`${describe(e)} ${attr}=${id}: no such element`);
      }
    }
  }
  for (const label of document.querySelectorAll('label[for]')) {
    const target = label.getAttribute('for');
    if (!target || !document.getElementById(target)) problems.push(`label "${label.textContent.trim()}" for="${target}": no such control`);
  }
  const groups = {};
  for (const e of document.querySelectorAll('input[type=checkbox][name], input[type=radio][name]')) {
    (groups[[...document.forms].indexOf(e.form) + '|' + e.name] ||= []).push(e);
  }
  for (const inputs of Object.values(groups)) {
    if (inputs.length < 2) continue;
    const fieldset = inputs[0].closest('fieldset');
    if (!fieldset || !fieldset.querySelector(':scope > legend') || inputs.some(i => i.closest('fieldset') !== fieldset)) {
      problems.push(`${describe(inputs[0])}: a group of ${inputs.length} without a fieldset and legend`);
    }
  }
  return problems;
}
"""


def test_the_reference_check_finds_descriptions_and_labels_that_point_nowhere(portal):
    portal.set_content(
        "<form id=f><input name=a aria-describedby='a_help a_error'><small id=a_help>help</small>"
        "<label for=''>Scopes</label><label><input type=checkbox name=s> r</label>"
        "<label><input type=checkbox name=s> w</label>"
        "<fieldset><legend>Events</legend><input type=checkbox name=e aria-label=x>"
        "<input type=checkbox name=e aria-label=y></fieldset></form>"
    )
    assert portal.evaluate(REFERENCES_JS) == [
        "input[name=a] aria-describedby=a_error: no such element",
        'label "Scopes" for="": no such control',
        "input[name=s]: a group of 2 without a fieldset and legend",
    ]


def test_every_help_text_and_error_a_control_names_is_on_the_page(lab, live_server):
    """Django marks each control aria-describedby="<id>_helptext <id>_error" (and
    aria-invalid): the help and the errors must carry those ids, on the pages as first shown
    and as shown with errors, and a group of checkboxes (scopes, events, saved SSH keys) is a
    fieldset named by its legend."""
    page, running, quote, site = lab
    # Saved keys: the quote page offers them as a group of checkboxes.
    ssh_key_create(organization=running.organization, user=None, name="a", public_key=ssh_key())
    ssh_key_create(
        organization=running.organization,
        user=None,
        name="b",
        public_key=ssh_key(body=key_bytes(2)),
    )
    problems = {}

    def check(label):
        found = page.evaluate(REFERENCES_JS)
        if found:
            problems[label] = found

    for path in (
        "/dashboard",
        "/gpus",
        "/gpus?gpu_model=h100-sxm-80gb&gpu_count=0&plan=on_demand",  # errors
        f"/reservations/{running.public_id}",
        f"/reservations/{running.public_id}/cancel",
        f"/quotes/{quote.public_id}",
        "/api-keys",
        "/ssh-keys",
        "/webhooks",
        "/team",
        "/billing/",
        "/billing/top-ups",
        "/billing/usage?since=yesterday",  # errors
    ):
        assert page.goto(live_server.url + path).status < 500, path
        check(path)
    # Forms sent with errors, as a customer sends them.
    page.goto(f"{live_server.url}/quotes/{quote.public_id}")
    page.fill("#id_image", "Bad Image!!")
    page.locator("#reserve button[type=submit]").click()
    assert page.locator("#id_image_error").count() == 1
    check("quote (bad image)")
    page.goto(live_server.url + "/api-keys")
    page.fill("#id_name", "ci")
    page.locator("#id_scopes input").first.uncheck()
    page.locator("main form button[type=submit]").last.click()
    assert page.locator("#id_scopes_error").count() == 1
    check("api-keys (no scope)")
    page.goto(live_server.url + "/billing/")
    page.fill("#id_recharge_amount", "1e3")
    page.locator("main form button[type=submit]").last.click()
    assert page.locator("#id_recharge_amount[aria-invalid=true]").count() == 1
    check("billing settings (bad amount)")
    # The group's legend names it (was a label for nothing).
    page.goto(live_server.url + "/api-keys")
    assert page.locator("fieldset:has(#id_scopes) > legend").inner_text() == "Scopes"
    page.context.clear_cookies()
    page.goto(live_server.url + "/signup")
    page.fill("#id_username", "newcomer")
    page.fill("#id_email", "newcomer@example.com")
    page.fill("#id_password1", "a-long-passphrase-1")
    page.fill("#id_password2", "a-different-passphrase")
    page.fill("#id_organization", "New Lab")
    page.locator("main form button[type=submit]").click()
    assert (
        page.locator("#id_password2_error").inner_text() == "The two password fields didn’t match."
    )
    check("signup (passwords differ)")
    assert problems == {}
