"""Staff see GPU health and telemetry in the admin, return or fail GPUs with a reason, and edit
the health rules."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from inventory import telemetry
from inventory.models import Gpu, GpuHealth, GpuHealthChange, GpuMinute, HealthRules, Outage
from tests.factories import NodeFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def gpu():
    return NodeFactory(gpus=2, hostname="abl-001").gpus.get(index=1)


def test_the_gpu_and_node_pages_show_per_minute_telemetry(admin_client, gpu):
    minute = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=2)
    GpuMinute.objects.create(
        gpu_id=gpu.pk,
        minute=minute,
        samples=2,
        temperature_c_max=71,
        power_w_avg=612.4,
        utilization_pct_avg=97.5,
        memory_used_mib_max=74211,
    )
    page = admin_client.get(reverse("admin:inventory_gpu_change", args=[gpu.pk])).content.decode()
    node_page = admin_client.get(
        reverse("admin:inventory_node_change", args=[gpu.node_id])
    ).content.decode()

    row = f"<td>{minute:%Y-%m-%d %H:%M}</td><td>gpu1</td><td>2</td><td>98 %</td>"
    assert row + "<td>74211 MiB</td><td>612 W</td><td>71 °C</td>" in page
    assert row in node_page


def test_staff_mark_a_gpu_failed_and_return_it_with_a_reason(admin_client, gpu):
    url = reverse("admin:inventory_gpu_changelist")
    admin_client.post(
        url,
        {"action": "mark_failed", "_selected_action": [gpu.pk], "confirmed": "yes",
         "reason": "fans dead"},
    )  # fmt: skip
    gpu.refresh_from_db()
    assert (gpu.health, gpu.health_reason) == (
        GpuHealth.FAILED,
        "marked failed by staff: fans dead",
    )
    assert Outage.objects.get(gpu=gpu).ended_at is None

    # No reason: refused, nothing changes.
    admin_client.post(url, {"action": "return_to_service", "_selected_action": [gpu.pk]})
    assert Gpu.objects.get(pk=gpu.pk).health == GpuHealth.FAILED

    admin_client.post(
        url,
        {"action": "return_to_service", "_selected_action": [gpu.pk], "reason": "fans replaced"},
    )
    gpu.refresh_from_db()
    assert gpu.health == GpuHealth.OK
    assert Outage.objects.get(gpu=gpu).ended_at is not None
    assert list(GpuHealthChange.objects.filter(gpu=gpu).values_list("to_health", "reason")) == [
        ("ok", "fans replaced"),
        ("failed", "marked failed by staff: fans dead"),
    ]


def test_health_cannot_be_typed_into_the_gpu_form(admin_client, gpu):
    url = reverse("admin:inventory_gpu_change", args=[gpu.pk])
    admin_client.post(
        url, {"node": gpu.node_id, "index": 1, "serial": gpu.serial, "health": "failed"}
    )
    assert Gpu.objects.get(pk=gpu.pk).health == GpuHealth.OK


def test_staff_edit_the_rules_and_they_apply_at_once(admin_client):
    rules = HealthRules.current()
    telemetry._rules()  # cached
    url = reverse("admin:inventory_healthrules_change", args=[rules.pk])
    form = {
        "failing_events": "79",
        "over_temp_c": 85,
        "over_temp_minutes": 3,
        "degraded_corrected_errors": 5,
        "fail_on_uncorrectable_ecc": "on",
        "fail_on_row_remap_failure": "on",
        "fail_on_unreachable": "on",
        "degrade_on_pending_remap": "on",
    }
    response = admin_client.post(url, form)
    assert response.status_code == 302
    current = telemetry._rules()
    assert (current.failing_event_codes(), current.over_temp_c, current.over_temp_minutes) == (
        {"79"},
        85,
        3,
    )
    bad = admin_client.post(url, {**form, "over_temp_c": 20})
    assert bad.status_code == 200  # the form's error
    assert HealthRules.current().over_temp_c == 85
    assert admin_client.get(reverse("admin:inventory_healthrules_add")).status_code == 403


def test_staff_queue_a_node_burn_in_and_read_its_output(admin_client):
    from inventory.burn_in import burn_in_lease, burn_in_report
    from inventory.models import BurnIn
    from inventory.services import status_change

    node = NodeFactory(gpus=2, hostname="abl-009")
    node.site.burn_in_command = "dcgmi diag -r 2"
    node.site.save()
    status_change(action="set_maintenance", node=node, actor=None, actor_label="ops", reason="fans")
    admin_client.post(
        reverse("admin:inventory_node_changelist"),
        {"action": "burn_in", "_selected_action": [node.pk], "reason": "fans replaced"},
    )
    burn_in = BurnIn.objects.get(node=node)
    assert (burn_in.command, burn_in.reason, burn_in.gpu_indexes) == (
        "dcgmi diag -r 2",
        "fans replaced",
        [],
    )
    burn_in_lease(node=node)
    burn_in_report(
        node=node, burn_in_id=burn_in.pk, exit_code=226, timed_out=False, output="Diag: FAIL"
    )
    page = admin_client.get(reverse("admin:inventory_burnin_change", args=[burn_in.pk]))
    assert page.status_code == 200
    assert "Diag: FAIL" in page.content.decode()
    assert admin_client.get(reverse("admin:inventory_burnin_changelist")).status_code == 200
