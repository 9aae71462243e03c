"""Shared set-up for the marketplace core tests (pricing, availability, reservations)."""

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from psycopg.types.range import Range

from marketplace import funding
from marketplace.models import PricingPolicy, RateCard, Reservation, Tier
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, NodeFactory

# Utilisation-neutral policy: slope 0, so prices depend on tier and term only.
NEUTRAL_POLICY = {
    "discount_1w_pct": Decimal("5"),
    "discount_1m_pct": Decimal("12"),
    "discount_3m_pct": Decimal("20"),
    "discount_1y_pct": Decimal("35"),
    "interruptible_discount_pct": Decimal("55"),
    "utilisation_pivot": Decimal("0.6"),
    "utilisation_slope": Decimal("0"),
    "floor_multiplier": Decimal("0.3"),
    "ceiling_multiplier": Decimal("1.5"),
}


def make_policy(**overrides) -> PricingPolicy:
    return PricingPolicy.objects.create(**{**NEUTRAL_POLICY, **overrides})


def make_rate(gpu_model, price: str, site=None, currency: str = "usd") -> RateCard:
    return RateCard.objects.create(
        gpu_model=gpu_model, site=site, price_per_gpu_hour=Decimal(price), currency=currency
    )


def make_nodes(site, gpu_model, count: int, gpus: int = 8, **kwargs) -> list:
    return [NodeFactory(site=site, gpu_model=gpu_model, gpus=gpus, **kwargs) for _ in range(count)]


def member_client(organization, role: str) -> HttpsClient:
    """A Django test client signed in as a new member of `organization` with `role`."""
    client = HttpsClient()
    client.force_login(MembershipFactory(organization=organization, role=role).user)
    return client


def tomorrow(hours: int = 0) -> datetime:
    """A whole hour about a day ahead, so periods are comfortably in the future."""
    base = (timezone.now() + timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
    return base + timedelta(hours=hours)


_ROWS_FROM = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
_rows_made = itertools.count()  # across calls, so a later call makes newer rows


def make_reservation_rows(
    organization, count: int, *, site, gpu_model, **fields
) -> list[Reservation]:
    """`count` reservations written straight to the table, oldest first, without allocations:
    enough for pages that list them. Each is created a second after the one before (created_at
    orders lists), apart from the clock."""
    start = tomorrow()
    defaults = {
        "gpu_count": 1, "tier": Tier.ON_DEMAND, "starts_at": start,
        "ends_at": start + timedelta(hours=1), "currency": "usd",
        "price_per_gpu_hour": Decimal("2.0000"), "total_amount": Decimal("2.00"),
    }  # fmt: skip
    rows = Reservation.objects.bulk_create(
        Reservation(
            organization=organization, gpu_model=gpu_model, site=site, **(defaults | fields)
        )
        for _ in range(count)
    )
    for row in rows:
        row.created_at = _ROWS_FROM + timedelta(seconds=next(_rows_made))
    Reservation.objects.bulk_update(rows, ["created_at"])
    return rows


def rng(start: datetime, end: datetime) -> Range:
    return Range(start, end, "[)")


@pytest.fixture
def allow_all_funding():
    """These tests are about GPUs, not money: let every organisation commit any spend.

    Billing registers its real gate at start-up; its own tests cover it.
    """
    previous = funding.funding_gate()
    funding.funding_gate_register(funding.AllowAllFundingGate())
    yield
    funding.funding_gate_register(previous)
