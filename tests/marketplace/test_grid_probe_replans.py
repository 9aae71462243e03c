"""Re-plans, call-offs and zone modifications seen from outside: what the grid operator gets
shed, what the customers are told, and that one curtailment's call-off is not refused because
of another. Draws as in test_curtailment_megawatts.py: 0.805 kW per H100 at abilene-1."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from inventory.models import PriceZone
from marketplace.models import (
    Curtailment,
    CurtailmentVictim,
    DemandResponseSource,
    Event,
    Reservation,
    ReservationStatus,
)
from marketplace.services.curtailment import (
    curtailment_announce,
    curtailment_call_off,
    curtailment_replan,
)
from marketplace.services.reservations import reservation_create
from tests.factories import SiteFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    fresh_rate_limits,
    market,
    org,
    owner,
)
from tests.marketplace.market_helpers import make_nodes
from tests.marketplace.test_curtailment_megawatts import _book
from tests.marketplace.test_demand_response import _call, _post, source  # noqa: F401

pytestmark = pytest.mark.django_db
S = ReservationStatus


def _live_victims(curtailment) -> set[int]:
    return set(
        CurtailmentVictim.objects.filter(
            curtailment=curtailment, withdrawn_at__isnull=True
        ).values_list("reservation_id", flat=True)
    )


def _events(reservation) -> list[str]:
    return list(
        Event.objects.filter(object_id=reservation.public_id, type__contains="interruption")
        .order_by("pk")
        .values_list("type", flat=True)
    )


@pytest.fixture
def zone_of_two(market, org, owner, source):
    """abilene-1 with one interruptible reservation of 4 GPUs (3.22 kW), pecos-2 with two of
    2 GPUs (1.61 kW each): 3.22 kW flexible at each site; the source may curtail the zone."""
    site, gpu_model = market
    zone = PriceZone.objects.create(code="ercot-west", name="ERCOT West", currency="usd")
    other = SiteFactory(slug="pecos-2", price_zone=zone)
    make_nodes(other, gpu_model, 1, gpus=8)
    type(site).objects.filter(pk=site.pk).update(price_zone=zone)
    source.zones.add(zone)
    now = timezone.now()
    big = _book(org, gpus=4, start=now, active=True)
    small = [
        reservation_create(
            organization=org,
            gpu_model="h100-sxm-80gb",
            gpu_count=2,
            starts_at=now,
            ends_at=now + timedelta(hours=8),
            tier="interruptible",
            site="pecos-2",
        )  # fmt: skip
        for _ in range(2)
    ]
    return {"site": site, "other": other, "big": big, "small": small}


def test_a_zone_call_is_spread_in_whole_kilowatts_that_sum_to_the_call(zone_of_two, source):
    # 3 kW over two equal sites: 1.5 kW each is not a target a curtailment can hold (MW to 3
    # places): it was stored as 2 kW each, 4 kW in all for a 3 kW call.
    response = _post(_call(site=None, zone="ercot-west", target_mw="0.003"), source=source)

    assert response.status_code == 201, response.content
    stored = dict(Curtailment.objects.values_list("site__slug", "target_mw"))
    assert stored == {"abilene-1": Decimal("0.002"), "pecos-2": Decimal("0.001")}
    shares = {c["site"]: c["target_mw"] for c in response.json()["curtailments"]}
    assert shares == {"abilene-1": "0.002", "pecos-2": "0.001"}
    (pecos,) = Curtailment.objects.filter(site__slug="pecos-2")
    assert (pecos.shed_kw, pecos.short_kw) == (Decimal("1.610"), Decimal(0))


def test_a_raised_zone_call_keeps_what_each_site_sheds_for_it_in_its_share(zone_of_two, source):
    call = _call(site=None, zone="ercot-west", target_mw="0.003")
    assert _post(call, source=source).status_code == 201
    big = zone_of_two["big"]
    assert Reservation.objects.get(pk=big.pk).preempt_at is not None

    # Raised to 4 kW: each site can shed 3.22 kW for the call (abilene-1 sheds all of it
    # already, which is no reason to ask it for nothing), so 2 kW each: abilene-1 keeps its
    # victim, pecos-2 sheds both of its reservations.
    raised = _post({**call, "modification_number": 1, "target_mw": "0.004"}, source=source)

    assert raised.status_code == 200, raised.content
    body = raised.json()
    live = {c["site"]: c for c in body["curtailments"] if not c["called_off"]}
    assert {s: c["target_mw"] for s, c in live.items()} == {
        "abilene-1": "0.002",
        "pecos-2": "0.002",
    }
    assert body["short_mw"] == "0.000000"
    assert Reservation.objects.get(pk=big.pk).preempt_at is not None  # not withdrawn
    assert _events(big) == ["reservation.interruption_scheduled"]
    for small in zone_of_two["small"]:
        assert Reservation.objects.get(pk=small.pk).preempt_at is not None


def test_another_curtailment_ending_within_the_minimum_notice_does_not_block_a_call_off(
    market, org, owner
):
    site, _ = market
    now = timezone.now()
    first = _book(org, gpus=2, start=now, active=True)
    second = _book(org, gpus=2, start=now, active=True)
    shed_at = now + timedelta(hours=1)
    x = curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(hours=2),
        target_mw=Decimal("0.001"), reason="first call", now=now,
    )  # fmt: skip
    y = curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(minutes=3),
        reason="all flexible load, briefly", now=now,
    )  # fmt: skip
    assert _live_victims(x) | _live_victims(y) == {first.pk, second.pk}

    # One minute before y's window ends (less than the minimum notice), x is called off.
    later = shed_at + timedelta(minutes=2)
    withdrawn = curtailment_call_off(curtailment=x, now=later)

    assert withdrawn == 1
    x.refresh_from_db()
    assert x.called_off_at is None and x.until == later  # ended now, during its window
    y.refresh_from_db()
    assert y.preempt_at == shed_at and y.called_off_at is None  # y as it was


def test_a_victim_preempted_at_once_by_a_re_plan_is_not_told_its_notice_was_withdrawn(
    market, org, owner
):
    site, _ = market
    now = timezone.now()
    starting = _book(org, gpus=2, start=now + timedelta(minutes=30))
    shed_at = now + timedelta(hours=1)
    curtailment = curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(hours=2),
        target_mw=Decimal("0.001"), reason="call", call_notice=True, now=now,
    )  # fmt: skip
    assert _events(starting) == ["reservation.interruption_scheduled"]

    # The call moves earlier, before the reservation starts: it is preempted at once.
    curtailment_replan(
        curtailment=curtailment, shed_at=now + timedelta(minutes=10),
        until=shed_at + timedelta(hours=2), target_mw=Decimal("0.001"), reason="earlier",
        now=now,
    )  # fmt: skip

    starting.refresh_from_db()
    assert starting.status == S.PREEMPTED
    assert _events(starting) == ["reservation.interruption_scheduled"]


def test_a_window_moved_away_does_not_count_what_was_preempted_for_the_old_one(market, org, owner):
    site, _ = market
    now = timezone.now()
    running = _book(org, gpus=2, start=now, active=True, price="1.00")
    short = _book(org, gpus=2, start=now + timedelta(minutes=90), hours=1, price="1.00")
    shed_at = now + timedelta(hours=1)
    curtailment = curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(hours=2),
        target_mw=Decimal("0.0016"), reason="call", call_notice=True, now=now,
    )  # fmt: skip
    # The most recently started first: the short one, which had not started: preempted.
    assert _live_victims(curtailment) == {short.pk}
    assert Reservation.objects.get(pk=short.pk).status == S.PREEMPTED

    # The call moves to a window the short reservation would never have run in.
    moved = now + timedelta(hours=4)
    curtailment = curtailment_replan(
        curtailment=curtailment, shed_at=moved, until=moved + timedelta(hours=2),
        target_mw=Decimal("0.0016"), reason="moved", now=now,
    )  # fmt: skip

    assert _live_victims(curtailment) == {short.pk, running.pk}
    assert Reservation.objects.get(pk=running.pk).preempt_at == moved
    assert curtailment.shed_kw == Decimal("1.610")  # what the new window sheds
    assert curtailment.short_kw == Decimal(0)
    assert Curtailment.objects.get(pk=curtailment.pk).reservations_preempted == 1


def test_a_call_off_before_the_window_leaves_nothing_short_on_the_record(market, org, owner):
    site, _ = market
    now = timezone.now()
    running = _book(org, gpus=2, start=now, active=True)
    shed_at = now + timedelta(hours=1)
    curtailment = curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(hours=2),
        target_mw=Decimal("0.001"), reason="call", now=now,
    )  # fmt: skip
    assert _live_victims(curtailment) == {running.pk}

    assert curtailment_call_off(curtailment=curtailment, now=now + timedelta(minutes=5)) == 1

    curtailment.refresh_from_db()
    assert curtailment.called_off_at is not None
    # It never happens: nothing is shed and nothing is short (the dashboard showed 1 kW short).
    assert (curtailment.shed_kw, curtailment.short_kw) == (Decimal(0), Decimal(0))


def test_a_signature_with_characters_outside_ascii_is_refused_not_a_500(market, source):
    response = _post(_call(), source=source, signature="sha256=caf\u00e9")

    assert response.status_code == 401, response.content
    assert response.json()["error"]["code"] == "signature_invalid"
    assert not Curtailment.objects.exists()


def test_a_source_name_with_a_nul_is_an_unknown_source_not_a_500(market, source):
    response = _post(_call(), source=source, name="ercot\x00qse")

    assert response.status_code == 401, response.content
    assert response.json()["error"]["code"] == "unknown_source"


def test_a_source_granted_a_zone_may_curtail_one_site_of_it(market, org, owner):
    site, _ = market
    zone = PriceZone.objects.create(code="ercot-west", name="ERCOT West", currency="usd")
    type(site).objects.filter(pk=site.pk).update(price_zone=zone)
    elsewhere = SiteFactory(slug="quebec-1")
    zonal = DemandResponseSource.objects.create(name="ercot-iso", secret="drs_zone_secret")
    zonal.zones.add(zone)

    response = _post(_call(), source=zonal)

    assert response.status_code == 201, response.content
    assert [c["site"] for c in response.json()["curtailments"]] == ["abilene-1"]
    # A site outside its zones is still refused.
    outside = _post(_call(event_id="other", site=elsewhere.slug), source=zonal)
    assert outside.status_code == 403 and outside.json()["error"]["code"] == "site_not_allowed"
