from decimal import Decimal

import pytest
from django.db import connection
from django.db.backends.postgresql.psycopg_any import DateTimeTZRange

from config.errors import NotAvailable
from inventory.models import Gpu, GpuHealth, MaintenanceWindow, Node, NodeStatus, Site, SiteStatus
from marketplace.models import Allocation
from marketplace.rules import NodeCapacity, choose_nodes
from marketplace.selectors import availability
from marketplace.selectors.availability import AvailabilityQuery
from marketplace.services import reservations
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
T1, T2 = tomorrow(), tomorrow(10)


@pytest.fixture
def h100():
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    return model


def book(h100, gpus):
    r = reservation_create(
        organization=OrganizationFactory(),
        gpu_model=h100.slug,
        gpu_count=gpus,
        starts_at=T1,
        ends_at=T2,
        tier="on_demand",
    )
    return sorted(Allocation.objects.filter(reservation=r).values_list("node_id", "gpu__index"))


def test_it_fills_the_partly_used_node_that_fits_best(h100):
    a, b, c = make_nodes(SiteFactory(), h100, 3)
    assert {n for n, _ in book(h100, 5)} == {a.pk}  # a: 3 free; b, c whole
    assert book(h100, 2) == [(a.pk, 5), (a.pk, 6)]  # a (3 free) fits best
    assert book(h100, 2) == [(b.pk, 0), (b.pk, 1)]  # a has 1 left: the next whole node
    assert book(h100, 1) == [(a.pk, 7)]  # the last free GPU of a, not a fresh one


def test_a_large_request_takes_whole_nodes_and_leaves_partly_used_ones_alone(h100):
    a, b, c = make_nodes(SiteFactory(), h100, 3)
    book(h100, 1)  # on a
    assert book(h100, 12) == [(b.pk, i) for i in range(8)] + [(c.pk, i) for i in range(4)]


def test_it_never_places_on_a_failed_gpu(h100):
    (node,) = make_nodes(SiteFactory(), h100, 1, gpus=2)
    Gpu.objects.filter(node=node, index=0).update(health=GpuHealth.FAILED)
    assert book(h100, 1) == [(node.pk, 1)]


def test_choose_nodes_prefers_the_fewest_free_that_fit_then_the_lowest_id():
    caps = [NodeCapacity(1, 8, 8), NodeCapacity(2, 8, 4), NodeCapacity(3, 8, 4)]
    assert choose_nodes(caps, 4) == [(2, 4)]
    assert choose_nodes(caps, 5) == [(1, 5)]
    assert choose_nodes(caps, 9) == []  # only one whole node
    assert choose_nodes([NodeCapacity(1, 8, 8), NodeCapacity(2, 8, 8)], 9) == [(1, 8), (2, 1)]
    assert choose_nodes([], 1) == []


def test_the_search_uses_the_period_first_partial_index():
    with connection.cursor() as cur:
        cur.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'allocation_live_period_idx'"
        )
        (indexdef,) = cur.fetchone()
    assert "gist (period, gpu_id)" in indexdef and "WHERE is_live" in indexdef


def _spoil(kind: str, node, site) -> None:
    """What may change between the read an offer was made from and the booking's node lock."""
    if kind == "node_draining":
        Node.objects.filter(pk=node.pk).update(status=NodeStatus.DRAINING)
    elif kind == "maintenance":
        MaintenanceWindow.objects.create(
            node=node, period=DateTimeTZRange(T1, T2, "[)"), reason="fans"
        )
    elif kind == "gpus_failed":
        Gpu.objects.filter(node=node).update(health=GpuHealth.FAILED)
    elif kind == "below_reliability":
        Node.objects.filter(pk=node.pk).update(reliability_30d=Decimal("0.5"))
    elif kind == "site_in_maintenance":
        Site.objects.filter(pk=site.pk).update(status=SiteStatus.MAINTENANCE)


@pytest.mark.parametrize(
    "kind",
    ["node_draining", "maintenance", "gpus_failed", "below_reliability", "site_in_maintenance"],
)
def test_an_offer_read_before_the_node_lock_is_checked_again_under_it(h100, monkeypatch, kind):
    site = SiteFactory()
    first, second = make_nodes(site, h100, 2, reliability_30d=Decimal("0.99"))
    query = AvailabilityQuery(
        gpu_count=2, starts_at=T1, ends_at=T2, tier="on_demand", min_reliability=Decimal("0.9")
    )
    offer = availability.site_model_offer(query=query, site=site, gpu_model=h100)
    assert offer.nodes[0].node_id == first.pk  # best fit: the lowest id of two whole nodes
    _spoil(kind, first, site)
    monkeypatch.setattr(reservations, "site_model_offer", lambda **kwargs: offer)

    def book_stale():
        return reservation_create(
            organization=OrganizationFactory(),
            gpu_model=h100.slug,
            gpu_count=2,
            starts_at=T1,
            ends_at=T2,
            tier="on_demand",
            site=site.slug,
            min_reliability=Decimal("0.9"),
        )

    if kind == "site_in_maintenance":  # no node of the site can take it now
        with pytest.raises(NotAvailable):
            book_stale()
        assert not Allocation.objects.exists()
        return
    reservation = book_stale()
    assert {a.node_id for a in Allocation.objects.filter(reservation=reservation)} == {second.pk}
