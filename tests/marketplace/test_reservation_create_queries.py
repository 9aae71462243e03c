"""The create and extend paths are hot: each takes a fixed number of statements, whatever
the request, and reads nothing it has just written (the response is built from the rows in
hand). Billing's gate is replaced by one that allows all (its statements are billing's own
and counted in its tests); the reference tables are read once first, as a running server has
them cached. Under the node locks each path also checks the room any grid curtailment of the
site leaves in the period (one statement, allocation.py), so a booking never takes capacity
a curtailment shed; a booking's search leaves out the offers' curtailment history. Each also
reads its organisation's row FOR SHARE (one statement), so a staff suspension waits for a
booking under way and one that committed first is seen."""

from datetime import timedelta

import pytest

from marketplace.models import Quote
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create, reservation_extend
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]


@pytest.fixture
def market():
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    site = SiteFactory()
    make_nodes(site, model, 2)
    org = OrganizationFactory()
    # Warm the reference cache (sites, GPU models, rate cards) as a running server has it.
    quote_create(
        organization=org, gpu_model=model.slug, gpu_count=1, starts_at=tomorrow(),
        ends_at=tomorrow(1), tier="on_demand",
    )  # fmt: skip
    return model, site, org


def _ask(model, **kw) -> dict:
    return {"gpu_model": model.slug, "gpu_count": 12, "starts_at": tomorrow(2),
            "ends_at": tomorrow(5), "tier": "on_demand", **kw}  # fmt: skip


def _created_shown_without_reads(reservation, count: int) -> None:
    # What the response shows is in hand: reading it takes no statement.
    assert [t.to_status for t in reservation.transition_list] == ["pending"]
    assert len(reservation.allocation_list) == count
    node_ids = [a.node_id for a in reservation.allocation_list]
    assert node_ids == sorted(node_ids)  # as the detail read orders them
    assert all(a.node.hostname for a in reservation.allocation_list)
    assert reservation.outage_list == []


def test_a_booking_at_a_named_site_takes_a_fixed_number_of_statements(
    market, django_assert_num_queries
):
    model, site, org = market
    with django_assert_num_queries(14):
        reservation = reservation_create(organization=org, site=site.slug, **_ask(model))
    with django_assert_num_queries(0):
        _created_shown_without_reads(reservation, 12)


def test_a_booking_at_the_cheapest_site_takes_a_fixed_number_of_statements(
    market, django_assert_num_queries
):
    model, _, org = market
    with django_assert_num_queries(17):
        reservation = reservation_create(organization=org, **_ask(model))
    with django_assert_num_queries(0):
        _created_shown_without_reads(reservation, 12)


def test_a_booking_from_a_quote_takes_a_fixed_number_of_statements(
    market, django_assert_num_queries
):
    model, _, org = market
    quote = quote_create(organization=org, **_ask(model))
    quote = Quote.objects.get(pk=quote.pk)
    with django_assert_num_queries(18):
        reservation = reservation_create(organization=org, quote=quote)
    with django_assert_num_queries(0):
        _created_shown_without_reads(reservation, 12)


def test_an_extension_takes_a_fixed_number_of_statements(market, django_assert_num_queries):
    model, site, org = market
    reservation = reservation_create(organization=org, site=site.slug, **_ask(model))
    with django_assert_num_queries(18):
        extended = reservation_extend(
            reservation=reservation,
            new_ends_at=reservation.ends_at + timedelta(hours=2),
            actor_label="test",
        )
    assert extended.ends_at == reservation.ends_at + timedelta(hours=2)
