"""Staff who may only view the inventory in the admin do not run its actions: draining,
retiring or issuing agent tokens for nodes, changing a site's status, failing GPUs and
revoking node tokens need the permission to change the model."""

import pytest
from django.contrib.admin.sites import site as admin_site
from django.contrib.auth.models import Permission
from django.urls import reverse

from inventory.models import (
    Gpu,
    HealthRules,
    Node,
    NodeStatus,
    NodeToken,
    PriceZone,
    Site,
    StatusChange,
)
from tests.clients import HttpsClient
from tests.factories import NodeFactory, UserFactory

pytestmark = pytest.mark.django_db

MODELS = [Site, Node, Gpu, NodeToken, PriceZone]


def _user(*codenames: str):
    user = UserFactory(username="support", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    return user


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.model_name)
def test_a_view_only_staff_member_is_offered_no_action(rf, model):
    request = rf.get("/")
    request.user = _user(f"view_{model._meta.model_name}")

    actions = admin_site._registry[model].get_actions(request)

    assert set(actions) <= {"delete_selected"}


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m._meta.model_name)
def test_staff_who_may_change_the_model_are_offered_its_actions(rf, model):
    request = rf.get("/")
    name = model._meta.model_name
    request.user = _user(f"view_{name}", f"change_{name}")

    actions = admin_site._registry[model].get_actions(request)

    assert set(admin_site._registry[model].actions) <= set(actions)


def test_a_view_only_staff_member_posting_a_retire_changes_nothing():
    node = NodeFactory(hostname="abl-009", gpus=2)
    client = HttpsClient()
    client.force_login(_user("view_node"))

    client.post(
        reverse("admin:inventory_node_changelist"),
        {"action": "retire", "_selected_action": [node.pk], "confirmed": "yes", "index": 0},
    )

    node.refresh_from_db()
    assert node.status == NodeStatus.AVAILABLE
    assert not StatusChange.objects.filter(node=node).exists()
    assert not NodeToken.objects.filter(node=node, revoked_at__isnull=False).exists()


def test_a_view_only_staff_member_cannot_add_the_health_rules():
    # With no rules saved yet, the add page was offered to anyone with staff access: a
    # view-only member could save rules that fail no GPU.
    user = _user("view_healthrules")
    client = HttpsClient()
    client.force_login(user)
    url = reverse("admin:inventory_healthrules_add")
    form = {"failing_events": "48", "over_temp_c": 130, "over_temp_minutes": 1440,
            "degraded_corrected_errors": 1000000}  # fmt: skip

    assert client.get(url).status_code == 403
    assert client.post(url, form).status_code == 403
    assert not HealthRules.objects.exists()

    user.user_permissions.add(Permission.objects.get(codename="add_healthrules"))
    assert client.post(url, form).status_code == 302
    assert HealthRules.objects.get().over_temp_c == 130
