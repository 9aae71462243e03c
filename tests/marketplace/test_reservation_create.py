from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from config.errors import (
    Conflict,
    NotAvailable,
    NotFound,
    PaymentRequired,
    QuoteExpired,
    ValidationFailed,
)
from marketplace import funding
from marketplace.models import Allocation, Quote, Reservation, ReservationTransition
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory, UserFactory
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
    make_rate(model, "2.2000")
    make_policy()
    return model


@pytest.fixture
def org():
    return OrganizationFactory()


def direct(org, **kw):
    args = {
        "organization": org,
        "gpu_model": "h100-sxm-80gb",
        "gpu_count": 2,
        "starts_at": T1,
        "ends_at": T2,
        "tier": "on_demand",
    }
    return reservation_create(**{**args, **kw})


def quote(org, **kw):
    args = {
        "organization": org,
        "gpu_model": "h100-sxm-80gb",
        "gpu_count": 2,
        "starts_at": T1,
        "ends_at": T2,
        "tier": "on_demand",
    }
    return quote_create(**{**args, **kw})


def test_a_quote_holds_the_cheapest_offer_for_the_ttl(h100, org, settings):
    expensive, cheap = SiteFactory(), SiteFactory()
    make_rate(h100, "1.9000", site=cheap)
    make_nodes(expensive, h100, 1)
    make_nodes(cheap, h100, 1)
    before = timezone.now()

    q = quote(org)

    assert q.site == cheap
    assert (q.price_per_gpu_hour, q.total_amount, q.currency) == (
        Decimal("1.9000"),
        Decimal("38.00"),
        "usd",
    )
    assert q.breakdown["rate_source"] == f"site:{cheap.slug}"
    assert before + settings.QUOTE_TTL <= q.expires_at <= timezone.now() + settings.QUOTE_TTL


def test_a_quote_for_capacity_that_does_not_exist_is_not_available(h100, org):
    make_nodes(SiteFactory(), h100, 1)
    with pytest.raises(NotAvailable):
        quote(org, gpu_count=9)
    assert Quote.objects.count() == 0


def test_an_unknown_model_or_site_is_bad_input_not_unavailability(h100, org):
    with pytest.raises(ValidationFailed) as exc:
        quote(org, gpu_model="b300")
    assert (exc.value.code, exc.value.field) == ("unknown_gpu_model", "gpu_model")
    with pytest.raises(ValidationFailed) as exc:
        quote(org, site="atlantis")
    assert exc.value.field == "site"


def test_reserving_from_a_quote_holds_its_price_and_allocates_gpus(h100, org):
    make_nodes(SiteFactory(), h100, 1)
    q = quote(org)
    make_rate(h100, "9.9999", site=q.site)  # a price change after the quote does not matter
    user = UserFactory()

    r = reservation_create(organization=org, user=user, quote=q, workload={"image": "x"})

    assert (r.price_per_gpu_hour, r.total_amount) == (Decimal("2.2000"), Decimal("44.00"))
    assert (r.site_id, r.gpu_count, r.starts_at, r.ends_at) == (q.site_id, 2, T1, T2)
    assert r.status == "pending"  # starts tomorrow
    assert r.quote == q and r.created_by == user and r.workload == {"image": "x"}
    allocations = list(Allocation.objects.filter(reservation=r))
    assert len(allocations) == 2
    assert all(a.is_live and (a.period.lower, a.period.upper) == (T1, T2) for a in allocations)
    (t,) = ReservationTransition.objects.filter(reservation=r)
    assert (t.from_status, t.to_status) == ("", "pending")


def test_an_expired_quote_is_refused_and_nothing_is_written(h100, org):
    make_nodes(SiteFactory(), h100, 1)
    q = quote(org)
    Quote.objects.filter(pk=q.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    with pytest.raises(QuoteExpired) as exc:
        reservation_create(organization=org, quote=q)
    assert exc.value.code == "quote_expired"
    assert Reservation.objects.count() == 0 and Allocation.objects.count() == 0


def test_a_quote_can_be_used_only_once(h100, org):
    make_nodes(SiteFactory(), h100, 1)
    q = quote(org)
    first = reservation_create(organization=org, quote=q)
    with pytest.raises(Conflict) as exc:
        reservation_create(organization=org, quote=q)
    assert exc.value.code == "quote_used"
    assert list(Reservation.objects.all()) == [first]
    assert Allocation.objects.count() == 2


def test_another_organisations_quote_is_not_found(h100, org):
    make_nodes(SiteFactory(), h100, 1)
    q = quote(org)
    with pytest.raises(NotFound):
        reservation_create(organization=OrganizationFactory(), quote=q)
    assert Reservation.objects.count() == 0


def test_a_start_now_quote_used_later_keeps_its_length_and_total(h100, org):
    make_nodes(SiteFactory(), h100, 1)
    now = timezone.now()
    q = quote(org, starts_at=now, ends_at=now + timedelta(hours=1))
    Quote.objects.filter(pk=q.pk).update(
        starts_at=now - timedelta(minutes=2), ends_at=now + timedelta(minutes=58)
    )
    q.refresh_from_db()
    r = reservation_create(organization=org, quote=q)
    assert r.starts_at >= now and r.ends_at - r.starts_at == timedelta(hours=1)
    assert r.total_amount == q.total_amount
    assert r.status == "scheduled"


def test_a_direct_reservation_starting_now_is_scheduled(h100, org):
    make_nodes(SiteFactory(), h100, 1)
    now = timezone.now()
    r = direct(org, starts_at=now, ends_at=now + timedelta(hours=2))
    assert r.status == "scheduled"
    assert r.total_amount == Decimal("8.80")
    assert Allocation.objects.filter(reservation=r, is_live=True).count() == 2


def test_a_direct_reservation_falls_through_to_the_next_site_when_one_is_full(h100, org):
    cheap, dear = SiteFactory(), SiteFactory()
    make_rate(h100, "1.0000", site=cheap)
    make_nodes(cheap, h100, 1)
    make_nodes(dear, h100, 1)
    first = direct(org, gpu_count=8)
    second = direct(org, gpu_count=8)
    assert (first.site, first.price_per_gpu_hour) == (cheap, Decimal("1.0000"))
    assert (second.site, second.price_per_gpu_hour) == (dear, Decimal("2.2000"))
    with pytest.raises(NotAvailable):
        direct(org, gpu_count=1)
    assert Reservation.objects.count() == 2 and Allocation.objects.count() == 16


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"ends_at": T1}, "ends_at"),
        ({"ends_at": T1 - timedelta(hours=1)}, "ends_at"),
        ({"starts_at": timezone.now() - timedelta(minutes=5)}, "starts_at"),
        ({"gpu_count": 0}, "gpu_count"),
        ({"gpu_count": None}, "gpu_count"),
        ({"ends_at": T1 + timedelta(days=367)}, "ends_at"),
        ({"starts_at": T1 + timedelta(days=400), "ends_at": T1 + timedelta(days=401)}, "starts_at"),
        ({"tier": "reserved"}, "term"),
        ({"tier": "reserved", "term": "1w"}, "ends_at"),
        ({"term": "1m"}, "term"),
        ({"tier": "gold"}, "tier"),
        ({"workload": ["not", "a", "dict"]}, "workload"),
    ],
)
def test_it_refuses_bad_requests_and_writes_nothing(h100, org, overrides, field):
    make_nodes(SiteFactory(), h100, 1)
    with pytest.raises(ValidationFailed) as exc:
        direct(org, **overrides)
    assert exc.value.field == field
    assert Reservation.objects.count() == 0 and Allocation.objects.count() == 0


def test_a_reserved_term_books_at_least_the_term_at_its_discount(h100, org):
    make_nodes(SiteFactory(), h100, 1)
    r = direct(org, tier="reserved", term="1w", ends_at=T1 + timedelta(days=8), gpu_count=1)
    assert r.price_per_gpu_hour == Decimal("2.0900")
    assert r.total_amount == Decimal("401.28")  # 192 h × 2.09


def test_the_funding_gate_can_refuse_and_nothing_is_written(h100, org):
    make_nodes(SiteFactory(), h100, 1)

    class Broke(funding.AllowAllFundingGate):
        def reservation_authorize(self, *, reservation, auto_recharge):
            assert reservation.total_amount == Decimal("44.00")
            raise PaymentRequired("No balance.", code="insufficient_funds")

    previous = funding.funding_gate()
    funding.funding_gate_register(Broke())
    try:
        with pytest.raises(PaymentRequired):
            direct(org)
    finally:
        funding.funding_gate_register(previous)
    assert Reservation.objects.count() == 0 and Allocation.objects.count() == 0


def test_a_direct_reservation_naming_a_site_books_there_at_that_sites_search_price(h100, org):
    from marketplace.selectors.availability import AvailabilityQuery, availability_search

    cheap, named = SiteFactory(), SiteFactory()
    make_rate(h100, "1.0000", site=cheap)
    make_nodes(cheap, h100, 2)
    make_nodes(named, h100, 3)
    direct(org, gpu_count=3, site=named.slug)  # utilisation at the named site is now 3 / 24
    (offer,) = availability_search(AvailabilityQuery(
        gpu_model=h100.slug, gpu_count=12, starts_at=T1, ends_at=T2, tier="on_demand",
        site=named.slug,
    ))  # fmt: skip
    cluster = direct(org, gpu_count=12, site=named.slug)
    assert (cluster.site, cluster.price_per_gpu_hour, cluster.total_amount) == (
        named,
        offer.price_per_gpu_hour,
        offer.total,
    )
    assert cluster.breakdown == offer.breakdown.as_dict()
    per_node = sorted(
        Allocation.objects.filter(reservation=cluster).values_list("node_id", flat=True).distinct()
    )
    assert per_node == sorted(n.node_id for n in offer.nodes)
    assert not Allocation.objects.filter(node__site=cheap).exists()


def test_a_full_named_site_is_not_available_even_when_another_site_has_room(h100, org):
    full, other = SiteFactory(region="us-west"), SiteFactory(region="eu-north")
    make_nodes(full, h100, 1)
    make_nodes(other, h100, 1)
    direct(org, gpu_count=8, site=full.slug)
    with pytest.raises(NotAvailable):
        direct(org, gpu_count=1, site=full.slug)
    with pytest.raises(NotAvailable):  # a region, but not the named site's
        direct(org, gpu_count=1, site=other.slug, region="us-west")
    with pytest.raises(ValidationFailed) as error:  # no site is in it: bad input
        direct(org, gpu_count=1, site=other.slug, region="nowhere")
    assert error.value.code == "unknown_region"
    with pytest.raises(ValidationFailed):
        direct(org, gpu_count=1, site="no-such-site")
    assert Reservation.objects.count() == 1 and Allocation.objects.count() == 8
