"""The portal's reservation pages without a browser: roles, isolation, refusals, nothing written."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from marketplace.models import Allocation, Quote, Reservation, Role
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create
from tests.factories import OrganizationFactory
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
def market():
    from tests.factories import GpuModelFactory, SiteFactory

    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="abilene-1", region="us-central")
    make_nodes(site, h100, 1, gpus=8)
    make_rate(h100, "2.00")
    return site, h100


def quote_for(organization, **overrides):
    start = tomorrow()
    return quote_create(
        organization=organization,
        **{"gpu_model": "h100-sxm-80gb", "gpu_count": 2, "starts_at": start,
           "ends_at": start + timedelta(hours=3), "tier": "on_demand", **overrides},
    )  # fmt: skip


def reserve(organization):
    start = tomorrow()
    return reservation_create(
        organization=organization, gpu_model="h100-sxm-80gb", gpu_count=2, starts_at=start,
        ends_at=start + timedelta(hours=3), tier="on_demand",
    )  # fmt: skip


def test_pages_need_a_signed_in_user():
    for path in ("/dashboard", "/gpus", "/reservations", "/reservations/res_x", "/quotes/quo_x"):
        response = Client().get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/login?next=")


def test_another_organisations_reservation_and_quote_are_not_found(
    market,
    allow_all_funding,  # noqa: F811
):
    mine, theirs = OrganizationFactory(), OrganizationFactory()
    client = member_client(mine, Role.OWNER)
    reservation, quote = reserve(theirs), quote_for(theirs, gpu_count=1)

    assert client.get(f"/reservations/{reservation.public_id}").status_code == 404
    assert client.post(f"/reservations/{reservation.public_id}/cancel").status_code == 404
    assert client.get(f"/quotes/{quote.public_id}").status_code == 404
    assert client.post(f"/quotes/{quote.public_id}").status_code == 404
    reservation.refresh_from_db()
    assert reservation.status == "pending"
    assert Reservation.objects.count() == 1
    assert reservation.public_id not in client.get("/reservations").content.decode()


def test_a_billing_member_sees_offers_but_cannot_reserve(market):
    org = OrganizationFactory()
    client = member_client(org, Role.BILLING)
    start = tomorrow().strftime("%Y-%m-%dT%H:%M")
    page = client.get(
        "/gpus", {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "plan": "on_demand",
                  "starts_at": start, "hours": 2},
    )  # fmt: skip
    assert page.status_code == 200
    assert "Abilene 1" in page.content.decode()  # the offer is listed
    assert "Hold this price" not in page.content.decode()

    refused = client.post(
        "/quotes", {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "plan": "on_demand",
                    "starts_at": start, "hours": 2, "site": "abilene-1"},
    )  # fmt: skip
    assert refused.status_code == 403
    assert not Quote.objects.exists()


def test_an_expired_quote_is_refused_and_nothing_is_reserved(market, allow_all_funding):  # noqa: F811
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    quote = quote_for(org)
    Quote.objects.filter(pk=quote.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    page = client.get(f"/quotes/{quote.public_id}")
    assert "This price expired" in page.content.decode()
    assert "Reserve for" not in page.content.decode()

    response = client.post(f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": ""})
    assert response.status_code == 409
    assert "expired" in response.content.decode()
    assert not Reservation.objects.exists() and not Allocation.objects.exists()


def test_without_funds_the_reservation_is_refused_with_the_reason(market):
    # The real funding gate (billing's): a new prepaid organisation has no balance.
    org = OrganizationFactory()
    client = member_client(org, Role.OWNER)
    quote = quote_for(org)

    response = client.post(f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": ""})
    assert response.status_code == 402
    assert "does not cover this reservation" in response.content.decode()
    assert not Reservation.objects.exists() and not Allocation.objects.exists()


def test_a_used_quote_links_to_its_reservation_and_cannot_be_used_again(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.OWNER)
    quote = quote_for(org)
    first = client.post(f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": ""})
    assert first.status_code == 302
    reservation = Reservation.objects.get()
    assert first["Location"] == f"/reservations/{reservation.public_id}"

    page = client.get(f"/quotes/{quote.public_id}").content.decode()
    assert "This quote has been used" in page and reservation.public_id in page
    again = client.post(f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": ""})
    assert again.status_code == 409
    assert Reservation.objects.count() == 1


def test_the_overview_lists_current_reservations_and_the_list_filters_by_status(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    kept, cancelled = reserve(org), reserve(org)
    cancelled.status = "cancelled"
    cancelled.save(update_fields=["status"])

    overview = client.get("/dashboard").content.decode()
    assert kept.public_id in overview and cancelled.public_id not in overview
    listed = client.get("/reservations", {"status": "cancelled"}).content.decode()
    assert cancelled.public_id in listed and kept.public_id not in listed
    everything = client.get("/reservations", {"status": "bogus"}).content.decode()
    assert kept.public_id in everything and cancelled.public_id in everything


def test_the_nav_marks_the_section_of_the_page(market, allow_all_funding):  # noqa: F811
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    reservation = reserve(org)
    for path, section in (
        ("/dashboard", "Overview"),
        (f"/reservations/{reservation.public_id}", "Reservations"),
        ("/billing/usage", "Billing"),  # billing's pages, registered by billing at start-up
    ):
        page = client.get(path).content.decode()
        nav = page.split('<nav aria-label="Main">')[1].split("</nav>")[0]
        assert f'aria-current="page">{section}</a>' in nav, path
        assert nav.count('aria-current="page"') == 1, path


def test_the_nav_offers_api_keys_only_to_roles_that_may_manage_them():
    org = OrganizationFactory()
    for role, shown in ((Role.OWNER, True), (Role.ADMIN, True), (Role.MEMBER, False),
                        (Role.BILLING, False)):  # fmt: skip
        page = member_client(org, role).get("/dashboard").content.decode()
        nav = page.split('<nav aria-label="Main">')[1].split("</nav>")[0]
        assert ('href="/api-keys"' in nav) is shown, role
        assert 'href="/reservations"' in nav


def test_the_detail_page_follows_a_reservation_that_moves_on_its_own(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    reservation = reserve(org)
    refresh = '<meta http-equiv="refresh" content="5">'
    for status, reloads in (("pending", False), ("provisioning", True), ("active", False),
                            ("releasing", True), ("completed", False)):  # fmt: skip
        Reservation.objects.filter(pk=reservation.pk).update(status=status)
        page = client.get(f"/reservations/{reservation.public_id}").content.decode()
        assert (refresh in page) is reloads, status


def test_connection_details_show_while_active_and_every_node_of_a_cluster(
    market,
    allow_all_funding,  # noqa: F811
):
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    reservation = reserve(org)
    connection = {
        "host": "10.0.0.5", "ssh_port": 2222, "ports": {"8888": 30888},
        "nodes": [{"host": "10.0.0.5", "ssh_port": 2222}, {"host": "10.0.0.6", "ssh_port": 2223}],
    }  # fmt: skip
    Reservation.objects.filter(pk=reservation.pk).update(connection=connection)
    path = f"/reservations/{reservation.public_id}"
    assert "ssh -p 2222" not in client.get(path).content.decode()  # not active yet

    Reservation.objects.filter(pk=reservation.pk).update(status="active")
    page = client.get(path).content.decode()
    assert "ssh -p 2222 root@10.0.0.5" in page
    assert "port 8888 → 10.0.0.5:30888" in page
    assert "ssh -p 2223 root@10.0.0.6" in page
