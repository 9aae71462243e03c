"""What is sold in a curtailment's window when a re-plan moves or stretches the window: a
booking sold out of the over-shed holds its room for all of its time in the new window.
Draws as in test_curtailment_megawatts.py: 0.805 kW per H100 at abilene-1."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from config.dates import iso_utc
from config.errors import NotAvailable
from marketplace.services.curtailment import curtailment_replan
from marketplace.services.reservations import reservation_extend
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    fresh_rate_limits,
    market,
    org,
    owner,
)
from tests.marketplace.test_curtailment_megawatts import _announce, _book, _victims, fleet  # noqa: F401

pytestmark = pytest.mark.django_db


def test_a_stretched_window_keeps_what_was_sold_across_its_old_end_sold(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw="0.002")  # r2 (3.22 kW): 1.22 kW over, one GPU at once
    old_until = curtailment.until
    across = _book(org, tier="on_demand", gpus=1, start=old_until - timedelta(hours=1), hours=2)
    assert _victims(curtailment) == {fleet["r2"].pk}

    # The call now lasts two hours more: the booking across the old end runs in the window
    # for two hours, not one, and its GPU's draw stays sold for all of them.
    replanned = curtailment_replan(
        curtailment=curtailment,
        shed_at=curtailment.shed_at,
        until=old_until + timedelta(hours=2),
        target_mw=Decimal("0.002"),
        reason="ERCOT stretched the call",
    )

    (take,) = replanned.takes.filter(reservation=across)
    assert (take.period.lower, take.period.upper) == (across.starts_at, across.ends_at)
    # 1.22 kW over, 0.805 of it sold to that booking until old_until + 1 h: no second GPU.
    with pytest.raises(NotAvailable) as refused:
        _book(org, tier="on_demand", gpus=1, start=old_until, hours=1)
    assert refused.value.code == "site_curtailed"
    # Naming the site, its window to the second as the API writes times (it read "The site",
    # and "2026-12-07T23:15:14.629454+00:00").
    shed, until = (t.replace(microsecond=0) for t in (replanned.shed_at, replanned.until))
    assert refused.value.message == (
        f"{site.name} is shedding load for its grid operator from {iso_utc(shed)} to "
        f"{iso_utc(until)}: nothing more is sold there for that time."
    )
    # After the booking, one GPU again.
    _book(org, tier="on_demand", gpus=1, start=old_until + timedelta(hours=1), hours=1)


def test_a_stretched_window_counts_an_extension_as_sold_from_the_old_end_only(fleet, market, org):
    site, _ = market
    start = timezone.now() + timedelta(hours=2)
    earlier = _book(org, tier="on_demand", gpus=1, start=start, hours=1)  # before the call
    curtailment = _announce(site, mw="0.002")  # from in an hour, for six: 1.22 kW over
    reservation_extend(reservation=earlier, new_ends_at=start + timedelta(hours=2), actor_label="t")
    (take,) = curtailment.takes.filter(reservation=earlier)
    assert take.period.lower == start + timedelta(hours=1)  # the extension was sold

    replanned = curtailment_replan(
        curtailment=curtailment,
        shed_at=curtailment.shed_at,
        until=curtailment.until + timedelta(hours=2),
        target_mw=Decimal("0.002"),
        reason="ERCOT stretched the call",
    )

    (take,) = replanned.takes.filter(reservation=earlier)
    assert (take.period.lower, take.period.upper) == (
        start + timedelta(hours=1),
        start + timedelta(hours=2),
    )
    # Its first hour was booked before the call: one more GPU fits beside it then.
    _book(org, tier="on_demand", gpus=1, start=start, hours=1)
