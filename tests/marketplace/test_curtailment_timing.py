"""Curtailment timing: "sold after the call" is told by the database's clock, read under the
locks that order a booking or an extension and the call (never two app hosts' clocks); an
extension reads its time after its node locks. Draws as in test_curtailment_megawatts.py:
0.805 kW per H100 at abilene-1."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import Curtailment, Reservation
from marketplace.services import curtailment as curtailment_service
from marketplace.services.reservations import reservation_extend
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    market,
    org,
    owner,
)
from tests.marketplace.resale_helpers import H
from tests.marketplace.test_curtailment_megawatts import (  # noqa: F401
    _announce,
    _book,
    _run_together,
    fleet,
)
from tests.marketplace.test_curtailment_replan_new_hours import GPU_KW, _stretch

SKEW = timedelta(minutes=10)


def _announce_from_a_host_ahead(monkeypatch, site) -> Curtailment:
    """The call taken by an app host whose clock runs SKEW ahead of the others'."""
    real_now = timezone.now
    with monkeypatch.context() as m:
        m.setattr(timezone, "now", lambda: real_now() + SKEW)
        return _announce(site, mw="0.002")


@pytest.mark.django_db
def test_a_booking_after_the_call_is_sold_even_when_the_calls_host_clock_ran_ahead(
    fleet, market, org, monkeypatch
):
    site, _ = market
    curtailment = _announce_from_a_host_ahead(monkeypatch, site)
    at = curtailment.until + timedelta(hours=1)
    # Booked on a host whose clock is SKEW behind the call's: still after the call.
    since = _book(org, tier="on_demand", gpus=2, start=at, hours=1)

    curtailment = _stretch(curtailment)

    (take,) = curtailment.takes.filter(reservation=since)
    assert (take.kw, take.period.lower, take.period.upper) == (2 * GPU_KW, at, at + H)


@pytest.mark.django_db
def test_an_extension_after_the_call_is_sold_even_when_the_calls_host_clock_ran_ahead(
    fleet, market, org, monkeypatch
):
    site, _ = market
    at = timezone.now() + timedelta(hours=8)  # after the window _announce makes (1 h to 7 h)
    earlier = _book(org, tier="on_demand", gpus=1, start=at, hours=1)  # baseline
    curtailment = _announce_from_a_host_ahead(monkeypatch, site)
    reservation_extend(reservation=earlier, new_ends_at=at + 2 * H, actor_label="t")

    curtailment = _stretch(curtailment)

    (take,) = curtailment.takes.filter(reservation=earlier)
    assert (take.kw, take.period.lower, take.period.upper) == (GPU_KW, at + H, at + 2 * H)


@pytest.mark.django_db(transaction=True)
def test_an_extension_waiting_on_a_calls_locks_takes_its_time_after_them(
    fleet, market, org, monkeypatch
):
    site, _ = market
    at = timezone.now() + timedelta(hours=8)
    earlier = _book(org, tier="on_demand", gpus=1, start=at, hours=1)  # before the call
    locked = threading.Event()
    lock_site = curtailment_service._lock_site

    def lock_site_and_linger(site_id):
        held = lock_site(site_id)
        locked.set()
        time.sleep(1)  # the extension comes in now, and waits for the nodes
        return held

    monkeypatch.setattr(curtailment_service, "_lock_site", lock_site_and_linger)

    def announce():
        return _announce(site, mw="0.002")

    def extend():
        assert locked.wait(10)
        return reservation_extend(reservation=earlier, new_ends_at=at + 2 * H, actor_label="t")

    curtailment, extended = _run_together(announce, extend)
    monkeypatch.setattr(curtailment_service, "_lock_site", lock_site)

    assert isinstance(curtailment, Curtailment), curtailment
    assert isinstance(extended, Reservation), extended
    # Applied once the call had committed: its time is after the call's, so its added hour is
    # sold since the call when a re-plan covers it.
    (extension,) = Reservation.objects.get(pk=earlier.pk).breakdown["extensions"]
    assert extension["at"] > curtailment.announced_at.isoformat()
    curtailment = _stretch(curtailment)
    (take,) = curtailment.takes.filter(reservation=earlier)
    assert (take.kw, take.period.lower, take.period.upper) == (GPU_KW, at + H, at + 2 * H)


@pytest.mark.django_db(transaction=True)
def test_an_extension_caught_in_a_deadlock_with_a_call_runs_again(fleet, market, org):
    """A call locks a site's nodes, then the reservations on them; an extension holds its
    reservation and waits for its node. The extension waits first, so PostgreSQL's deadlock
    check fails it: it runs again once the call has gone through, instead of a 500."""
    import psycopg
    from django.db import connection

    from marketplace.models import Allocation

    at = timezone.now() + timedelta(hours=8)
    earlier = _book(org, tier="on_demand", gpus=1, start=at, hours=1)
    node_id = Allocation.objects.filter(reservation=earlier).values_list("node_id", flat=True)[0]
    settings_dict = connection.settings_dict
    call = psycopg.connect(
        host=settings_dict["HOST"], port=settings_dict["PORT"], user=settings_dict["USER"],
        dbname=settings_dict["NAME"], autocommit=False,
    )  # fmt: skip
    call.execute("SET deadlock_timeout = '5s'")  # the extension's check fires first (1 s)
    call.execute("SELECT id FROM inventory_node WHERE id = %s FOR UPDATE", [node_id])
    results = {}

    def extend():
        try:
            results["extended"] = reservation_extend(
                reservation=earlier, new_ends_at=at + 2 * H, actor_label="t"
            )
        except Exception as exc:  # noqa: BLE001 - reported below
            results["extended"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=extend)
    thread.start()
    time.sleep(0.5)  # the extension holds its reservation and waits for the node
    call.execute("SELECT id FROM marketplace_reservation WHERE id = %s FOR UPDATE", [earlier.pk])
    call.commit()  # the call went through: the extension's first attempt was the victim
    call.close()
    thread.join(30)

    assert isinstance(results["extended"], Reservation), results["extended"]
    assert Reservation.objects.get(pk=earlier.pk).ends_at == at + 2 * H
