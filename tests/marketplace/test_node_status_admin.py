"""Staff taking nodes out of service see whose bookings they touch first, and a node whose GPUs
are booked from now on is not retired (its running work would be left without an agent)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import threading
from datetime import timedelta

import pytest
from django.contrib.messages import get_messages
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from config.errors import InvalidTransition, NotAvailable
from inventory.models import Node, NodeStatus, NodeToken, StatusChange
from inventory.services import node_token_issue, status_change
from marketplace.models import ReservationStatus
from marketplace.services.transitions import reservation_transition
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
    owner,
)

pytestmark = pytest.mark.django_db
S = ReservationStatus
URL = reverse("admin:inventory_node_changelist")


def _book(org, *, start, hours, gpus=8, active=False):
    return book_at_market(org, start=start, hours=hours, gpus=gpus, active=active)


def _node_of(reservation) -> Node:
    return Node.objects.get(pk=reservation.allocations.values_list("node_id", flat=True)[0])


def test_a_node_action_lists_the_bookings_it_touches_before_it_is_taken(admin_client, market, org):
    now = timezone.now()
    running = _book(org, start=now, hours=4, active=True)
    later = _book(org, start=now + timedelta(days=2), hours=3)
    nodes = list(Node.objects.order_by("pk"))
    StatusChange.objects.all().delete()

    page = admin_client.post(
        URL,
        {"action": "set_maintenance", "_selected_action": [n.pk for n in nodes], "index": 0,
         "reason": "PDU swap"},
    )  # fmt: skip
    assert page.status_code == 200
    html = page.content.decode()
    for reservation in (running, later):
        assert reservation.public_id in html and org.name in html
    assert "Running workloads are not stopped" in html and 'value="PDU swap"' in html
    assert not StatusChange.objects.exists()  # nothing is done before it is confirmed
    assert set(Node.objects.values_list("status", flat=True)) == {NodeStatus.AVAILABLE}

    done = admin_client.post(
        URL,
        {"action": "set_maintenance", "_selected_action": [n.pk for n in nodes],
         "confirmed": "yes", "reason": "PDU swap"},
    )  # fmt: skip
    assert done.status_code == 302
    assert set(Node.objects.values_list("status", flat=True)) == {NodeStatus.MAINTENANCE}
    assert set(StatusChange.objects.values_list("reason", flat=True)) == {"PDU swap"}


def test_a_node_without_bookings_says_so(admin_client, market):
    node = Node.objects.order_by("pk").first()
    page = admin_client.post(
        URL, {"action": "drain", "_selected_action": [node.pk], "index": 0, "reason": ""}
    )
    assert 'id="no-bookings"' in page.content.decode()


def test_a_node_booked_from_now_on_is_not_retired(admin_client, market, org):
    now = timezone.now()
    running = _book(org, start=now, hours=4, active=True)
    node = _node_of(running)
    node_token_issue(node=node, label="agent")
    with pytest.raises(InvalidTransition) as refused:
        status_change(action="retire", node=node, actor=None, actor_label="t", reason="EOL")
    assert refused.value.code == "node_booked" and "8 of its GPUs are booked" in str(refused.value)
    node.refresh_from_db()
    assert node.status == NodeStatus.AVAILABLE
    assert NodeToken.objects.filter(node=node, revoked_at=None).exists()

    # From the admin too: the refusal is reported, the other (free) node is retired.
    free = Node.objects.exclude(pk=node.pk).get()
    done = admin_client.post(
        URL,
        {"action": "retire", "_selected_action": [node.pk, free.pk], "confirmed": "yes",
         "reason": "EOL"},
    )  # fmt: skip
    texts = [m.message for m in get_messages(done.wsgi_request)]
    assert texts[0].startswith(f"Cannot retire node {node.hostname}: 8 of its GPUs")
    assert texts[1] == f"Retired: {free.hostname}."
    assert Node.objects.get(pk=node.pk).status == NodeStatus.AVAILABLE


def test_a_node_whose_bookings_ended_is_retired(market, org):
    done = _book(org, start=timezone.now(), hours=2, active=True)
    for to in (S.RELEASING, S.COMPLETED):  # stopped early: its GPUs are free from now on
        done = reservation_transition(reservation=done, to_status=to, cause="t", actor_label="t")
    node = _node_of(done)
    status_change(action="drain", node=node, actor=None, actor_label="t", reason="EOL")
    retired = status_change(action="retire", node=node, actor=None, actor_label="t", reason="EOL")
    assert retired.status == NodeStatus.RETIRED


@pytest.mark.django_db(transaction=True)
def test_a_retirement_waits_for_a_booking_in_flight_and_then_refuses(market, org):
    """The booking has locked the node and written its allocations but not committed: the
    retirement waits on the node's lock, then sees the booking and refuses."""
    from django.db import transaction

    booked, commit, results = threading.Event(), threading.Event(), {}

    def book():
        try:
            with transaction.atomic():
                booking = _book(org, start=timezone.now() + timedelta(hours=1), hours=2)
                results["node"] = _node_of(booking)
                booked.set()
                commit.wait(10)
        finally:
            connection.close()

    def retire(node):
        try:
            status_change(action="retire", node=node, actor=None, actor_label="t", reason="EOL")
            results["retire"] = "retired"
        except (InvalidTransition, NotAvailable) as exc:
            results["retire"] = exc.code
        finally:
            connection.close()

    booking = threading.Thread(target=book)
    booking.start()
    assert booked.wait(10)
    node = results["node"]
    retiring = threading.Thread(target=retire, args=(node,))
    retiring.start()
    retiring.join(0.5)
    assert retiring.is_alive()  # waiting on the node's lock
    commit.set()
    booking.join(10)
    retiring.join(10)
    assert results["retire"] == "node_booked"
    assert Node.objects.get(pk=node.pk).status == NodeStatus.AVAILABLE
