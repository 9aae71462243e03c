"""allocation.gpu_model_id (the model-first search index) always equals the GPU's node's model."""

from decimal import Decimal

import pytest
from django.db import connection

from inventory.models import Gpu, Node
from marketplace.models import Allocation, Reservation
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, rng, tomorrow

pytestmark = pytest.mark.django_db

T1, T2 = tomorrow(), tomorrow(10)


def _reservation(node) -> Reservation:
    return Reservation.objects.create(
        organization=OrganizationFactory(),
        gpu_model=node.gpu_model,
        site=node.site,
        gpu_count=1,
        tier="on_demand",
        starts_at=T1,
        ends_at=T2,
        currency="usd",
        price_per_gpu_hour=Decimal("1"),
        total_amount=Decimal("1"),
    )


def _stored_model_ids() -> dict[int, int]:
    return dict(Allocation.objects.values_list("pk", "gpu_model_id"))


@pytest.fixture
def node():
    (n,) = make_nodes(SiteFactory(), GpuModelFactory(), 1, gpus=2)
    return n


def test_an_allocation_written_without_its_model_gets_the_gpus_node_model(node):
    other = GpuModelFactory(slug="l40s-48gb", name="L40S")
    gpu = node.gpus.get(index=0)
    orm = Allocation.objects.create(
        reservation=_reservation(node), gpu=gpu, node=node, period=rng(T1, T2)
    )
    # A wrong model given by the writer is corrected, not stored.
    wrong = Allocation.objects.create(
        reservation=_reservation(node),
        gpu=node.gpus.get(index=1),
        node=node,
        gpu_model=other,
        period=rng(T1, T2),
    )
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO marketplace_allocation (reservation_id, gpu_id, node_id, period,"
            " is_live, created_at) VALUES (%s, %s, %s, tstzrange(%s, %s, '[)'), false, now())"
            " RETURNING id",
            [_reservation(node).pk, gpu.pk, node.pk, T1, T2],
        )
        (raw_id,) = cur.fetchone()
    assert _stored_model_ids() == {
        orm.pk: node.gpu_model_id,
        wrong.pk: node.gpu_model_id,
        raw_id: node.gpu_model_id,
    }


def test_it_follows_a_node_that_changes_model_and_a_gpu_that_moves(node):
    allocation = Allocation.objects.create(
        reservation=_reservation(node), gpu=node.gpus.get(index=0), node=node, period=rng(T1, T2)
    )
    l40s = GpuModelFactory(slug="l40s-48gb", name="L40S")
    Node.objects.filter(pk=node.pk).update(gpu_model=l40s)
    assert _stored_model_ids() == {allocation.pk: l40s.pk}

    (a100_node,) = make_nodes(node.site, GpuModelFactory(slug="a100", name="A100"), 1, gpus=1)
    Gpu.objects.filter(pk=allocation.gpu_id).update(node=a100_node, index=7)
    assert _stored_model_ids() == {allocation.pk: a100_node.gpu_model_id}


def test_every_allocation_the_service_makes_carries_its_nodes_model(node):
    from marketplace import funding
    from marketplace.services.reservations import reservation_create
    from tests.marketplace.market_helpers import make_policy, make_rate

    make_rate(node.gpu_model, "2.0000")
    make_policy()
    previous = funding.funding_gate()
    funding.funding_gate_register(funding.AllowAllFundingGate())
    try:
        reservation_create(
            organization=OrganizationFactory(),
            gpu_model=node.gpu_model.slug,
            gpu_count=2,
            starts_at=T1,
            ends_at=T2,
            tier="on_demand",
        )
    finally:
        funding.funding_gate_register(previous)
    with connection.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(*) FILTER (WHERE a.gpu_model_id = n.gpu_model_id)"
            " FROM marketplace_allocation a JOIN inventory_gpu g ON g.id = a.gpu_id"
            " JOIN inventory_node n ON n.id = g.node_id"
        )
        assert cur.fetchone() == (2, 2)
