"""A customer's request followed into the Celery task it enqueued: a real worker, JSON logs."""

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import Reservation, ReservationStatus
from marketplace.provisioning.kicks import PROVISION_TASK
from tests.factories import OrganizationFactory
from tests.marketplace.api_fixtures import key_client
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (the *_fixture names are fixtures)
    broker_fixture,
    driver_log_fixture,
    market_create,
    wait_for,
    worker_fixture,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.usefixtures("allow_all_funding"),
]


def test_the_request_id_of_a_reservation_create_is_on_the_log_lines_of_its_provisioning_task(
    worker,
):
    worker.start(LOG_FORMAT="json")
    market = market_create(nodes=1, gpus=4)
    client = key_client(OrganizationFactory())
    now = timezone.now()

    response = client.post(
        "/api/v1/reservations",
        {
            "gpu_model": market.gpu_model.slug,
            "gpu_count": 1,
            "site": market.site.slug,
            "starts_at": now.isoformat(),  # starts now: its provisioning is enqueued on commit
            "ends_at": (now + timedelta(hours=1)).isoformat(),
        },
        format="json",
        HTTP_X_REQUEST_ID="trace-0123456789",
    )

    assert response.status_code == 201, response.content
    assert response["Request-Id"] == "trace-0123456789"
    reservation = Reservation.objects.get(public_id=response.json()["id"])
    wait_for(
        lambda: Reservation.objects.get(pk=reservation.pk).status == ReservationStatus.ACTIVE,
        timeout=20,
        what="the reservation to be active",
    )

    def traced_lines():
        lines = [
            json.loads(line)
            for line in worker.log_path.read_text().splitlines()
            if line.startswith("{") and line.endswith("}")
        ]
        return [line for line in lines if line["request_id"] == "trace-0123456789"], lines

    # The task logs its outcome after the commit that made the reservation active.
    wait_for(lambda: traced_lines()[0], timeout=10, what="the task's log lines")
    traced, lines = traced_lines()
    assert traced, "the worker logged nothing under the request's id"
    assert {line.get("task") for line in traced} == {PROVISION_TASK}
    assert all(set(line) >= {"time", "level", "logger", "message", "task_id"} for line in traced)
    # Lines of tasks no request enqueued carry "-".
    assert all(line["request_id"] in ("-", "trace-0123456789") for line in lines)
