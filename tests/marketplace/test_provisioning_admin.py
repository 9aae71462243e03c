"""Staff views of the provisioning records: read-only, linked to their reservation and node."""

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from marketplace.models import AgentJob, ProvisioningAttempt, ReservationOutage
from marketplace.provisioning.drivers import SimulatedDriver
from marketplace.provisioning.services import reservation_provision_step
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import market_create

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
SECRET = "s3cret-value-never-shown"  # in the agent job's payload only


@pytest.fixture
def records():
    market = market_create(nodes=1, gpus=4)
    node = market.nodes[0]
    r = market.book(workload={"ports": [8888]})
    assert reservation_provision_step(reservation_id=r.pk, driver=SimulatedDriver()).outcome == (
        "active"
    )
    now = timezone.now()
    job = AgentJob.objects.create(
        node=node, reservation=r, kind="stop", payload={"env": {"API_TOKEN": SECRET}}
    )
    outage = ReservationOutage.objects.create(
        reservation=r,
        node=node,
        started_at=now - timedelta(minutes=5),
        ended_at=now - timedelta(minutes=2),
        cause="missed_heartbeats",
    )
    return {
        "reservation": r,
        "node": node,
        "attempt": ProvisioningAttempt.objects.get(reservation=r),
        "agentjob": job,
        "reservationoutage": outage,
    }


@pytest.mark.parametrize("model", ["provisioningattempt", "agentjob", "reservationoutage"])
def test_the_changelist_and_change_page_render_with_links_to_reservation_and_node(
    admin_client, records, model
):
    obj = records["attempt" if model == "provisioningattempt" else model]
    reservation_url = reverse(
        "admin:marketplace_reservation_change", args=[records["reservation"].pk]
    )
    node_url = reverse("admin:inventory_node_change", args=[records["node"].pk])

    listing = admin_client.get(reverse(f"admin:marketplace_{model}_changelist"))
    page = admin_client.get(reverse(f"admin:marketplace_{model}_change", args=[obj.pk]))

    assert listing.status_code == 200 and page.status_code == 200
    for response in (listing, page):
        body = response.content.decode()
        assert f'href="{reservation_url}"' in body
        assert (f'href="{node_url}"' in body) == (model != "provisioningattempt")
        assert SECRET not in body


@pytest.mark.parametrize(
    ("model", "query"),
    [
        ("provisioningattempt", {"outcome": "succeeded", "kind": "provision"}),
        ("agentjob", {"status": "queued", "kind": "stop"}),
        ("reservationoutage", {"cause": "missed_heartbeats", "ended_at__isempty": "0"}),
    ],
)
def test_the_list_filters_and_search_find_the_record(admin_client, records, model, query):
    url = reverse(f"admin:marketplace_{model}_changelist")
    public_id = records["reservation"].public_id

    filtered = admin_client.get(url, query)
    searched = admin_client.get(url, {"q": public_id})
    missed = admin_client.get(url, {"q": "no-such-reservation"})

    assert filtered.status_code == 200 and searched.status_code == 200
    assert filtered.context["cl"].result_count == 1
    assert searched.context["cl"].result_count == 1
    assert missed.context["cl"].result_count == 0


def test_the_records_cannot_be_changed_added_or_deleted(admin_client, records):
    outage = records["reservationoutage"]
    change = reverse("admin:marketplace_reservationoutage_change", args=[outage.pk])
    delete = reverse("admin:marketplace_reservationoutage_delete", args=[outage.pk])

    assert admin_client.post(change, {"cause": "edited"}).status_code == 403
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    assert admin_client.get(reverse("admin:marketplace_agentjob_add")).status_code == 403
    outage.refresh_from_db()
    assert outage.cause == "missed_heartbeats"
    assert ReservationOutage.objects.count() == 1


def test_the_reservation_page_shows_its_outages_and_agent_jobs_read_only(admin_client, records):
    r = records["reservation"]
    response = admin_client.get(reverse("admin:marketplace_reservation_change", args=[r.pk]))
    body = response.content.decode()

    assert response.status_code == 200
    assert "missed_heartbeats" in body  # the outage inline
    assert "outages-TOTAL_FORMS" in body and "agent_jobs-TOTAL_FORMS" in body
    assert 'name="outages-0-cause"' not in body  # read-only: no input for it
    assert SECRET not in body


def test_a_request_id_from_a_customers_error_finds_the_agent_job_it_queued(admin_client, records):
    job = records["agentjob"]
    AgentJob.objects.filter(pk=job.pk).update(request_id="req_5c0e9a1b2c3d4e5f60718293")
    AgentJob.objects.create(node=records["node"], reservation=records["reservation"], kind="start",
                            generation=9, request_id="req_000000000000000000000000")  # fmt: skip
    url = reverse("admin:marketplace_agentjob_changelist")

    searched = admin_client.get(url, {"q": "req_5c0e9a1b2c3d4e5f60718293"})
    page = admin_client.get(reverse("admin:marketplace_agentjob_change", args=[job.pk]))

    assert [j.pk for j in searched.context["cl"].result_list] == [job.pk]
    assert "req_5c0e9a1b2c3d4e5f60718293" in page.content.decode()
