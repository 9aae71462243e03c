"""A failed GPU's work moves to a healthy one even with a curtailment ahead at its site: the
move adds no load there (the failed GPU's leaves as the new one's arrives)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.utils import timezone

from inventory.models import GpuHealth
from inventory.telemetry import gpu_health_apply
from marketplace.models import Curtailment, ReservationStatus
from marketplace.services.curtailment import curtailment_announce
from marketplace.services.gpu_failures import gpu_failures_handle
from tests.marketplace.api_fixtures import (  # noqa: F401 (fixtures requested by name)
    allow_all_funding,
    book_at_market,
    market,
    org,
)

pytestmark = pytest.mark.django_db


def test_a_protected_reservation_on_a_failed_gpu_is_moved_not_ended(market, org):
    site, _ = market
    now = timezone.now()
    r = book_at_market(org, tier="on_demand", start=now, hours=6, active=True)
    curtailment_announce(
        site=site, shed_at=now + timedelta(hours=3), until=now + timedelta(hours=4),
        reason="EEA",
    )  # fmt: skip
    curtailment = Curtailment.objects.get()
    takes_before = list(curtailment.takes.values_list("pk", flat=True))
    failed = r.allocations.order_by("gpu__index").first().gpu
    gpu_health_apply(gpu=failed, health=GpuHealth.FAILED, reason="xid 79", actor_label="t", now=now)

    gpu_failures_handle()

    r.refresh_from_db()
    assert r.status == ReservationStatus.PROVISIONING  # moved, restarting on its new GPU
    live = r.allocations.filter(is_live=True)
    assert live.count() == 2 and not live.filter(gpu=failed).exists()
    # a move sells nothing in the window
    assert list(curtailment.takes.values_list("pk", flat=True)) == takes_before
