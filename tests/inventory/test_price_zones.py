"""Price zones and their price series: the database keeps one price per instant per zone."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import IntegrityError, transaction

from inventory.models import ZonePrice
from tests.factories import PriceZoneFactory

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 12, 7, 0, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _price(zone, start, end, price="40.00"):
    return ZonePrice.objects.create(
        zone=zone,
        starts_at=start,
        ends_at=end,
        price_per_mwh=Decimal(price),
        currency=zone.currency,
        source="test",
        received_at=T0,
    )


def test_it_refuses_overlapping_intervals_in_one_zone():
    zone = PriceZoneFactory()
    _price(zone, T0, T0 + HOUR)
    with pytest.raises(IntegrityError), transaction.atomic():
        _price(zone, T0 + HOUR / 2, T0 + 2 * HOUR)
    assert ZonePrice.objects.filter(zone=zone).count() == 1


def test_it_allows_adjacent_intervals_and_other_zones():
    zone, other = PriceZoneFactory(), PriceZoneFactory()
    _price(zone, T0, T0 + HOUR)
    _price(zone, T0 + HOUR, T0 + 2 * HOUR)  # half-open: touching is not overlapping
    _price(other, T0, T0 + HOUR)
    assert ZonePrice.objects.count() == 3


def test_it_refuses_an_interval_that_ends_before_it_starts():
    zone = PriceZoneFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        _price(zone, T0 + HOUR, T0)
