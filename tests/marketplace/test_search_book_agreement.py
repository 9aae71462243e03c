"""What search offers can be booked, at the price it showed; what it does not offer at a site is
refused there. Checked over seeded random markets (partly booked nodes, failed GPUs, a node in
maintenance, a site curtailed for a window) and random requests, each booking tried and rolled
back so every request sees the same market."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import random
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from django.utils import timezone

from config.errors import NotAvailable
from inventory.models import GpuHealth, MaintenanceWindow
from marketplace.models import Tier
from marketplace.selectors.availability import AvailabilityQuery, availability_search
from marketplace.services.curtailment import curtailment_announce
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (
    allow_all_funding,  # noqa: F401 (fixture requested by name)
    make_nodes,
    make_policy,
    make_rate,
    rng,
)

pytestmark = pytest.mark.django_db
H = timedelta(hours=1)


class _RolledBack(Exception):
    pass


def _market(seed: int):
    """Two sites of one model: 8-GPU nodes at one, 4- and 8-GPU nodes at the other, some of it
    booked, a failed GPU, a node in maintenance; with `seed` odd, a curtailment at the first."""
    random_ = random.Random(seed)
    model = GpuModelFactory()
    make_policy()
    make_rate(model, "2.0000")
    big = SiteFactory(slug="big-1", region="us-central", pue=Decimal("1.15"))
    mixed = SiteFactory(slug="mixed-1", region="us-east", pue=Decimal("1.30"))
    nodes = make_nodes(big, model, 3, gpus=8) + make_nodes(mixed, model, 2, gpus=4)
    nodes += make_nodes(mixed, model, 1, gpus=8)
    base = timezone.now().replace(microsecond=0) + 2 * H
    others = OrganizationFactory()
    for _ in range(random_.randint(3, 8)):
        start = base + random_.randint(0, 30) * H
        try:
            reservation_create(
                organization=others,
                gpu_model=model.slug,
                gpu_count=random_.choice([1, 2, 3, 4, 8]),
                starts_at=start,
                ends_at=start + random_.randint(1, 12) * H,
                tier=random_.choice([Tier.ON_DEMAND, Tier.INTERRUPTIBLE]),
                site=random_.choice([big.slug, mixed.slug]),
            )
        except NotAvailable:
            pass
    failed = random_.choice(nodes).gpus.order_by("?").first()
    failed.health = GpuHealth.FAILED
    failed.save(update_fields=["health"])
    down = random_.choice(nodes)
    lo = base + random_.randint(0, 24) * H
    MaintenanceWindow.objects.create(node=down, period=rng(lo, lo + 6 * H), reason="fans")
    if seed % 2:
        # 1 GPU's draw of over-shed to sell (the victims: everything interruptible there).
        curtailment_announce(
            site=big, shed_at=base + 10 * H, until=base + 16 * H, reason="EEA", target_mw=None
        )
    return model, [big, mixed], base, random_


def _book(org, model, site, query):
    """Book the request at `site` and roll it back: the reservation, or NotAvailable."""
    try:
        with transaction.atomic():
            reservation = reservation_create(
                organization=org,
                gpu_model=model.slug,
                gpu_count=query.gpu_count,
                starts_at=query.starts_at,
                ends_at=query.ends_at,
                tier=query.tier,
                term=query.term,
                site=site.slug,
            )
            raise _RolledBack(reservation)
    except _RolledBack as done:
        return done.args[0]


@pytest.mark.parametrize("seed", range(6))
def test_every_offer_books_at_its_price_and_no_offer_means_refused(seed, allow_all_funding):
    model, sites, base, random_ = _market(seed)
    buyer = OrganizationFactory()
    for _ in range(12):
        tier = random_.choice([Tier.ON_DEMAND, Tier.INTERRUPTIBLE, Tier.RESERVED])
        start = (
            base + random_.randint(0, 30) * H + random_.choice([0, 15, 30]) * timedelta(minutes=1)
        )
        hours = 24 * 7 if tier == Tier.RESERVED else random_.randint(1, 10)
        query = AvailabilityQuery(
            gpu_count=random_.choice([1, 2, 3, 4, 5, 8, 9, 12, 16, 24]),
            starts_at=start,
            ends_at=start + hours * H,
            tier=tier,
            term="1w" if tier == Tier.RESERVED else "none",
            gpu_model=model.slug,
        )
        offers = {offer.site.pk: offer for offer in availability_search(query)}
        for site in sites:
            offer = offers.get(site.pk)
            if offer is None:
                with pytest.raises(NotAvailable):
                    _book(buyer, model, site, query)
                continue
            booked = _book(buyer, model, site, query)
            assert booked.gpu_count == offer.gpu_count == query.gpu_count
            assert (booked.price_per_gpu_hour, booked.total_amount) == (
                offer.price_per_gpu_hour,
                offer.total,
            ), (site.slug, query)
            nodes = {a.node_id for a in booked.allocation_list}
            assert len(nodes) == offer.node_count, (site.slug, query)
