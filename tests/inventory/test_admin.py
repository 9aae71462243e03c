# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments
import re
from datetime import timedelta

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from inventory import services
from inventory.models import (
    Gpu,
    GpuHealth,
    GpuModel,
    MaintenanceWindow,
    Node,
    NodeStatus,
    NodeToken,
    Outage,
    OutageCause,
    Site,
    StatusChange,
)
from inventory.selectors import site_capacity_summary, site_list_with_capacity
from inventory.services import (
    maintenance_window_create,
    status_change,
    token_hash,
)
from marketplace.selectors.availability import site_availability
from tests.factories import GpuModelFactory, NodeFactory, SiteFactory, UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def inventory():
    site = SiteFactory(slug="tx-abilene")
    h100 = GpuModelFactory()
    l40s = GpuModelFactory(slug="l40s-48gb", name="NVIDIA L40S", memory_gb=48, tdp_watts=350)
    a = NodeFactory(site=site, gpu_model=h100, hostname="abl-001", gpus=8)
    b = NodeFactory(
        site=site, gpu_model=h100, hostname="abl-002", gpus=8, status=NodeStatus.DRAINING
    )
    c = NodeFactory(
        site=site, gpu_model=l40s, hostname="abl-003", gpus=4, status=NodeStatus.OFFLINE
    )
    NodeFactory(gpu_model=h100, hostname="elsewhere-001", gpus=8)  # another site
    Gpu.objects.filter(node=a, index__in=[0, 1]).update(health=GpuHealth.FAILED)
    Outage.objects.create(node=c, started_at=timezone.now(), cause=OutageCause.HEARTBEAT_MISSED)
    status_change(action="drain", node=a, actor=None, actor_label="test", reason="setup")
    status_change(
        action="return_to_service", node=a, actor=None, actor_label="test", reason="setup"
    )
    start = timezone.now() + timedelta(days=1)
    maintenance_window_create(node=b, start=start, end=start + timedelta(hours=2), reason="fw")
    NodeToken.objects.create(node=a, prefix="nt_0000abcd", secret_hash=token_hash("x"))
    return {"site": site, "nodes": [a, b, c], "h100": h100, "l40s": l40s}


MODELS = [Site, GpuModel, Node, Gpu, Outage, MaintenanceWindow, StatusChange, NodeToken]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_staff_can_open_every_changelist_and_change_page(admin_client, inventory, model):
    opts = model._meta
    changelist = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
    obj = model.objects.first()
    change = admin_client.get(
        reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    )

    assert changelist.status_code == 200
    assert change.status_code == 200


@pytest.mark.parametrize("model", [Site, GpuModel, Node, Gpu, Outage, MaintenanceWindow])
def test_staff_can_open_add_pages(admin_client, model):
    opts = model._meta

    response = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_add"))

    assert response.status_code == 200


def test_the_changelists_search_and_filter(admin_client, inventory):
    url = reverse("admin:inventory_node_changelist")

    by_host = admin_client.get(url, {"q": "abl-00"})
    by_status = admin_client.get(url, {"status__exact": "draining"})
    by_serial = admin_client.get(url, {"q": "abl-003-sn2"})

    assert by_host.context["cl"].result_count == 3
    assert [n.hostname for n in by_status.context["cl"].result_list] == ["abl-002"]
    assert [n.hostname for n in by_serial.context["cl"].result_list] == ["abl-003"]
    sites = admin_client.get(reverse("admin:inventory_site_changelist"), {"cooling": "immersion"})
    assert sites.status_code == 200


def test_status_is_not_editable_in_the_node_form(admin_client, inventory):
    node = inventory["nodes"][0]
    url = reverse("admin:inventory_node_change", args=[node.pk])

    page = admin_client.get(url)

    assert "status" not in page.context["adminform"].form.fields
    assert "status" in page.context["adminform"].readonly_fields


def test_bulk_drain_drains_records_and_reports_refusals(admin_client, admin_user, inventory):
    a, b, c = inventory["nodes"]
    url = reverse("admin:inventory_node_changelist")
    StatusChange.objects.all().delete()

    selected = {"action": "drain", "_selected_action": [a.pk, b.pk, c.pk], "reason": "PDU swap"}
    confirm = admin_client.post(url, {**selected, "index": 0})  # the changelist's action bar
    assert confirm.status_code == 200 and "Yes, drain" in confirm.content.decode()
    assert not StatusChange.objects.exists()
    response = admin_client.post(url, {**selected, "confirmed": "yes"})

    assert response.status_code == 302
    statuses = dict(Node.objects.filter(site=inventory["site"]).values_list("hostname", "status"))
    assert statuses == {"abl-001": "draining", "abl-002": "draining", "abl-003": "offline"}
    change = StatusChange.objects.get()
    assert (change.node, change.from_status, change.to_status) == (a, "available", "draining")
    assert (change.actor, change.reason) == (admin_user, "PDU swap")
    texts = [m.message for m in get_messages(response.wsgi_request)]
    assert texts[0].startswith("Cannot drain node abl-002 (from draining to draining)")
    assert texts[1].startswith("Cannot drain node abl-003 (from offline to draining)")
    assert texts[2] == "Drained: abl-001."


def test_bulk_return_to_service_without_a_reason_records_a_default(admin_client, inventory):
    b = inventory["nodes"][1]

    admin_client.post(
        reverse("admin:inventory_node_changelist"),
        {"action": "return_to_service", "_selected_action": [b.pk]},
    )

    b.refresh_from_db()
    assert b.status == NodeStatus.AVAILABLE
    assert (
        StatusChange.objects.filter(node=b).first().reason == "Returned to service from the admin"
    )


def test_site_actions_change_status_through_the_services(admin_client, inventory):
    site = inventory["site"]
    url = reverse("admin:inventory_site_changelist")
    selected = {"action": "curtail", "_selected_action": [site.pk], "reason": "ERCOT EEA2"}

    page = admin_client.post(url, {**selected, "index": 0})  # the changelist's action bar

    assert page.status_code == 200
    html = page.content.decode()
    assert "Yes, curtail" in html and 'value="ERCOT EEA2"' in html
    assert 'id="no-bookings"' in html  # the fixture's nodes hold no booking
    # The site, its 3 nodes (none retired) and 20 GPUs.
    assert page.context["sites"] == [{"site": site, "nodes": 3, "in_fleet": 3}]
    assert f"({site.slug})" in html
    site.refresh_from_db()
    assert site.status == "active"
    assert not StatusChange.objects.filter(site=site).exists()

    done = admin_client.post(url, {**selected, "confirmed": "yes"})

    assert done.status_code == 302
    site.refresh_from_db()
    assert site.status == "curtailed"
    assert StatusChange.objects.get(site=site).reason == "ERCOT EEA2"
    # Returning to service asks nothing: it takes nothing from anyone.
    admin_client.post(url, {"action": "return_to_service", "_selected_action": [site.pk]})
    site.refresh_from_db()
    assert site.status == "active"


@pytest.mark.parametrize(
    ("action", "says"),
    [
        ("curtail", "this stops sales only"),
        ("set_maintenance", "Running workloads are not stopped by this"),
        ("retire", "Final: the site leaves the fleet"),
    ],
)
def test_a_site_action_lists_the_bookings_at_the_site_before_it_is_taken(
    admin_client, market, org, action, says
):
    site, _ = market
    now = timezone.now()
    running = book_at_market(org, start=now, hours=4, gpus=8, active=True)
    later = book_at_market(org, start=now + timedelta(days=2), hours=3, gpus=8)
    url = reverse("admin:inventory_site_changelist")

    page = admin_client.post(
        url, {"action": action, "_selected_action": [site.pk], "index": 0, "reason": "storm"}
    )

    assert page.status_code == 200
    html = page.content.decode()
    assert says in html and 'value="storm"' in html
    assert 'id="site-bookings"' in html
    for reservation in (running, later):
        assert reservation.public_id in html
    assert html.count(org.name) == 2
    assert page.context["sites"] == [{"site": site, "nodes": 2, "in_fleet": 2}]
    site.refresh_from_db()
    assert site.status == "active"
    assert not StatusChange.objects.filter(site=site).exists()


def test_retiring_a_site_with_nodes_in_the_fleet_is_refused_once_confirmed(admin_client, inventory):
    site = inventory["site"]
    gone = SiteFactory(slug="old-mine")
    node = NodeFactory(site=gone, hostname="old-001", gpus=2)
    status_change(action="retire", node=node, actor=None, actor_label="t", reason="EOL")
    url = reverse("admin:inventory_site_changelist")
    selected = {"action": "retire", "_selected_action": [site.pk, gone.pk], "reason": "lease"}

    page = admin_client.post(url, {**selected, "index": 0})

    assert "Yes, retire" in page.content.decode()
    assert page.context["sites"] == [
        {"site": site, "nodes": 3, "in_fleet": 3},
        {"site": gone, "nodes": 1, "in_fleet": 0},
    ]
    assert not StatusChange.objects.filter(site__in=[site, gone]).exists()

    done = admin_client.post(url, {**selected, "confirmed": "yes"})

    texts = [m.message for m in get_messages(done.wsgi_request)]
    assert texts[0].startswith("Cannot retire site tx-abilene (from active to retired): 3 of")
    assert texts[1] == f"Retired: {gone}."
    assert Site.objects.get(pk=site.pk).status == "active"
    assert Site.objects.get(pk=gone.pk).status == "retired"


def test_issuing_a_token_shows_the_secret_once_and_stores_its_hash(admin_client, inventory):
    b = inventory["nodes"][1]

    response = admin_client.post(
        reverse("admin:inventory_node_changelist"),
        {"action": "issue_token", "_selected_action": [b.pk], "reason": "rack agent"},
    )

    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    secret = re.search(r'<code class="secret">(nt_[^<]+)</code>', response.content.decode())[1]
    token = NodeToken.objects.get(node=b)
    assert token.secret_hash == token_hash(secret)
    assert token.label == "rack agent"
    assert (
        secret
        not in admin_client.get(reverse("admin:inventory_nodetoken_changelist")).content.decode()
    )


def test_revoking_tokens_in_the_admin(admin_client, inventory):
    token = NodeToken.objects.get()

    admin_client.post(
        reverse("admin:inventory_nodetoken_changelist"),
        {"action": "revoke", "_selected_action": [token.pk]},
    )

    token.refresh_from_db()
    assert token.revoked_at is not None


def test_revoking_tokens_records_who_and_counts_only_those_it_revoked(admin_client, inventory):
    from django.contrib.admin.models import LogEntry

    live = NodeToken.objects.get()
    token, _ = services.node_token_issue(node=live.node, label="spare")
    services.node_token_revoke(token=token)
    revoked_at = NodeToken.objects.get(pk=token.pk).revoked_at

    response = admin_client.post(
        reverse("admin:inventory_nodetoken_changelist"),
        {"action": "revoke", "_selected_action": [live.pk, token.pk]},
        follow=True,
    )

    assert "Revoked 1 token(s)." in response.content.decode()  # not 2: one was revoked before
    assert NodeToken.objects.get(pk=token.pk).revoked_at == revoked_at
    tokens = LogEntry.objects.filter(content_type__model="nodetoken")
    (entry,) = tokens.filter(object_id=str(live.pk))
    assert (entry.user.username, entry.get_change_message()) == ("admin", "Revoked")
    assert not tokens.filter(object_id=str(token.pk)).exists()


def test_the_site_page_shows_its_capacity_summary(admin_client, inventory):
    site = inventory["site"]

    page = admin_client.get(reverse("admin:inventory_site_change", args=[site.pk]))

    html = page.content.decode()
    assert 'id="capacity-summary"' in html
    rows = {row["gpu_model"]: row for row in page.context["capacity"]}
    assert rows == {
        "h100-sxm-80gb": {
            "gpu_model": "h100-sxm-80gb",
            "gpu_model_name": "NVIDIA H100 SXM 80GB",
            "total": 16,
            "unhealthy": 2,
            "available": 8,
            "draining": 8,
            "maintenance": 0,
            "offline": 0,
            "retired": 0,
        },
        "l40s-48gb": {
            "gpu_model": "l40s-48gb",
            "gpu_model_name": "NVIDIA L40S",
            "total": 4,
            "unhealthy": 0,
            "available": 0,
            "draining": 0,
            "maintenance": 0,
            "offline": 4,
            "retired": 0,
        },
    }
    assert re.search(
        r'data-gpu-model="l40s-48gb">.*?data-status="offline">4<.*?data-status="total">4<',
        html,
        re.S,
    )


def test_capacity_summary_is_one_query(django_assert_num_queries, inventory):
    with django_assert_num_queries(1):
        site_capacity_summary(site=inventory["site"])


def test_site_list_annotates_gpu_totals(inventory):
    site = site_list_with_capacity().get(pk=inventory["site"].pk)

    # Available: the 6 GPUs of abl-001 that have not failed (its 2 failed ones are not sold),
    # as the API's availability counts them; abl-002 drains and abl-003 is offline.
    assert (site.gpu_total, site.gpu_available) == (20, 6)


def test_the_site_list_counts_as_available_what_the_api_counts_as_healthy(admin_client, inventory):
    site = inventory["site"]
    Site.objects.filter(pk=site.pk).update(status="active")
    start = timezone.now() + timedelta(days=3)
    offered = site_availability(site=site, starts_at=start, ends_at=start + timedelta(hours=1))
    listed = admin_client.get(reverse("admin:inventory_site_changelist")).context["cl"]

    row = next(s for s in listed.result_list if s.pk == site.pk)
    assert row.gpu_available == sum(a.healthy_gpus for a in offered) == 6


def test_the_site_changelist_does_not_query_per_row(admin_client, django_assert_max_num_queries):
    for _ in range(5):
        NodeFactory(gpus=2)
    url = reverse("admin:inventory_site_changelist")
    admin_client.get(url)  # warm the session and content types

    with django_assert_max_num_queries(10):
        response = admin_client.get(url)

    assert response.context["cl"].result_count == 5


def test_a_non_staff_user_cannot_open_the_admin(client):
    client.force_login(UserFactory(is_staff=False))

    response = client.get(reverse("admin:inventory_node_changelist"))

    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


def test_an_overlapping_maintenance_window_is_a_form_error_not_a_crash(admin_client, inventory):
    b = inventory["nodes"][1]
    existing = MaintenanceWindow.objects.get(node=b)
    start = existing.period.lower + timedelta(hours=1)
    url = reverse("admin:inventory_maintenancewindow_add")

    response = admin_client.post(
        url,
        {
            "node": b.pk,
            "period_0": start.strftime("%Y-%m-%d %H:%M:%S"),
            "period_1": (start + timedelta(hours=3)).strftime("%Y-%m-%d %H:%M:%S"),
            "reason": "overlaps",
        },
    )

    assert response.status_code == 200
    assert response.context["adminform"].form.errors
    assert MaintenanceWindow.objects.filter(node=b).count() == 1


def test_staff_can_plan_a_maintenance_window_in_the_admin(admin_client, admin_user, inventory):
    a = inventory["nodes"][0]
    start = timezone.now().replace(microsecond=0) + timedelta(days=3)

    response = admin_client.post(
        reverse("admin:inventory_maintenancewindow_add"),
        {
            "node": a.pk,
            "period_0": start.strftime("%Y-%m-%d %H:%M:%S"),
            "period_1": (start + timedelta(hours=2)).strftime("%Y-%m-%d %H:%M:%S"),
            "reason": "BIOS update",
        },
    )

    assert response.status_code == 302
    window = MaintenanceWindow.objects.get(node=a)
    assert (window.period.lower, window.period.upper) == (start, start + timedelta(hours=2))
    assert window.created_by == admin_user
