"""Saved SSH keys in the browser: add, list, refuse a bad key, delete, reserve with them."""

import re
from datetime import timedelta

import pytest
from playwright.sync_api import expect

from marketplace.models import Reservation, SshKey
from marketplace.services.quotes import quote_create
from marketplace.services.ssh_keys import ssh_key_create
from tests.factories import GpuModelFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)
from tests.marketplace.ssh_key_helpers import expected_fingerprint, key_bytes, ssh_key


@pytest.fixture
def market():
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="texas-1", name="Texas One", region="us-central")
    make_nodes(site, h100, 1, gpus=8)
    make_rate(h100, "2.5000")
    return site, h100


def _quote(organization, site, gpu_model):
    start = tomorrow()
    return quote_create(
        organization=organization,
        gpu_model=gpu_model.slug,
        gpu_count=1,
        starts_at=start,
        ends_at=start + timedelta(hours=2),
        tier="on_demand",
        term="none",
        site=site.slug,
    )


def add_key(page, name: str, public_key: str) -> None:
    page.goto(page.base + "/ssh-keys")
    page.get_by_label("Name").fill(name)
    page.get_by_label("Public key").fill(public_key)
    page.get_by_role("button", name="Add key").click()


def test_a_key_is_added_and_listed_with_its_fingerprint(signed_in):
    page, user, organization = signed_in
    add_key(page, "laptop", ssh_key(body=key_bytes(1)))

    fingerprint = expected_fingerprint("ssh-ed25519", key_bytes(1))
    expect(page).to_have_url(page.base + "/ssh-keys")
    expect(page.get_by_role("status")).to_contain_text(f"Saved laptop ({fingerprint})")
    row = page.locator("#ssh-keys tbody tr").filter(has_text="laptop")
    expect(row).to_contain_text(fingerprint)
    expect(row).to_contain_text("ada")
    key = SshKey.objects.get()
    assert (key.organization, key.created_by, key.name, key.public_key) == (
        organization,
        user,
        "laptop",
        ssh_key(body=key_bytes(1)),
    )
    expect(page.get_by_role("link", name="SSH keys")).to_have_attribute("aria-current", "page")


def test_a_bad_key_is_refused_on_its_field_and_nothing_is_saved(signed_in):
    page, _, _ = signed_in
    add_key(page, "broken", "ssh-ed25519 not*base64")

    expect(page.locator(".field.invalid")).to_contain_text("not valid base64 key data")
    expect(page.get_by_label("Name")).to_have_value("broken")
    assert SshKey.objects.count() == 0


def test_the_same_key_twice_is_refused(signed_in):
    page, _, _ = signed_in
    add_key(page, "laptop", ssh_key())
    add_key(page, "again", ssh_key().replace("dev@laptop", "other"))

    expect(page.locator(".field.invalid")).to_contain_text("already saved as 'laptop'")
    assert list(SshKey.objects.values_list("name", flat=True)) == ["laptop"]


def test_a_key_is_deleted_after_confirmation(signed_in):
    page, _, organization = signed_in
    kept = ssh_key_create(
        organization=organization, user=None, name="desktop", public_key=ssh_key()
    )
    gone = ssh_key_create(
        organization=organization,
        user=None,
        name="old laptop",
        public_key=ssh_key(body=key_bytes(2)),
    )
    page.goto(page.base + "/ssh-keys")
    page.get_by_role("link", name="Delete old laptop").click()

    expect(page.get_by_role("heading", name="Delete old laptop?")).to_be_visible()
    expect(page.locator("dl.facts")).to_contain_text(gone.fingerprint)
    assert SshKey.objects.count() == 2  # asking is not deleting
    page.get_by_role("button", name="Delete key").click()

    expect(page).to_have_url(page.base + "/ssh-keys")
    expect(page.get_by_role("status")).to_contain_text("Deleted old laptop")
    expect(page.locator("#ssh-keys tbody tr")).to_have_count(1)
    assert list(SshKey.objects.all()) == [kept]


@pytest.mark.usefixtures("allow_all_funding")
def test_reserving_installs_the_ticked_saved_keys_and_the_pasted_ones(signed_in, market):
    page, _, organization = signed_in
    site, h100 = market
    laptop = ssh_key_create(
        organization=organization, user=None, name="laptop", public_key=ssh_key()
    )
    ci = ssh_key_create(
        organization=organization, user=None, name="ci", public_key=ssh_key(body=key_bytes(2))
    )
    desktop = ssh_key_create(
        organization=organization, user=None, name="desktop", public_key=ssh_key(body=key_bytes(4))
    )
    quote = _quote(organization, site, h100)
    page.goto(page.base + f"/quotes/{quote.public_id}")

    boxes = {
        k.name: page.get_by_label(f"{k.name} ({k.fingerprint})") for k in (laptop, ci, desktop)
    }
    for box in boxes.values():
        expect(box).to_be_checked()  # all ticked at first
    boxes["ci"].uncheck()
    pasted = ssh_key(body=key_bytes(3))
    laptop_pasted = ssh_key().replace("dev@laptop", "pasted")
    # The laptop key, ticked and also pasted (with another comment), is installed once.
    page.get_by_label("SSH public keys").fill(f"{pasted}\n{laptop_pasted}")
    page.get_by_role("button", name=re.compile("^Reserve")).click()

    expect(page).to_have_url(re.compile(r"/reservations/res_"))
    reservation = Reservation.objects.get(organization=organization)
    assert reservation.workload == {"ssh_public_keys": [pasted, laptop_pasted, desktop.public_key]}


@pytest.mark.usefixtures("allow_all_funding")
def test_a_ticked_saved_key_alone_is_installed(signed_in, market):
    page, _, organization = signed_in
    site, h100 = market
    laptop = ssh_key_create(
        organization=organization, user=None, name="laptop", public_key=ssh_key()
    )
    page.goto(page.base + f"/quotes/{_quote(organization, site, h100).public_id}")
    expect(page.get_by_label(f"laptop ({laptop.fingerprint})")).to_be_checked()
    page.get_by_role("button", name=re.compile("^Reserve")).click()

    expect(page).to_have_url(re.compile(r"/reservations/res_"))
    reservation = Reservation.objects.get(organization=organization)
    assert reservation.workload == {"ssh_public_keys": [laptop.public_key]}


def _page_width(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth")


@pytest.mark.usefixtures("allow_all_funding")
def test_a_keys_fingerprint_wraps_on_a_phone_instead_of_widening_the_page(signed_in, market):
    """A fingerprint is one 50-character word: in the saved message and in the quote's
    checkbox label it used to push a 375 px page out to about 490 px."""
    page, _, organization = signed_in
    site, h100 = market
    page.set_viewport_size({"width": 375, "height": 812})
    add_key(page, "laptop", ssh_key(body=key_bytes(1)))
    fingerprint = expected_fingerprint("ssh-ed25519", key_bytes(1))
    expect(page.get_by_role("status")).to_contain_text(f"Saved laptop ({fingerprint})")
    assert _page_width(page) == 375

    page.goto(page.base + f"/quotes/{_quote(organization, site, h100).public_id}")
    expect(page.get_by_label(f"laptop ({fingerprint})")).to_be_checked()
    assert _page_width(page) == 375
