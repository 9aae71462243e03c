"""The extension's confirmation sent twice (a double click on "Extend", a reload of the
answer) extends once and then says it is done, not that the end is no longer later. Without a
browser."""

from datetime import timedelta
from decimal import Decimal

import pytest

from marketplace.models import Role
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    member_client,
    tomorrow,
)

pytestmark = pytest.mark.django_db


def test_the_confirmation_sent_twice_extends_once_and_says_so(allow_all_funding):  # noqa: F811
    make_policy()
    h100 = GpuModelFactory()
    make_nodes(SiteFactory(), h100, 1, gpus=8)
    make_rate(h100, "2.0000")
    org = OrganizationFactory()
    start = tomorrow()
    reservation = reservation_create(
        organization=org, gpu_model=h100.slug, gpu_count=2, starts_at=start,
        ends_at=start + timedelta(hours=2), tier="on_demand",
    )  # fmt: skip
    client = member_client(org, Role.MEMBER)
    path = f"/reservations/{reservation.public_id}/extend"
    new_end = start + timedelta(hours=5)
    sent = {"ends_at": new_end.strftime("%Y-%m-%dT%H:%M"), "confirm": "True"}

    first = client.post(path, sent)
    second = client.post(path, sent, follow=True)

    assert first.status_code == 302
    assert second.status_code == 200
    assert "Already extended: it ends at" in second.content.decode()
    reservation.refresh_from_db()
    assert reservation.ends_at == new_end
    assert reservation.total_amount == Decimal("20.00")  # 2 GPUs × 2.00 × 5 h, once
