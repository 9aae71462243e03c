from datetime import timedelta
from functools import partial

import pytest
from django.utils import timezone

from config.errors import Conflict, InvalidTransition, ValidationFailed
from inventory import services
from inventory.models import (
    MaintenanceWindow,
    Node,
    NodeStatus,
    NodeToken,
    Outage,
    Site,
    SiteStatus,
    StatusChange,
)
from tests.factories import NodeFactory, SiteFactory, UserFactory

pytestmark = pytest.mark.django_db

N, S = NodeStatus, SiteStatus

STAFF_NODE_SERVICES = {
    "drain": (partial(services.status_change, action="drain"), N.DRAINING),
    "set_maintenance": (partial(services.status_change, action="set_maintenance"), N.MAINTENANCE),
    "return_to_service": (partial(services.status_change, action="return_to_service"), N.AVAILABLE),
    "retire": (partial(services.status_change, action="retire"), N.RETIRED),
}
NODE_ALLOWED = {
    ("drain", N.AVAILABLE),
    ("set_maintenance", N.AVAILABLE),
    ("set_maintenance", N.DRAINING),
    ("set_maintenance", N.OFFLINE),
    ("return_to_service", N.DRAINING),
    ("return_to_service", N.MAINTENANCE),
    ("retire", N.AVAILABLE),
    ("retire", N.DRAINING),
    ("retire", N.MAINTENANCE),
    ("retire", N.OFFLINE),
}
NODE_CASES = [(action, status) for action in STAFF_NODE_SERVICES for status in N.values]

SITE_SERVICES = {
    "activate": (partial(services.status_change, action="activate"), S.ACTIVE),
    "curtail": (partial(services.status_change, action="curtail"), S.CURTAILED),
    "set_maintenance": (partial(services.status_change, action="set_maintenance"), S.MAINTENANCE),
    "return_to_service": (partial(services.status_change, action="return_to_service"), S.ACTIVE),
    "retire": (partial(services.status_change, action="retire"), S.RETIRED),
}
SITE_ALLOWED = {
    ("activate", S.COMMISSIONING),
    ("curtail", S.ACTIVE),
    ("set_maintenance", S.ACTIVE),
    ("set_maintenance", S.CURTAILED),
    ("return_to_service", S.CURTAILED),
    ("return_to_service", S.MAINTENANCE),
    ("retire", S.COMMISSIONING),
    ("retire", S.ACTIVE),
    ("retire", S.CURTAILED),
    ("retire", S.MAINTENANCE),
}
SITE_CASES = [(action, status) for action in SITE_SERVICES for status in S.values]


def test_the_tables_in_the_tests_match_the_services_tables():
    service_pairs = {
        (action, source)
        for action, transition in services.NODE_TRANSITIONS.items()
        if action in STAFF_NODE_SERVICES
        for source in transition.sources
    }
    assert service_pairs == NODE_ALLOWED
    site_pairs = {
        (action, source)
        for action, transition in services.SITE_TRANSITIONS.items()
        for source in transition.sources
    }
    assert site_pairs == SITE_ALLOWED


@pytest.mark.parametrize(("action", "from_status"), sorted(NODE_ALLOWED))
def test_it_allows_node_transition_and_records_who_and_why(action, from_status):
    service, to_status = STAFF_NODE_SERVICES[action]
    node = NodeFactory(status=from_status, gpus=1)
    staff = UserFactory(username="ops-alice")

    result = service(node=node, actor=staff, reason="fan replaced")

    node.refresh_from_db()
    assert result.status == to_status
    assert node.status == to_status
    assert node.status_changed_at is not None
    change = StatusChange.objects.get(node=node)
    assert (change.from_status, change.to_status) == (from_status, to_status)
    assert change.actor == staff
    assert change.actor_label == "ops-alice"
    assert change.reason == "fan replaced"
    assert change.site is None


@pytest.mark.parametrize(
    ("action", "from_status"), [c for c in NODE_CASES if c not in NODE_ALLOWED]
)
def test_it_refuses_node_transition_and_changes_nothing(action, from_status):
    service, to_status = STAFF_NODE_SERVICES[action]
    node = NodeFactory(status=from_status, gpus=1)
    before = Node.objects.get(pk=node.pk)

    with pytest.raises(InvalidTransition) as refused:
        service(node=node, actor=UserFactory(), reason="try")

    message = refused.value.message
    assert f"(from {from_status} to {to_status})" in message
    assert node.hostname in message
    if from_status == to_status:
        assert f"it is already {from_status}" in message
    elif from_status == N.RETIRED:
        assert "a retired node cannot come back" in message
    else:
        sources = ", ".join(sorted(services.NODE_TRANSITIONS[action].sources))
        assert f"applies only to nodes that are {sources}" in message
    after = Node.objects.get(pk=node.pk)
    assert (after.status, after.status_changed_at, after.updated_at) == (
        before.status,
        before.status_changed_at,
        before.updated_at,
    )
    assert StatusChange.objects.count() == 0


@pytest.mark.parametrize(("action", "from_status"), sorted(SITE_ALLOWED))
def test_it_allows_site_transition_and_records_who_and_why(action, from_status):
    service, to_status = SITE_SERVICES[action]
    site = SiteFactory(status=from_status)
    staff = UserFactory(username="ops-bob")

    result = service(site=site, actor=staff, reason="grid operator call")

    site.refresh_from_db()
    assert result.status == to_status
    assert site.status == to_status
    change = StatusChange.objects.get(site=site)
    assert (change.from_status, change.to_status) == (from_status, to_status)
    assert (change.actor, change.actor_label, change.reason) == (
        staff,
        "ops-bob",
        "grid operator call",
    )
    assert change.node is None


@pytest.mark.parametrize(
    ("action", "from_status"), [c for c in SITE_CASES if c not in SITE_ALLOWED]
)
def test_it_refuses_site_transition_and_changes_nothing(action, from_status):
    service, to_status = SITE_SERVICES[action]
    site = SiteFactory(status=from_status)
    before = Site.objects.get(pk=site.pk)

    with pytest.raises(InvalidTransition) as refused:
        service(site=site, actor=UserFactory(), reason="try")

    assert f"(from {from_status} to {to_status})" in refused.value.message
    if from_status == to_status:
        assert f"it is already {from_status}" in refused.value.message
    elif from_status == S.RETIRED:
        assert "a retired site cannot come back" in refused.value.message
    after = Site.objects.get(pk=site.pk)
    assert (after.status, after.updated_at) == (before.status, before.updated_at)
    assert StatusChange.objects.count() == 0


def test_it_refuses_to_retire_a_site_with_live_nodes():
    site = SiteFactory(status=S.ACTIVE)
    NodeFactory(site=site, status=N.RETIRED, gpus=0)
    NodeFactory(site=site, status=N.MAINTENANCE, gpus=0)

    with pytest.raises(InvalidTransition, match="1 of its nodes are not retired"):
        services.status_change(action="retire", site=site, actor=UserFactory(), reason="lease ends")

    site.refresh_from_db()
    assert site.status == S.ACTIVE
    assert StatusChange.objects.count() == 0


def test_it_revokes_agent_tokens_when_a_node_retires():
    node = NodeFactory(gpus=0)
    token, _ = services.node_token_issue(node=node, label="agent")

    services.status_change(action="retire", node=node, actor=UserFactory(), reason="end of life")

    token.refresh_from_db()
    assert token.revoked_at is not None
    with pytest.raises(InvalidTransition):
        services.node_token_issue(node=node, label="again")
    assert NodeToken.objects.filter(node=node).count() == 1


def test_a_system_change_is_labelled_without_a_user():
    node = NodeFactory(gpus=0)

    services.status_change(
        action="drain", node=node, actor=None, actor_label="system: curtailment", reason="grid"
    )

    change = StatusChange.objects.get(node=node)
    assert (change.actor, change.actor_label) == (None, "system: curtailment")


def test_it_refuses_a_change_without_reason_or_actor():
    node = NodeFactory(gpus=0)

    with pytest.raises(ValidationFailed) as no_reason:
        services.status_change(action="drain", node=node, actor=UserFactory(), reason="  ")
    with pytest.raises(ValidationFailed) as no_actor:
        services.status_change(action="drain", node=node, actor=None, reason="why not")

    assert no_reason.value.field == "reason"
    assert no_actor.value.field == "actor_label"
    node.refresh_from_db()
    assert node.status == N.AVAILABLE
    assert StatusChange.objects.count() == 0


def test_staff_cannot_declare_an_offline_node_available():
    node = NodeFactory(status=N.OFFLINE, gpus=0)

    with pytest.raises(
        InvalidTransition,
        match="'return to service' applies only to nodes that are draining, maintenance",
    ):
        services.status_change(
            action="return_to_service", node=node, actor=UserFactory(), reason="looks fine"
        )

    node.refresh_from_db()
    assert node.status == N.OFFLINE


class TestMaintenanceWindow:
    def test_it_creates_a_half_open_window(self):
        node = NodeFactory(gpus=0)
        start = timezone.now().replace(microsecond=0) + timedelta(days=1)

        window = services.maintenance_window_create(
            node=node, start=start, end=start + timedelta(hours=4), reason="firmware"
        )

        window.refresh_from_db()
        assert (window.period.lower, window.period.upper) == (start, start + timedelta(hours=4))
        assert window.period.bounds == "[)"

    def test_it_refuses_an_overlapping_window_and_keeps_the_first(self):
        node = NodeFactory(gpus=0)
        start = timezone.now() + timedelta(days=1)
        services.maintenance_window_create(
            node=node, start=start, end=start + timedelta(hours=4), reason="firmware"
        )

        with pytest.raises(Conflict) as overlap:
            services.maintenance_window_create(
                node=node,
                start=start + timedelta(hours=3),
                end=start + timedelta(hours=5),
                reason="cabling",
            )

        assert overlap.value.code == "maintenance_overlap"
        assert MaintenanceWindow.objects.filter(node=node).count() == 1

    def test_back_to_back_windows_do_not_overlap(self):
        node = NodeFactory(gpus=0)
        start = timezone.now() + timedelta(days=1)
        services.maintenance_window_create(
            node=node, start=start, end=start + timedelta(hours=4), reason="firmware"
        )

        services.maintenance_window_create(
            node=node, start=start + timedelta(hours=4), end=start + timedelta(hours=5), reason="x"
        )

        assert MaintenanceWindow.objects.filter(node=node).count() == 2

    def test_it_refuses_a_window_that_ends_before_it_starts(self):
        node = NodeFactory(gpus=0)
        start = timezone.now()

        with pytest.raises(ValidationFailed):
            services.maintenance_window_create(node=node, start=start, end=start, reason="x")

        assert MaintenanceWindow.objects.count() == 0
        assert Outage.objects.count() == 0

    def test_it_refuses_a_window_on_a_retired_node_read_under_its_lock(self):
        node = NodeFactory(gpus=0)
        stale = Node.objects.get(pk=node.pk)  # loaded before the node retired
        services.status_change(action="retire", node=node, actor=None, actor_label="t", reason="x")
        start = timezone.now() + timedelta(days=1)

        with pytest.raises(ValidationFailed) as refused:
            services.maintenance_window_create(
                node=stale, start=start, end=start + timedelta(hours=1), reason="fw"
            )

        assert (refused.value.code, refused.value.field) == ("node_retired", "node")
        assert refused.value.status_code == 400
        assert MaintenanceWindow.objects.count() == 0

    def test_it_refuses_a_window_that_has_ended_and_plans_one_under_way(self):
        node = NodeFactory(gpus=0)
        now = timezone.now()

        with pytest.raises(ValidationFailed) as refused:
            services.maintenance_window_create(
                node=node, start=now - timedelta(hours=2), end=now, reason="fw"
            )
        assert (refused.value.code, refused.value.field) == ("window_in_past", "period")
        assert MaintenanceWindow.objects.count() == 0

        window = services.maintenance_window_create(
            node=node, start=now - timedelta(hours=2), end=now + timedelta(hours=1), reason="fw"
        )
        assert MaintenanceWindow.objects.get().pk == window.pk


@pytest.mark.parametrize("action", ["mark_offline", "resume", "explode"])
def test_staff_cannot_take_a_system_move_or_an_unknown_action(action):
    node = NodeFactory(status=N.AVAILABLE if action != "resume" else N.OFFLINE, gpus=1)
    before = Node.objects.get(pk=node.pk)

    with pytest.raises(ValidationFailed) as refused:
        services.status_change(action=action, node=node, actor=UserFactory(), reason="try")

    assert (refused.value.code, refused.value.field) == ("unknown_action", "action")
    assert Node.objects.get(pk=node.pk).status == before.status
    assert StatusChange.objects.count() == 0


def test_a_status_change_names_a_node_or_a_site_not_both():
    node = NodeFactory(gpus=1)
    with pytest.raises(TypeError):
        services.status_change(
            action="retire", node=node, site=node.site, actor=UserFactory(), reason="x"
        )
    with pytest.raises(TypeError):
        services.status_change(action="retire", actor=UserFactory(), reason="x")
    assert StatusChange.objects.count() == 0
