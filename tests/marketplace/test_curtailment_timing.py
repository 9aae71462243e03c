"""Curtailment timing: "sold after the call" is told by the database's clock, read under the
locks that order a booking or an extension and the call (never two app hosts' clocks); an
extension reads its time after its node locks. Draws as in test_curtailment_megawatts.py:
0.805 kW per H100 at abilene-1."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import threading
from datetime import timedelta

import pytest
from django.db import OperationalError, connection
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
from tests.races import until_a_backend_waits_for_this_one

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
    locked, extension_waited = threading.Event(), []
    lock_site = curtailment_service._lock_site

    def lock_site_and_linger(site_id):
        held = lock_site(site_id)
        if not locked.is_set():  # the extension comes in now: on until it waits for the nodes
            locked.set()
            extension_waited.append(until_a_backend_waits_for_this_one())
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
    assert extension_waited == [True]
    # Applied once the call had committed: its time is after the call's, so its added hour is
    # sold since the call when a re-plan covers it.
    (extension,) = Reservation.objects.get(pk=earlier.pk).breakdown["extensions"]
    assert extension["at"] > curtailment.announced_at.isoformat()
    curtailment = _stretch(curtailment)
    (take,) = curtailment.takes.filter(reservation=earlier)
    assert (take.kw, take.period.lower, take.period.upper) == (GPU_KW, at + H, at + 2 * H)


@pytest.mark.django_db(transaction=True)
def test_an_extension_caught_in_a_deadlock_with_a_call_runs_again(fleet, market, org, monkeypatch):
    """A call locks a site's nodes, then the reservations on them; an extension holds its
    reservation and waits for its node. PostgreSQL fails the side whose deadlock check finds
    the circle, and a waiter checks once only: the extension asks for its node once the call
    waits for its reservation (the lock table says so, not a sleep), and only its check runs
    in time (the call's deadlock_timeout is a minute), so it is the victim whatever the load.
    It runs again once the call has gone through, and is applied once, instead of a 500."""
    import psycopg

    from marketplace.models import Allocation, ReservationTransition
    from marketplace.services import reservations as reservations_service

    at = timezone.now() + timedelta(hours=8)
    earlier = _book(org, tier="on_demand", gpus=1, start=at, hours=1)
    node_id = Allocation.objects.filter(reservation=earlier).values_list("node_id", flat=True)[0]
    settings_dict = connection.settings_dict
    call = psycopg.connect(
        host=settings_dict["HOST"], port=settings_dict["PORT"], user=settings_dict["USER"],
        dbname=settings_dict["NAME"], autocommit=False,
    )  # fmt: skip
    call.execute("SET deadlock_timeout = '60s'")  # only the extension checks for the circle
    call.execute("SELECT id FROM inventory_node WHERE id = %s FOR UPDATE", [node_id])
    holding, attempts, results = threading.Event(), [], {}
    nodes_lock = reservations_service._extension_nodes_lock

    def nodes_lock_once_the_call_waits(gpus):
        if not attempts:  # the first attempt holds the reservation: the call comes for it
            holding.set()
            until_a_backend_waits_for_this_one()
        try:
            now = nodes_lock(gpus)
        except OperationalError as exc:
            attempts.append(getattr(exc.__cause__, "sqlstate", None))
            raise
        attempts.append("locked")
        return now

    monkeypatch.setattr(
        reservations_service, "_extension_nodes_lock", nodes_lock_once_the_call_waits
    )

    def extend():
        try:
            with connection.cursor() as cur:
                cur.execute("SET deadlock_timeout = '100ms'")
            results["extended"] = reservation_extend(
                reservation=earlier, new_ends_at=at + 2 * H, actor_label="t"
            )
        except Exception as exc:  # noqa: BLE001 - reported below
            results["extended"] = exc
        finally:
            connection.close()

    thread = threading.Thread(target=extend)
    thread.start()
    try:
        assert holding.wait(10)
        # Waits for the extension, which then asks for the node: PostgreSQL fails the extension.
        call.execute(
            "SELECT id FROM marketplace_reservation WHERE id = %s FOR UPDATE", [earlier.pk]
        )
        call.commit()  # the call went through
    finally:
        call.close()
        thread.join(30)

    # A deadlock's victim, then through (or a victim again if the retry still came first).
    assert len(attempts) >= 2 and attempts == ["40P01"] * (len(attempts) - 1) + ["locked"]
    assert isinstance(results["extended"], Reservation), results["extended"]
    extended = Reservation.objects.get(pk=earlier.pk)
    assert extended.ends_at == at + 2 * H
    assert len(extended.breakdown["extensions"]) == 1
    history = ReservationTransition.objects.filter(
        reservation=earlier, cause__startswith="extended:"
    )
    assert history.count() == 1  # applied once: the victim's attempt left nothing
