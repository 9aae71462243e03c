"""The staff console's fixes (issue 16): counts that a search does not multiply, what runs on a
node before draining it, one query for a list of balances, and names people use."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import BillingAccount, LedgerEntry, LedgerKind
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, NodeFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, django_user_model):
    staff = django_user_model.objects.create(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    return client


def test_searching_nodes_by_a_term_that_matches_their_gpus_keeps_the_gpu_count(staff_client):
    NodeFactory(hostname="rana-001", gpus=8)  # serials rana-001-sn0 … sn7 match "rana" too
    NodeFactory(hostname="rana-002", gpus=4)

    response = staff_client.get(reverse("admin:inventory_node_changelist"), {"q": "rana"})

    rows = {n.hostname: n.gpu_count for n in response.context["cl"].result_list}
    assert rows == {"rana-001": 8, "rana-002": 4}  # not 64 and 16 (a Count over the join)
    assert response.context["cl"].result_count == 2


def test_a_nodes_page_lists_the_reservations_running_or_booked_on_it(
    staff_client,
    allow_all_funding,  # noqa: F811
):
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="mo-i-rana")
    node = NodeFactory(site=site, gpu_model=h100, hostname="rana-001", gpus=8)
    idle = NodeFactory(site=site, gpu_model=h100, hostname="rana-002", gpus=8)
    make_rate(h100, "2.00")
    org = OrganizationFactory(name="Fjord Labs")
    start = tomorrow()
    booked = reservation_create(
        organization=org, gpu_model=h100.slug, gpu_count=8, starts_at=start,
        ends_at=start + timedelta(hours=2), tier="interruptible", site=site.slug,
    )  # fmt: skip
    on_node = booked.allocations.first().node

    page = staff_client.get(reverse("admin:inventory_node_change", args=[on_node.pk]))
    other = node if on_node != node else idle
    empty = staff_client.get(reverse("admin:inventory_node_change", args=[other.pk]))

    html = page.content.decode()
    assert "Reservations on this node (running or booked)" in html
    assert booked.public_id in html and "Fjord Labs" in html
    assert "(interruptible)" in html
    assert booked.public_id not in empty.content.decode()


def test_the_billing_accounts_list_reads_every_balance_in_one_query(staff_client):
    url = reverse("admin:billing_billingaccount_changelist")

    def list_with(accounts: int) -> tuple[int, str]:
        for _ in range(accounts):
            org = OrganizationFactory()
            BillingAccount.objects.create(organization=org)
            LedgerEntry.objects.create(
                organization=org, kind=LedgerKind.TOP_UP, amount_minor=123456, currency="usd",
                description="test", idempotency_key=f"test-top-up-{org.pk}",
            )  # fmt: skip
        with CaptureQueriesContext(connection) as queries:
            html = staff_client.get(url).content.decode()
        return len(queries), html

    few, _ = list_with(1)
    many, html = list_with(5)

    assert many == few  # not one ledger sum per row
    assert html.count("1,234.56 USD") == 6


def test_the_console_is_branded_and_names_models_as_people_do(staff_client):
    html = staff_client.get(reverse("admin:index")).content.decode()

    assert "Switchyard staff console" in html and "Django administration" not in html
    for name in ("GPUs", "GPU models", "API keys", "SSH keys"):
        assert f">{name}<" in html, name
    assert ">Gpus<" not in html and ">Api keys<" not in html
