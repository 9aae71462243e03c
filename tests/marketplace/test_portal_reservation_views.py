"""The portal's reservation pages without a browser: roles, isolation, refusals, nothing written."""

import re
from datetime import timedelta
from html import unescape

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from inventory.models import SiteStatus
from marketplace.models import Allocation, Quote, Reservation, ReservationStatus, Role, Tier
from marketplace.portal.reservations import RESERVATIONS_PAGE_SIZE
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create
from tests.clients import HttpsAPIClient, HttpsClient
from tests.factories import MembershipFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    make_reservation_rows,
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
        response = HttpsClient().get(path)
        assert response.status_code == 302
        assert response["Location"].startswith("/login?next=")


def test_a_form_sent_after_the_session_ended_says_so_on_the_sign_in_page_and_changes_nothing(
    market,
    allow_all_funding,  # noqa: F811
):
    organization = OrganizationFactory()
    client = member_client(organization, Role.OWNER)
    reservation = reserve(organization)
    client.logout()  # the session ended while the cancel page was open

    response = client.post(
        f"/reservations/{reservation.public_id}/cancel", {"confirm": "True"}, follow=True
    )

    assert response.redirect_chain == [
        (f"/login?next=/reservations/{reservation.public_id}/cancel", 302)
    ]
    assert (
        "You were signed out (the session ended), so the form you sent was not saved and "
        "nothing changed. Sign in, then fill it in and send it again."
    ) in response.content.decode()
    reservation.refresh_from_db()
    assert reservation.status == "pending"
    # A plain visit while signed out is sent to sign in without it.
    visit = HttpsClient().get("/reservations", follow=True)
    assert "You were signed out" not in visit.content.decode()


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
    assert "On-demand (by the second, cancel any time). Cheapest first." in page.content.decode()

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
    assert 'id="reserve"' not in page.content.decode()

    response = client.post(
        f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": "", "without_ssh": "on"}
    )
    assert response.status_code == 409
    assert "expired" in response.content.decode()
    assert not Reservation.objects.exists() and not Allocation.objects.exists()


def test_a_quote_for_now_leads_back_to_a_search_for_now_once_its_start_has_passed(
    market,
    allow_all_funding,  # noqa: F811
):
    """A quote held for "now" and read minutes later (or expired): "Search again", "Back to the
    search" and "Change the search" searched from its past start, which the search refuses
    (400, "The start time is in the past."). They search from now, as asked; a start still
    ahead is kept."""
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    now = timezone.now()
    held = quote_for(org, starts_at=now, ends_at=now + timedelta(hours=3))
    # Held ten minutes ago: its start has passed and its price expired.
    Quote.objects.filter(pk=held.pk).update(
        starts_at=now - timedelta(minutes=10),
        ends_at=now + timedelta(minutes=170),
        expires_at=now - timedelta(minutes=5),
    )
    ahead = quote_for(org)  # tomorrow

    page = client.get(f"/quotes/{held.public_id}").content.decode()
    links = set(re.findall(r'href="(/gpus\?[^"]*)"', page))
    searches = [client.get(unescape(link)) for link in links]
    later = unescape(
        re.search(
            r'href="(/gpus\?[^"]*)"', client.get(f"/quotes/{ahead.public_id}").content.decode()
        ).group(1)
    )

    assert "This price expired" in page and links
    for link, search in zip(links, searches, strict=True):
        assert "starts_at" not in link
        assert search.status_code == 200, link
        assert "The start time is in the past." not in search.content.decode()
        assert "1 offer" in search.content.decode()
    assert f"starts_at={ahead.starts_at:%Y-%m-%dT%H}%3A{ahead.starts_at:%M}" in later
    assert client.get(later).status_code == 200


def test_without_funds_the_reservation_is_refused_with_the_reason(market):
    # The real funding gate (billing's): a new prepaid organisation has no balance.
    org = OrganizationFactory()
    client = member_client(org, Role.OWNER)
    quote = quote_for(org)

    response = client.post(
        f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": "", "without_ssh": "on"}
    )
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
    first = client.post(
        f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": "", "without_ssh": "on"}
    )
    assert first.status_code == 302
    reservation = Reservation.objects.get()
    assert first["Location"] == f"/reservations/{reservation.public_id}"

    page = client.get(f"/quotes/{quote.public_id}").content.decode()
    assert "This quote has been used" in page and reservation.public_id in page
    again = client.post(
        f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": "", "without_ssh": "on"}
    )
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
    everything = client.get("/reservations").content.decode()
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
    Reservation.objects.filter(pk=reservation.pk).update(
        connection=connection, workload={"ssh_public_keys": ["ssh-ed25519 AAAAC3Nza ada@laptop"]}
    )
    path = f"/reservations/{reservation.public_id}"
    assert "ssh -p 2222" not in client.get(path).content.decode()  # not active yet

    Reservation.objects.filter(pk=reservation.pk).update(status="active")
    page = client.get(path).content.decode()
    assert "ssh -p 2222 root@10.0.0.5" in page
    assert "port 8888 → 10.0.0.5:30888" in page
    assert "ssh -p 2223 root@10.0.0.6" in page
    assert 'id="simulated"' not in page

    simulated = {**connection, "host": "n1.sim.switchyard.test", "simulated": True}
    Reservation.objects.filter(pk=reservation.pk).update(connection=simulated)
    page = client.get(path).content.decode()
    assert '<strong class="badge" id="simulated">Simulated</strong>' in page
    assert "No workload runs" in page

    no_ssh = {"host": "10.0.0.5", "ssh_port": None, "ports": {"8888": 30888}}
    Reservation.objects.filter(pk=reservation.pk).update(connection=no_ssh)
    page = client.get(path).content.decode()
    assert "ssh -p" not in page and "No SSH (the workload has no SSH keys)." in page
    assert "port 8888 → 10.0.0.5:30888" in page


# --- the list, page by page -------------------------------------------------------------------
def newest_first(rows) -> list[str]:
    """The ids of rows from make_reservation_rows (oldest first), in the list's order."""
    return [r.public_id for r in reversed(rows)]


def shown(response) -> list[str]:
    """The reservation ids the list shows, in its order."""
    assert response.status_code == 200
    return re.findall(r'<td><a href="/reservations/(res_\w+)">', response.content.decode())


def test_the_list_pages_through_every_reservation_newest_first(market):
    site, h100 = market
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    ids = newest_first(make_reservation_rows(org, 60, site=site, gpu_model=h100))
    assert RESERVATIONS_PAGE_SIZE == 50

    first = client.get("/reservations")
    assert shown(first) == ids[:50]
    page = first.content.decode()
    assert "Showing 1–50 of 60, newest first." in page
    assert "Page 1 of 2" in page
    assert '<a href="?page=2" rel="next">Next</a>' in page
    assert '<a href="?page=2">Last</a>' in page
    assert "Previous</a>" not in page and "First</a>" not in page

    second = client.get("/reservations", {"page": 2})
    assert shown(second) == ids[50:]
    page = second.content.decode()
    assert "Showing 51–60 of 60, newest first." in page
    assert '<a href="?page=1" rel="prev">Previous</a>' in page
    assert '<a href="?page=1">First</a>' in page
    assert "Next</a>" not in page and "Last</a>" not in page


def test_the_list_reads_in_the_same_number_of_queries_for_a_few_rows_or_a_full_page(market):
    site, h100 = market
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    make_reservation_rows(org, 2, site=site, gpu_model=h100)
    with CaptureQueriesContext(connection) as few:
        assert len(shown(client.get("/reservations"))) == 2
    make_reservation_rows(org, 60, site=site, gpu_model=h100, tier=Tier.RESERVED, term="1w")
    with CaptureQueriesContext(connection) as full:
        assert len(shown(client.get("/reservations"))) == 50
    assert len(full.captured_queries) == len(few.captured_queries)


def test_filters_narrow_the_list_and_survive_in_the_page_links(market):
    site, h100 = market
    texas = SiteFactory(slug="texas-1", name="Texas One")
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    wanted = newest_first(
        make_reservation_rows(
            org, 55, site=texas, gpu_model=h100, status=ReservationStatus.CANCELLED
        )
    )
    make_reservation_rows(org, 3, site=site, gpu_model=h100, status=ReservationStatus.CANCELLED)
    make_reservation_rows(org, 4, site=texas, gpu_model=h100, status=ReservationStatus.ACTIVE)
    reserved = newest_first(
        make_reservation_rows(org, 2, site=site, gpu_model=h100, tier=Tier.RESERVED, term="1m")
    )
    filters = {"status": "cancelled", "tier": "on_demand", "site": "texas-1"}

    first = client.get("/reservations", filters)
    assert shown(first) == wanted[:50]
    page = first.content.decode()
    assert "Showing 1–50 of 55, newest first." in page
    link = "?status=cancelled&amp;tier=on_demand&amp;site=texas-1&amp;page=2"
    assert f'<a href="{link}" rel="next">Next</a>' in page
    assert '<option value="texas-1" selected>Texas One</option>' in page  # the form keeps them
    second = client.get("/reservations", {**filters, "page": 2})
    assert shown(second) == wanted[50:]
    assert "?status=cancelled&amp;tier=on_demand&amp;site=texas-1&amp;page=1" in (
        second.content.decode()
    )

    assert shown(client.get("/reservations", {"tier": "reserved"})) == reserved
    assert len(shown(client.get("/reservations", {"status": "active"}))) == 4
    # A submitted form sends its blank fields too: they mean "any" and stay out of the links.
    submitted = client.get("/reservations", {"status": "cancelled", "tier": "", "site": "texas-1"})
    assert shown(submitted) == wanted[:50]
    assert '<a href="?status=cancelled&amp;site=texas-1&amp;page=2" rel="next">' in (
        submitted.content.decode()
    )


@pytest.mark.parametrize(
    ("query", "field", "value"),
    [({"status": "bogus"}, "status", "bogus"), ({"tier": "spot"}, "tier", "spot"),
     ({"site": "nowhere-9"}, "site", "nowhere-9"), ({"site": "old-mine"}, "site", "old-mine")],
)  # fmt: skip
def test_a_bad_filter_is_refused_on_its_field(market, query, field, value):
    site, h100 = market
    SiteFactory(slug="old-mine", status=SiteStatus.RETIRED)  # not a public site
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    (mine,) = make_reservation_rows(org, 1, site=site, gpu_model=h100)

    response = client.get("/reservations", query)
    assert response.status_code == 400
    page = response.content.decode()
    assert response.context["form"].errors == {
        field: [f"Select a valid choice. {value} is not one of the available choices."]
    }
    assert f"Select a valid choice. {value} is not one of the available choices." in page
    assert '<div class="field invalid">' in page and f'<div id="id_{field}_error">' in page
    assert 'id="reservations"' not in page and mine.public_id not in page
    assert "Fix the filters above" in page


@pytest.mark.parametrize(("number", "expected"), [("abc", 1), ("", 1), ("2", 2), ("999", 2),
                                                  ("0", 2), ("-1", 2), ("1.5", 1)])  # fmt: skip
def test_a_page_number_out_of_range_or_malformed_is_clamped(market, number, expected):
    site, h100 = market
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    ids = newest_first(make_reservation_rows(org, 51, site=site, gpu_model=h100))

    response = client.get("/reservations", {"page": number})
    assert response.context["page"].number == expected
    assert shown(response) == (ids[:50] if expected == 1 else ids[50:])


def test_another_organisations_reservations_never_appear_on_any_page_or_filter(market):
    site, h100 = market
    mine, theirs = OrganizationFactory(), OrganizationFactory()
    client = member_client(mine, Role.OWNER)
    make_reservation_rows(theirs, 60, site=site, gpu_model=h100)
    own = newest_first(make_reservation_rows(mine, 3, site=site, gpu_model=h100))

    first = client.get("/reservations")
    assert shown(first) == own
    assert "Showing 1–3 of 3, newest first." in first.content.decode()
    assert 'id="pages"' not in first.content.decode()  # one page: no page links
    assert shown(client.get("/reservations", {"page": 2})) == own
    assert shown(client.get("/reservations", {"site": "abilene-1", "status": "pending"})) == own


def test_an_empty_list_says_whether_there_are_none_or_none_match(market):
    site, h100 = market
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)

    empty = client.get("/reservations")
    assert shown(empty) == []
    assert "No reservations yet." in empty.content.decode()
    assert "No reservation matches" not in empty.content.decode()

    make_reservation_rows(org, 2, site=site, gpu_model=h100)
    unmatched = client.get("/reservations", {"status": "failed"})
    assert shown(unmatched) == []
    page = unmatched.content.decode()
    assert "No reservation matches these filters." in page
    assert "No reservations yet." not in page and "Showing" not in page


def test_the_list_filters_as_the_api_does_with_the_same_query(market):
    """The portal runs the API's filter set: the same query string lists the same
    reservations, the API's own filters (several statuses, creation time) included."""
    site, h100 = market
    org = OrganizationFactory()
    membership = MembershipFactory(organization=org, role=Role.MEMBER)
    portal, api = HttpsClient(), HttpsAPIClient()
    portal.force_login(membership.user)
    api.force_login(membership.user)
    active = make_reservation_rows(
        org, 3, site=site, gpu_model=h100, status=ReservationStatus.ACTIVE
    )
    cancelled = make_reservation_rows(
        org, 2, site=site, gpu_model=h100, status=ReservationStatus.CANCELLED
    )
    completed = make_reservation_rows(
        org, 2, site=site, gpu_model=h100, status=ReservationStatus.COMPLETED
    )
    after = cancelled[0].created_at.isoformat()
    expected = [
        ({"status": ["active", "cancelled"]}, newest_first([*active, *cancelled])),
        ({"created_after": after}, newest_first([*cancelled, *completed])),
        (
            {"status": ["active", "cancelled"], "created_after": after, "gpu_model": h100.slug},
            newest_first(cancelled),
        ),
        ({"tier": "reserved"}, []),
    ]

    for query, ids in expected:
        listed = api.get("/api/v1/reservations", {**query, "limit": 100})
        assert listed.status_code == 200, listed.content
        assert [r["id"] for r in listed.json()["results"]] == ids
        assert shown(portal.get("/reservations", query)) == ids


def test_a_malformed_api_filter_is_refused_and_lists_nothing(market):
    site, h100 = market
    org = OrganizationFactory()
    client = member_client(org, Role.MEMBER)
    (mine,) = make_reservation_rows(org, 1, site=site, gpu_model=h100)

    response = client.get("/reservations", {"created_after": "yesterday-ish"})

    assert response.status_code == 400
    page = response.content.decode()
    assert 'id="filter_errors"' in page and "created_after: Enter a valid date/time." in page
    assert mine.public_id not in page
