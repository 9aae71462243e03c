"""Staff pages read their rows' related records with the rows, however long a node's, a
site's or an organisation's history grows: outages (a GPU's is named by its node's hostname),
status changes, GPUs and agent tokens on the node's page, status changes on the site's,
members on the organisation's, and the reservation outages with the inventory outage each
came from."""

# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from inventory.models import Outage, OutageCause
from inventory.services import node_token_issue, status_change
from marketplace.models import ReservationOutage, Role
from tests.factories import MembershipFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
)

pytestmark = pytest.mark.django_db


def _queries(client, url: str) -> int:
    client.get(url)  # the session and content types, read once
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return len(queries.captured_queries)


def _history(node, reservation, rounds: int) -> None:
    """`rounds` more of what a node's and a site's pages list: a GPU outage (copied onto the
    reservation on that GPU), a drain and return of the node and a maintenance of its site,
    and an agent token."""
    site = node.site
    for _ in range(rounds):
        start = timezone.now() - timedelta(days=2, minutes=Outage.objects.count())
        outage = Outage.objects.create(
            node=node, gpu=node.gpus.first(), started_at=start,
            ended_at=start + timedelta(seconds=30), cause=OutageCause.GPU_FAILURE,
        )  # fmt: skip
        ReservationOutage.objects.create(
            reservation=reservation, node=node, source_outage=outage, started_at=start,
            ended_at=outage.ended_at, cause=OutageCause.GPU_FAILURE,
        )  # fmt: skip
        for action in ("drain", "return_to_service"):
            status_change(action=action, node=node, actor=None, actor_label="ops", reason="fw")
        for action in ("set_maintenance", "return_to_service"):
            status_change(action=action, site=site, actor=None, actor_label="ops", reason="fw")
        node_token_issue(node=node, label="agent")


def test_the_pages_of_a_nodes_history_cost_the_same_queries_however_long_it_is(
    admin_client, market, org
):
    reservation = book_at_market(org, start=timezone.now() + timedelta(hours=1))
    node = reservation.allocations.first().node
    urls = {
        "outages": reverse("admin:inventory_outage_changelist"),
        "node": reverse("admin:inventory_node_change", args=[node.pk]),
        "site": reverse("admin:inventory_site_change", args=[node.site_id]),
        "reservation outages": reverse("admin:marketplace_reservationoutage_changelist"),
        "reservation": reverse("admin:marketplace_reservation_change", args=[reservation.pk]),
    }

    _history(node, reservation, 1)
    few = {name: _queries(admin_client, url) for name, url in urls.items()}
    _history(node, reservation, 5)
    many = {name: _queries(admin_client, url) for name, url in urls.items()}

    assert many == few
    page = admin_client.get(urls["outages"]).content.decode()
    assert page.count(f"{node.hostname}/gpu0") == 6  # each GPU outage names its GPU


def test_the_organisations_page_reads_each_member_once(admin_client, org):
    url = reverse("admin:marketplace_organization_change", args=[org.pk])
    MembershipFactory(organization=org, role=Role.OWNER)
    few = _queries(admin_client, url)
    for _ in range(5):
        MembershipFactory(organization=org, role=Role.MEMBER)

    # One query a member is left: the user picker's (autocomplete) selected option.
    assert _queries(admin_client, url) <= few + 5
