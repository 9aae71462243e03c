from datetime import timedelta
from decimal import Decimal

import pytest

from config.errors import ValidationFailed
from inventory.models import Gpu, GpuHealth, MaintenanceWindow, NodeStatus, SiteStatus
from marketplace.models import Allocation
from marketplace.selectors.availability import (
    AvailabilityQuery,
    availability_search,
    site_availability,
)
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, rng, tomorrow

pytestmark = pytest.mark.django_db

T1, T2 = tomorrow(), tomorrow(10)


@pytest.fixture
def h100():
    model = GpuModelFactory()
    make_rate(model, "2.2000")
    make_policy()
    return model


def search(**kw):
    args = {"gpu_count": 1, "starts_at": T1, "ends_at": T2, "tier": "on_demand"}
    return availability_search(AvailabilityQuery(**{**args, **kw}))


def book(node, gpu_indexes, start=T1, end=T2, live=True):
    """Allocations without the service, to set up exact states."""
    from marketplace.models import Reservation

    reservation = Reservation.objects.create(
        organization=OrganizationFactory(),
        gpu_model=node.gpu_model,
        site=node.site,
        gpu_count=len(gpu_indexes),
        tier="on_demand",
        starts_at=start,
        ends_at=end,
        currency="usd",
        price_per_gpu_hour=Decimal("1"),
        total_amount=Decimal("1"),
    )
    for i in gpu_indexes:
        Allocation.objects.create(
            reservation=reservation,
            gpu=node.gpus.get(index=i),
            node=node,
            period=rng(start, end),
            is_live=live,
        )
    return reservation


def test_it_lists_one_offer_per_site_with_price_total_and_best_fit_nodes(h100):
    site = SiteFactory()
    a, b = make_nodes(site, h100, 2)
    book(a, [0, 1, 2, 3, 4])  # a has 3 free, b 8

    (offer,) = search(gpu_count=2)

    assert offer.site == site and offer.gpu_model == h100
    assert offer.placement == "single_node" and offer.node_count == 1
    assert [(n.node_id, n.free_gpus) for n in offer.nodes] == [(a.pk, 3), (b.pk, 8)]
    assert offer.fitting_node_count == 2
    assert offer.free_gpus == 11
    # 10 h × 2 GPUs; slope 0 so utilisation does not move the price.
    assert (offer.price_per_gpu_hour, offer.total) == (Decimal("2.2000"), Decimal("44.00"))
    assert offer.breakdown.utilisation == Decimal(5) / Decimal(16)


def test_allocations_overlapping_the_period_are_not_free_and_adjacent_ones_are(h100):
    site = SiteFactory()
    (node,) = make_nodes(site, h100, 1, gpus=4)
    book(node, [0], start=T1 - timedelta(hours=5), end=T1)  # ends as ours starts: free
    book(node, [1], start=T2, end=T2 + timedelta(hours=1))  # starts as ours ends: free
    book(node, [2], start=T2 - timedelta(seconds=1), end=T2 + timedelta(hours=1))  # overlaps
    book(node, [3], start=T1, end=T2, live=False)  # past/cancelled: does not count

    (offer,) = search(gpu_count=3)
    assert offer.free_gpus == 3
    assert search(gpu_count=4) == []


def test_a_maintenance_window_overlapping_the_period_removes_the_whole_node(h100):
    site = SiteFactory()
    a, b = make_nodes(site, h100, 2)
    MaintenanceWindow.objects.create(
        node=a, period=rng(T2 - timedelta(minutes=1), T2 + timedelta(hours=2)), reason="fans"
    )
    MaintenanceWindow.objects.create(
        node=b, period=rng(T2, T2 + timedelta(hours=2)), reason="adjacent, not overlapping"
    )
    (offer,) = search(gpu_count=8)
    assert [n.node_id for n in offer.nodes] == [b.pk]
    assert offer.free_gpus == 8


@pytest.mark.parametrize(
    "status", [NodeStatus.DRAINING, NodeStatus.MAINTENANCE, NodeStatus.OFFLINE, NodeStatus.RETIRED]
)
def test_nodes_that_are_not_available_are_not_listed(h100, status):
    site = SiteFactory()
    make_nodes(site, h100, 1, status=status)
    assert search() == []
    assert site_availability(site=site, starts_at=T1, ends_at=T2) == []


@pytest.mark.parametrize(
    "status",
    [SiteStatus.COMMISSIONING, SiteStatus.CURTAILED, SiteStatus.MAINTENANCE, SiteStatus.RETIRED],
)
def test_sites_that_are_not_active_are_not_listed(h100, status):
    make_nodes(SiteFactory(status=status), h100, 1)
    assert search() == []


def test_a_failed_gpu_is_not_free_and_a_degraded_one_is(h100):
    (node,) = make_nodes(SiteFactory(), h100, 1, gpus=2)
    Gpu.objects.filter(node=node, index=0).update(health=GpuHealth.FAILED)
    Gpu.objects.filter(node=node, index=1).update(health=GpuHealth.DEGRADED)
    (offer,) = search()
    assert offer.free_gpus == 1
    assert search(gpu_count=2) == []


def test_a_request_that_fits_one_node_is_never_split_over_partly_used_nodes(h100):
    site = SiteFactory()
    a, b = make_nodes(site, h100, 2)
    book(a, range(4))
    book(b, range(4))  # 8 free in total, but at most 4 on one node
    assert search(gpu_count=5) == []
    (offer,) = search(gpu_count=4)
    assert offer.placement == "single_node"


def test_a_request_larger_than_a_node_takes_whole_free_nodes_at_one_site(h100):
    site = SiteFactory()
    a, b, c = make_nodes(site, h100, 3)
    book(a, [0])  # a is no longer whole
    (offer,) = search(gpu_count=12)
    assert offer.placement == "cluster"
    assert offer.node_count == 2
    assert [(n.node_id, n.free_gpus) for n in offer.nodes] == [(b.pk, 8), (c.pk, 8)]
    assert offer.fitting_node_count == 2
    assert search(gpu_count=17) == []  # 23 GPUs free, but only 16 on whole nodes


def test_a_cluster_is_never_split_across_sites(h100):
    make_nodes(SiteFactory(), h100, 2)
    make_nodes(SiteFactory(), h100, 2)
    assert len(search(gpu_count=16)) == 2
    assert search(gpu_count=24) == []  # 32 GPUs exist, but no single site has 24


def test_a_request_bigger_than_any_site_gets_nothing(h100):
    make_nodes(SiteFactory(), h100, 1)
    assert search(gpu_count=9) == []


def test_it_filters_by_model_memory_region_site_and_max_price(h100):
    l40s = GpuModelFactory(slug="l40s-48gb", name="L40S", memory_gb=48)
    make_rate(l40s, "0.8500")
    us, eu = SiteFactory(region="us-central"), SiteFactory(region="eu-north")
    make_nodes(us, h100, 1)
    make_nodes(eu, l40s, 1)

    assert {o.gpu_model.slug for o in search()} == {"h100-sxm-80gb", "l40s-48gb"}
    assert [o.gpu_model.slug for o in search()] == ["l40s-48gb", "h100-sxm-80gb"]  # cheapest first
    assert [o.site for o in search(gpu_model="l40s-48gb")] == [eu]
    assert [o.site for o in search(min_gpu_memory_gb=80)] == [us]
    assert [o.site for o in search(region="eu-north")] == [eu]
    assert [o.site for o in search(site=us.slug)] == [us]
    assert [o.site for o in search(max_price_per_gpu_hour=Decimal("1.00"))] == [eu]
    assert search(max_price_per_gpu_hour=Decimal("0.50")) == []


def test_a_site_rate_card_overrides_the_default_price(h100):
    cheap = SiteFactory()
    make_rate(h100, "1.9000", site=cheap)
    make_nodes(cheap, h100, 1)
    make_nodes(SiteFactory(), h100, 1)
    offers = search()
    assert [o.price_per_gpu_hour for o in offers] == [Decimal("1.9000"), Decimal("2.2000")]
    assert offers[0].site == cheap


def test_a_model_without_a_rate_card_is_not_for_sale(h100):
    unpriced = GpuModelFactory(slug="mystery-gpu", name="Mystery", memory_gb=24)
    make_nodes(SiteFactory(), unpriced, 1)
    assert search() == []


def test_reserved_terms_are_priced_and_checked(h100):
    make_nodes(SiteFactory(), h100, 1)
    (offer,) = search(tier="reserved", term="1w", ends_at=T1 + timedelta(days=7))
    assert offer.price_per_gpu_hour == Decimal("2.0900")
    with pytest.raises(ValidationFailed):
        search(tier="reserved", term="1w")  # 10 hours is shorter than a week


def test_the_site_view_counts_free_gpus_by_model(h100):
    site = SiteFactory()
    a, b = make_nodes(site, h100, 2)
    book(a, [0, 1])
    Gpu.objects.filter(node=b, index=7).update(health=GpuHealth.FAILED)
    (row,) = site_availability(site=site, starts_at=T1, ends_at=T2)
    assert (row.gpu_model, row.nodes, row.healthy_gpus, row.free_gpus) == (h100, 2, 15, 13)
    assert (row.largest_free_on_one_node, row.whole_free_nodes) == (7, 0)


def test_it_refuses_a_bad_window(h100):
    with pytest.raises(ValidationFailed):
        search(ends_at=T1)
    with pytest.raises(ValidationFailed):
        search(gpu_count=0)


def test_the_demo_seed_prices_every_model_and_offers_capacity():
    from io import StringIO

    from django.core.management import call_command

    from marketplace.models import PricingPolicy, RateCard

    call_command("seed_demo", stdout=StringIO())
    call_command("seed_demo", stdout=StringIO())  # idempotent
    assert RateCard.objects.filter(site__isnull=True).count() == 6
    assert PricingPolicy.objects.count() == 1
    offers = search(gpu_model="h100-sxm-80gb")
    assert offers and all(o.price_per_gpu_hour > 0 for o in offers)


def _free_by_the_allocations(node, start, end) -> int:
    """What is free on `node` for [start, end), read from the allocations themselves."""
    taken = set(
        Allocation.objects.filter(
            node=node, is_live=True, period__overlap=rng(start, end)
        ).values_list("gpu_id", flat=True)
    )
    return sum(1 for g in node.gpus.all() if g.health != GpuHealth.FAILED and g.pk not in taken)


def test_the_gpus_busy_ranges_count_what_the_allocations_leave_free(h100):
    """The searches read each GPU's busy multirange (kept by triggers); it must count exactly
    the GPUs the live allocations themselves leave free."""
    from marketplace.selectors.availability import node_free_capacity

    l40s = GpuModelFactory(slug="l40s-48gb", name="L40S", memory_gb=48)
    make_rate(l40s, "0.8500")
    site = SiteFactory()
    a, b, c = make_nodes(site, h100, 3)
    (d,) = make_nodes(SiteFactory(), l40s, 1, gpus=4)
    book(a, [0, 1, 2, 7])  # GPU 7 fails below: booked and failed counts once
    book(b, range(8), start=T1 - timedelta(hours=1), end=T1 + timedelta(minutes=1))
    book(c, [5], start=T2, end=T2 + timedelta(hours=1))  # adjacent: free
    book(c, [6], start=T1, end=T2, live=False)  # history: free
    book(d, [0], live=False)
    Gpu.objects.filter(node=a, index=7).update(health=GpuHealth.FAILED)
    Gpu.objects.filter(node=d, index=3).update(health=GpuHealth.FAILED)
    Allocation.objects.filter(gpu__node=b).update(is_live=False)  # a cancellation: free again
    book(b, [3], start=T1 + timedelta(hours=2), end=T1 + timedelta(hours=3))

    capacities = node_free_capacity(site_id=site.pk, gpu_model_id=h100.pk, starts_at=T1, ends_at=T2)

    expected = {n.pk: _free_by_the_allocations(n, T1, T2) for n in (a, b, c)}
    assert expected == {a.pk: 4, b.pk: 7, c.pk: 8}
    assert {cap.node_id: cap.free for cap in capacities} == expected
    by_model = {o.gpu_model.slug: o.free_gpus for o in search(gpu_count=1)}
    assert by_model == {h100.slug: 19, l40s.slug: _free_by_the_allocations(d, T1, T2)}
    assert by_model[l40s.slug] == 3
