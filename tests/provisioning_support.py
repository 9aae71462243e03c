"""Set-up shared by the provisioning tests (in-process and with a real Celery worker).

Reservations are booked through the real reservation_create (pricing, placement, the
exclusion constraint); only the funding decision is opened up (market_helpers.allow_all_funding),
since these tests are about the lifecycle, not money.
"""

import base64
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.utils import timezone

from inventory.models import GpuModel, Node, Site
from marketplace.models import Reservation
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate


def ssh_key(key_type: str = "ssh-ed25519", body: bytes = bytes(range(32))) -> str:
    """A well-formed OpenSSH public key line (the key material need not be a real point)."""
    blob = b"".join(len(part).to_bytes(4, "big") + part for part in (key_type.encode(), body))
    return f"{key_type} {base64.b64encode(blob).decode()} dev@laptop"


@dataclass
class Market:
    site: Site
    gpu_model: GpuModel
    nodes: list[Node]

    def book(
        self,
        *,
        gpu_count: int = 1,
        starts_at: datetime | None = None,
        seconds: int = 3600,
        workload: dict | None = None,
        organization=None,
    ) -> Reservation:
        start = starts_at or timezone.now()
        return reservation_create(
            organization=organization or OrganizationFactory(),
            gpu_model=self.gpu_model.slug,
            gpu_count=gpu_count,
            starts_at=start,
            ends_at=start + timedelta(seconds=seconds),
            tier="on_demand",
            site=self.site.slug,
            workload=workload,
        )


def market_create(*, nodes: int = 2, gpus: int = 8) -> Market:
    gpu_model = GpuModelFactory()
    make_rate(gpu_model, "2.5000")
    make_policy()
    site = SiteFactory()
    return Market(
        site=site, gpu_model=gpu_model, nodes=make_nodes(site, gpu_model, nodes, gpus=gpus)
    )


def statuses(reservation: Reservation) -> list[str]:
    return list(reservation.transitions.order_by("at", "id").values_list("to_status", flat=True))
