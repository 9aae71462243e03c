"""A GPU fails under an active reservation: the agent's heartbeat reports it, a real Celery
worker moves the reservation to a healthy GPU and restarts it, and the gap is not billed."""

from datetime import timedelta

import pytest

from agent import gpu_telemetry as t
from billing.services.usage import reservation_delivered_seconds
from inventory.models import Gpu, GpuHealth, Outage
from inventory.services import node_token_issue
from marketplace.models import Allocation, Reservation, ReservationOutage, ReservationStatus
from marketplace.services.gpu_failures import reservation_gpu_outages_close
from tests.agent.test_gpu_telemetry import fixture
from tests.clients import HttpsAPIClient
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)
from tests.provisioning_support import (  # noqa: F401 (the *_fixture names are fixtures)
    broker_fixture,
    driver_log_fixture,
    market_create,
    statuses,
    wait_for,
    worker_fixture,
)

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.usefixtures("allow_all_funding"),
]
S = ReservationStatus


def _status(reservation) -> str:
    return Reservation.objects.values_list("status", flat=True).get(pk=reservation.pk)


def test_a_failed_gpu_reported_by_the_agent_is_moved_by_the_worker(worker, driver_log):
    worker.start(beat=True, PROVISIONING_DISPATCH_INTERVAL_SECONDS="1")
    market = market_create(nodes=2, gpus=4)
    r = market.book(gpu_count=2)
    wait_for(lambda: _status(r) == S.ACTIVE, timeout=15, what="the reservation to be active")
    bad = Gpu.objects.get(
        pk=min(Allocation.objects.filter(reservation=r).values_list("gpu_id", flat=True))
    )
    _, secret = node_token_issue(node=bad.node, label="agent")
    # The agent's report: nvidia-smi's output for a GPU with uncorrectable ECC errors.
    report = t.parse_nvidia_smi_xml(fixture("nvidia_h100_uncorrectable_ecc.xml"))
    report["gpus"] = [{**report["gpus"][3], "index": bad.index}]

    agent = HttpsAPIClient()
    response = agent.post(
        "/api/v1/agent/heartbeat",
        {"telemetry": report},
        format="json",
        HTTP_AUTHORIZATION=f"Bearer {secret}",
    )
    assert response.status_code == 200

    failed_at = Outage.objects.get(gpu=bad).started_at
    wait_for(
        lambda: S.PROVISIONING in statuses(r)[3:] and _status(r) == S.ACTIVE,
        timeout=20,
        what="the worker to move and restart the reservation",
    )
    r.refresh_from_db()
    live = set(
        Allocation.objects.filter(reservation=r, is_live=True).values_list("gpu_id", flat=True)
    )
    assert bad.pk not in live and len(live) == 2
    assert Gpu.objects.get(pk=bad.pk).health == GpuHealth.FAILED
    assert driver_log(r) == ["prepare", "start", "prepare", "start"]
    reservation_gpu_outages_close()
    outage = ReservationOutage.objects.get(reservation=r)
    back = r.transitions.filter(to_status=S.ACTIVE).order_by("at").last().at
    assert (outage.started_at, outage.ended_at) == (failed_at, back)
    until = back + timedelta(seconds=60)
    assert reservation_delivered_seconds(reservation=r, until=until) == int(
        (until - r.activated_at).total_seconds()
    ) - int((back - failed_at).total_seconds())
