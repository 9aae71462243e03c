"""Marking GPUs failed in the admin moves or ends the reservations on them, so it asks first:
a page lists those reservations (only those on the GPUs selected) and what failing does to
them, and nothing changes until staff confirm it there with a reason, which the customers
read (it was done at once, with "Marked failed from the admin" when no reason was typed)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from inventory.models import Gpu, GpuHealth, GpuHealthChange, Outage
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
)

pytestmark = pytest.mark.django_db
URL = reverse("admin:inventory_gpu_changelist")


def _nothing_failed() -> None:
    assert not Gpu.objects.exclude(health=GpuHealth.OK).exists()
    assert not Outage.objects.exists()
    assert not GpuHealthChange.objects.exists()


@pytest.fixture
def booked(market, org):
    """A running reservation on 2 GPUs and a later one, overlapping it, on 2 others of the
    same node."""
    running = book_at_market(org, start=timezone.now(), hours=4, gpus=2, active=True)
    node_id = running.allocations.values_list("node_id", flat=True).first()
    later = book_at_market(org, start=timezone.now() + timedelta(hours=1), gpus=2)
    assert set(later.allocations.values_list("node_id", flat=True)) == {node_id}
    assert not set(later.allocations.values_list("gpu_id", flat=True)) & set(
        running.allocations.values_list("gpu_id", flat=True)
    )
    return running, later


def test_it_lists_the_reservations_on_the_selected_gpus_and_changes_nothing(
    admin_client, org, booked
):
    running, later = booked
    gpu = running.allocations.order_by("gpu__index").first().gpu

    page = admin_client.post(
        URL, {"action": "mark_failed", "_selected_action": [gpu.pk], "reason": "xid 79"}
    )

    assert page.status_code == 200
    html = page.content.decode()
    assert [(row["node"], row["booking"].reservation, row["booking"].gpus)
            for row in page.context["bookings"]] == [
        (gpu.node.hostname, running.public_id, 1)
    ]  # fmt: skip
    assert later.public_id not in html  # on other GPUs of the node
    assert org.name in html and "ends as failed" in html
    assert 'name="confirmed" value="yes"' in html and 'value="xid 79"' in html
    _nothing_failed()


def test_confirmed_without_a_reason_it_asks_again_and_changes_nothing(admin_client, booked):
    running, _ = booked
    gpu = running.allocations.order_by("gpu__index").first().gpu

    page = admin_client.post(
        URL,
        {"action": "mark_failed", "_selected_action": [gpu.pk], "confirmed": "yes",
         "reason": "  "},
    )  # fmt: skip

    assert page.status_code == 200
    assert "Give a reason to mark a GPU failed." in page.content.decode()
    assert running.public_id in page.content.decode()
    _nothing_failed()


def test_confirmed_with_a_reason_the_gpu_fails_with_it(admin_client, admin_user, booked):
    running, later = booked
    gpu = running.allocations.order_by("gpu__index").first().gpu

    response = admin_client.post(
        URL,
        {"action": "mark_failed", "_selected_action": [gpu.pk], "confirmed": "yes",
         "reason": "xid 79"},
    )  # fmt: skip

    assert response.status_code == 302
    gpu.refresh_from_db()
    assert (gpu.health, gpu.health_reason) == (GpuHealth.FAILED, "marked failed by staff: xid 79")
    assert list(GpuHealthChange.objects.values_list("gpu_id", "actor_label")) == [
        (gpu.pk, admin_user.get_username())
    ]
    assert list(Outage.objects.values_list("gpu_id", "ended_at")) == [(gpu.pk, None)]
    assert Gpu.objects.filter(health=GpuHealth.FAILED).count() == 1
