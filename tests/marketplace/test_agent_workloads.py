"""What the site agent reports with each heartbeat: a workload that exits while its
reservation is active ends the reservation (billing stops, the customer sees why), and the
answer carries the node's preemption notices."""

from datetime import timedelta

import pytest
from django.utils import timezone

from config.dates import iso_utc
from marketplace.models import Allocation, Reservation, ReservationStatus, Role
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.services import reservation_provision_step
from tests.clients import HttpsAPIClient
from tests.marketplace.market_helpers import (  # noqa: F401 (allow_all_funding is a fixture)
    allow_all_funding,
    member_client,
)
from tests.provisioning_support import agent_client, market_create, statuses

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus
URL = "/api/v1/agent/workloads"


@pytest.fixture
def running():
    """An active reservation and the node it runs on."""
    market = market_create(nodes=2, gpus=4)
    r = market.book(gpu_count=1, workload={"env": {"HF_TOKEN": "hf_secret_42"}})
    assert reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver()).outcome == (
        "active"
    )
    node = Allocation.objects.get(reservation=r, is_live=True).node
    other = next(n for n in market.nodes if n.pk != node.pk)
    return Reservation.objects.get(pk=r.pk), node, other, market


def _report(r, state: str, **extra) -> dict:
    return {
        "name": f"sy-{r.public_id}",
        "reservation": r.public_id,
        "state": state,
        **extra,
    }


def test_a_workload_killed_for_its_memory_says_so(running):
    r, node, _other, _ = running
    killed = _report(r, "exited", exit_code=137, finished_at="2026-12-06T10:31:02Z",
                     oom_killed=True, log_tail="loading shard 9 of 12")  # fmt: skip

    response = agent_client(node).post(URL, {"containers": [killed]}, format="json")

    assert response.status_code == 200
    r = Reservation.objects.get(pk=r.pk)
    assert r.status == S.FAILED
    assert r.status_reason.startswith(
        "The workload ran out of memory: killed with code 137 at 2026-12-06T10:31:02Z for "
        "using more memory than its share of the node; the reservation ended "
    )


def test_a_running_workload_changes_nothing(running):
    r, node, _other, _ = running
    response = agent_client(node).post(URL, {"containers": [_report(r, "running")]}, format="json")
    assert response.status_code == 200
    assert response.json() == {"notices": []}
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_a_workload_that_exited_ends_its_reservation_with_the_exit_shown(running, admin_client):
    r, node, _other, _ = running
    exited = _report(
        r,
        "exited",
        exit_code=137,
        finished_at="2026-12-06T10:31:02.5Z",
        log_tail="step 900 loss 0.31\nusing token hf_secret_42\nKilled",
    )

    response = agent_client(node).post(URL, {"containers": [exited]}, format="json")

    assert response.status_code == 200
    r = Reservation.objects.get(pk=r.pk)
    assert r.status == S.FAILED
    # Billing stops at the exit, never before it was last known running: here its activation,
    # the node's clock putting the exit two days before it.
    assert r.released_at == r.activated_at
    assert r.status_reason == (
        "The workload exited with code 137 at 2026-12-06T10:31:02.5Z; the reservation ended "
        "and the rest of its time is not charged. Last log lines:\n"
        "step 900 loss 0.31\nusing token [redacted]\nKilled"
    )
    assert statuses(r)[-2:] == [S.ACTIVE, S.FAILED]
    assert r.transitions.last().actor_label == "system: site agent"
    assert not Allocation.objects.filter(reservation=r, is_live=True).exists()

    # The customer sees it on the reservation's page, the secret still redacted.
    page = member_client(r.organization, Role.MEMBER).get(f"/reservations/{r.public_id}")
    text = page.content.decode()
    assert "The workload exited with code 137" in text
    assert "step 900 loss 0.31" in text and "using token [redacted]" in text
    assert "hf_secret_42" not in text
    # Staff see the same on the reservation's admin page (its reason and its history).
    admin_page = admin_client.get(f"/admin/marketplace/reservation/{r.pk}/change/")
    assert admin_page.status_code == 200
    assert admin_page.content.decode().count("The workload exited with code 137") == 2

    # Reported again at the next heartbeat: nothing more happens.
    again = agent_client(node).post(URL, {"containers": [exited]}, format="json")
    assert again.status_code == 200
    assert Reservation.objects.get(pk=r.pk).released_at == r.released_at


def test_another_nodes_agent_cannot_end_a_reservation(running):
    r, _node, other, _ = running
    response = agent_client(other).post(
        URL, {"containers": [_report(r, "exited", exit_code=1)]}, format="json"
    )
    assert response.status_code == 200
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_a_reservation_being_released_is_not_failed_by_its_stopping_container(running):
    r, node, _other, _ = running
    Reservation.objects.filter(pk=r.pk).update(status=S.RELEASING)
    agent_client(node).post(URL, {"containers": [_report(r, "exited", exit_code=0)]}, format="json")
    assert Reservation.objects.get(pk=r.pk).status == S.RELEASING


def test_the_answer_carries_the_preemption_notices_of_the_nodes_reservations(running):
    r, node, other, _ = running
    preempt_at = timezone.now() + timedelta(minutes=10)
    Reservation.objects.filter(pk=r.pk).update(
        preempt_at=preempt_at, preempt_reason="Grid curtailment requested by the utility."
    )

    response = agent_client(node).post(URL, {"containers": []}, format="json")

    assert response.json() == {
        "notices": [
            {
                "reservation": r.public_id,
                "container": f"sy-{r.public_id}",
                "preempt_at": iso_utc(preempt_at),
                "reason": "Grid curtailment requested by the utility.",
            }
        ]
    }
    assert agent_client(other).post(URL, {"containers": []}, format="json").json() == {
        "notices": []
    }


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "containers"),
        ({"containers": "all"}, "containers"),
        ({"containers": [{"name": "x", "reservation": "r", "state": "s" * 40}]}, "containers"),
        ({"containers": [{"name": "x", "state": "exited"}]}, "containers"),
    ],
)
def test_a_malformed_report_is_a_400_and_changes_nothing(running, body, field):
    r, node, _other, _ = running
    response = agent_client(node).post(URL, body, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["field"].startswith(field)
    assert Reservation.objects.get(pk=r.pk).status == S.ACTIVE


def test_without_a_node_token_the_report_is_refused(running):
    response = HttpsAPIClient().post(URL, {"containers": []}, format="json")
    assert response.status_code == 401
