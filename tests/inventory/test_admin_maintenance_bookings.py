"""A maintenance window planned in the admin over booked GPUs lists those bookings and is saved
only once staff acknowledge them; a window over nothing booked saves as before."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from inventory.models import MaintenanceWindow, Node
from inventory.services import maintenance_window_create, status_change
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
)

pytestmark = pytest.mark.django_db
ADD = reverse("admin:inventory_maintenancewindow_add")
FMT = "%Y-%m-%d %H:%M:%S"


def _form(node, start, end, reason="PDU swap", **extra) -> dict:
    return {"node": node.pk, "period_0": start.strftime(FMT), "period_1": end.strftime(FMT),
            "reason": reason, **extra}  # fmt: skip


def _booked(org, start, hours=3):
    reservation = book_at_market(org, start=start, hours=hours, gpus=8)
    node = Node.objects.get(pk=reservation.allocations.values_list("node_id", flat=True)[0])
    return reservation, node


def test_a_window_over_bookings_lists_them_and_waits_for_an_acknowledgement(
    admin_client, admin_user, market, org
):
    start = (timezone.now() + timedelta(days=2)).replace(microsecond=0)
    reservation, node = _booked(org, start)

    page = admin_client.post(
        ADD, _form(node, start + timedelta(hours=1), start + timedelta(hours=5))
    )

    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="window-bookings"' in html
    assert reservation.public_id in html and org.name in html
    assert "neither stops nor moves them" in html
    assert "acknowledge_bookings" in page.context["adminform"].form.errors
    assert 'type="checkbox" name="acknowledge_bookings"' in html
    assert not MaintenanceWindow.objects.exists()

    saved = admin_client.post(
        ADD,
        _form(node, start + timedelta(hours=1), start + timedelta(hours=5),
              acknowledge_bookings="on"),
    )  # fmt: skip

    assert saved.status_code == 302
    window = MaintenanceWindow.objects.get(node=node)
    assert window.period.lower == start + timedelta(hours=1)
    assert window.created_by == admin_user


def test_a_window_clear_of_the_bookings_saves_without_asking(admin_client, market, org):
    start = (timezone.now() + timedelta(days=2)).replace(microsecond=0)
    _, node = _booked(org, start, hours=3)

    # [start+3h, start+5h) touches the booking's end but does not overlap it (half-open).
    response = admin_client.post(
        ADD, _form(node, start + timedelta(hours=3), start + timedelta(hours=5))
    )

    assert response.status_code == 302
    assert MaintenanceWindow.objects.filter(node=node).count() == 1


def test_moving_a_window_onto_a_booking_asks_again_but_editing_its_reason_does_not(
    admin_client, market, org
):
    start = (timezone.now() + timedelta(days=2)).replace(microsecond=0)
    reservation, node = _booked(org, start)
    window = maintenance_window_create(
        node=node, start=start - timedelta(hours=4), end=start - timedelta(hours=2), reason="fw"
    )
    url = reverse("admin:inventory_maintenancewindow_change", args=[window.pk])

    moved = admin_client.post(url, _form(node, start, start + timedelta(hours=1), "fw"))

    assert moved.status_code == 200
    assert reservation.public_id in moved.content.decode()
    window.refresh_from_db()
    assert window.period.lower == start - timedelta(hours=4)  # unchanged

    MaintenanceWindow.objects.filter(pk=window.pk).delete()
    over = maintenance_window_create(
        node=node, start=start, end=start + timedelta(hours=1), reason="fw"
    )
    url = reverse("admin:inventory_maintenancewindow_change", args=[over.pk])
    shown = admin_client.get(url)
    assert reservation.public_id in shown.content.decode()  # the saved window lists them too

    renamed = admin_client.post(url, _form(node, start, start + timedelta(hours=1), "firmware"))

    assert renamed.status_code == 302
    over.refresh_from_db()
    assert over.reason == "firmware"


@pytest.mark.parametrize(
    "period",
    [
        {"period_0": "", "period_1": ""},
        {"period_0": "2030-01-01 10:00:00", "period_1": ""},
        {"period_0": "2030-01-01 10:00:00", "period_1": "2030-01-01 10:00:00"},
        {"period_0": "2030-01-01 10:00:00", "period_1": "2030-01-01 09:00:00"},
    ],
)
def test_a_window_without_both_ends_or_ending_before_it_starts_is_a_form_error(
    admin_client, market, period
):
    node = Node.objects.order_by("pk").first()

    response = admin_client.post(ADD, {"node": node.pk, "reason": "x", **period})

    assert response.status_code == 200
    assert "period" in response.context["adminform"].form.errors
    assert not MaintenanceWindow.objects.exists()


def test_a_window_on_a_retired_node_is_a_form_error(admin_client, market):
    node = Node.objects.order_by("pk").first()
    status_change(action="retire", node=node, actor=None, actor_label="t", reason="EOL")
    start = (timezone.now() + timedelta(days=2)).replace(microsecond=0)

    response = admin_client.post(ADD, _form(node, start, start + timedelta(hours=2)))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert errors["node"] == [f"Node {node.hostname} is retired: it gets no maintenance window."]
    assert not MaintenanceWindow.objects.exists()


def test_a_window_that_has_already_ended_is_a_form_error_but_one_under_way_is_saved(
    admin_client, market
):
    node = Node.objects.order_by("pk").first()
    now = timezone.now().replace(microsecond=0)

    ended = admin_client.post(ADD, _form(node, now - timedelta(hours=5), now - timedelta(hours=3)))

    assert ended.status_code == 200
    assert ended.context["adminform"].form.errors["period"] == [
        "This window has already ended: a maintenance window plans downtime to come."
    ]
    assert not MaintenanceWindow.objects.exists()

    under_way = admin_client.post(
        ADD, _form(node, now - timedelta(hours=1), now + timedelta(hours=1))
    )

    assert under_way.status_code == 302
    assert MaintenanceWindow.objects.filter(node=node).count() == 1


@pytest.mark.parametrize("why", ["ended", "node retired"])
def test_an_ended_window_or_one_on_a_retired_node_keeps_its_time_and_its_reason_is_editable(
    admin_client, market, why
):
    node = Node.objects.order_by("pk").first()
    now = timezone.now()
    # Saved before the rules (or before its node retired): written directly, as such rows are.
    if why == "ended":
        period = (now - timedelta(days=3, microseconds=7), now - timedelta(days=2))
    else:
        period = (now + timedelta(days=2), now + timedelta(days=3))
        status_change(action="retire", node=node, actor=None, actor_label="t", reason="EOL")
    window = MaintenanceWindow.objects.create(node=node, period=period, reason="fw")
    url = reverse("admin:inventory_maintenancewindow_change", args=[window.pk])

    page = admin_client.get(url)

    assert page.status_code == 200
    assert {"node", "period"} <= set(page.context["adminform"].readonly_fields)
    assert set(page.context["adminform"].form.fields) == {"reason", "acknowledge_bookings"}

    other = Node.objects.order_by("pk").last()
    saved = admin_client.post(url, {"reason": "firmware 2.1", "node": other.pk})

    assert saved.status_code == 302
    window.refresh_from_db()
    assert window.reason == "firmware 2.1"
    assert (window.node_id, window.period.lower, window.period.upper) == (node.pk, *period)


def test_an_ended_window_lists_no_bookings_even_over_work_still_running(admin_client, market, org):
    start = timezone.now()
    reservation, node = _booked(org, start, hours=4)
    # It overlapped the booking's first microsecond, and has ended by the time it is opened.
    window = MaintenanceWindow.objects.create(
        node=node, period=(start - timedelta(hours=1), start + timedelta(microseconds=1)),
        reason="fw",
    )  # fmt: skip

    page = admin_client.get(reverse("admin:inventory_maintenancewindow_change", args=[window.pk]))

    assert page.status_code == 200
    assert reservation.public_id not in page.content.decode()
    assert 'id="window-bookings"' not in page.content.decode()
