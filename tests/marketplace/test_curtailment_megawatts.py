"""Curtailment by the megawatt: the fewest interruptible reservations that cover the target,
chosen by price and start, hand-computed here; the minimum notice; forced protected work; the
window not sold beyond what was over-shed; two curtailments and a booking racing at one site.

The market fixture's site has PUE 1.15 and H100s rated 700 W, so each GPU draws
0.805 kW at rated power (700 × 1.15 / 1000)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import re
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import close_old_connections, connection
from django.utils import timezone
from psycopg.types.range import Range

from config.dates import iso_utc
from config.errors import NotAvailable, ValidationFailed
from inventory.models import GpuSample
from marketplace.models import (
    Allocation,
    AuditEntry,
    Curtailment,
    CurtailmentVictim,
    Event,
    Reservation,
    ReservationStatus,
)
from marketplace.provisioning.scheduler import reservations_dispatch_due
from marketplace.selectors.availability import AvailabilityQuery, availability_search
from marketplace.services.curtailment import (
    Candidate,
    PlanChanged,
    curtailment_announce,
    curtailment_call_off,
    curtailment_preview,
    curtailment_replan,
    victims_choose,
)
from marketplace.services.reservations import reservation_cancel, reservation_extend
from marketplace.services.transitions import reservation_transition
from tests.factories import UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
    owner,
)

S = ReservationStatus
T = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


# --- The choice itself (pure) -----------------------------------------------------------------


def _c(rid, price, started_min, kw):
    return Candidate(
        reservation_id=rid,
        draw_kw=Decimal(kw),
        price_per_gpu_hour=Decimal(price),
        started=T + timedelta(minutes=started_min),
    )


# a and b: cheapest, b started later (so first); c: dearer and bigger; d: dearest.
A, B, C, D = (
    _c(1, "1.00", 0, "1"),
    _c(2, "1.00", 10, "1"),
    _c(3, "2.00", 0, "3"),
    _c(4, "3.00", 0, "2"),
)


@pytest.mark.parametrize(
    ("target", "victims"),
    [
        # One reservation can reach 3 kW (c's 3): of the sets of one, c is the first that does.
        ("3", [C]),
        # 2 kW: one is enough; c (2.00/GPU-h) comes before d (3.00) though d fits exactly.
        ("2", [C]),
        # 4 kW needs two (3 + 2 ≥ 4, no single one): b first (cheapest, latest), then the
        # first that completes it with b: a (1) would not (1 + 1 < 4), c (3) does.
        ("4", [B, C]),
        # 1 kW: one; b before a (same price, b started later).
        ("1", [B]),
        # 7 kW: all four (1 + 1 + 3 + 2).
        ("7", [B, A, C, D]),
        # 5.5 kW: three needed (3 + 2 + 1 = 6): b, then a? b + a + (3) = 5 < 5.5, so a is
        # skipped; b + c + d = 6 ≥ 5.5.
        ("5.5", [B, C, D]),
    ],
)
def test_the_fewest_reservations_are_chosen_then_by_price_and_start(target, victims):
    assert victims_choose([A, B, C, D], Decimal(target)) == victims


def test_same_price_and_start_take_the_most_recently_booked_first():
    older, newer = _c(7, "1.00", 0, "2"), _c(9, "1.00", 0, "2")
    assert victims_choose([older, newer], Decimal("1")) == [newer]


def test_when_the_flexible_load_falls_short_every_candidate_is_taken():
    assert victims_choose([A, B, C, D], Decimal("8")) == [B, A, C, D]
    assert victims_choose([], Decimal("1")) == []


def test_all_flexible_load_takes_every_candidate_in_order():
    assert victims_choose([D, C, B, A], None) == [B, A, C, D]


# --- Against the database ---------------------------------------------------------------------


def _book(org, *, tier="interruptible", gpus, start, hours=8, active=False, price=None):
    return book_at_market(
        org, tier=tier, gpus=gpus, start=start, hours=hours, active=active, price=price
    )


@pytest.fixture
def fleet(market, org, owner):
    """Interruptible work at abilene-1 (draws at rated power):
    r1 2 GPUs 1.00 running (1.61 kW), r2 4 GPUs 1.20 running (3.22 kW),
    r3 1 GPU 1.00 running, activated after r1 (0.805 kW), r4 2 GPUs 0.90 starting in 3 h
    (1.61 kW); and an on-demand reservation of 2 GPUs, running."""
    now = timezone.now()
    r1 = _book(org, gpus=2, start=now, active=True, price="1.00")
    r2 = _book(org, gpus=4, start=now, active=True, price="1.20")
    r3 = _book(org, gpus=1, start=now, active=True, price="1.00")
    r4 = _book(org, gpus=2, start=now + timedelta(hours=3), price="0.90")
    on_demand = _book(org, tier="on_demand", gpus=2, start=now, active=True)
    return {"r1": r1, "r2": r2, "r3": r3, "r4": r4, "on_demand": on_demand}


def _announce(site, *, mw=None, hours_ahead=1, length=6, **kw):
    shed_at = timezone.now() + timedelta(hours=hours_ahead)
    return curtailment_announce(
        site=site,
        shed_at=shed_at,
        until=shed_at + timedelta(hours=length),
        target_mw=None if mw is None else Decimal(mw),
        reason=kw.pop("reason", "ERCOT demand response"),
        **kw,
    )


def _victims(curtailment) -> set[int]:
    return set(
        CurtailmentVictim.objects.filter(
            curtailment=curtailment, withdrawn_at__isnull=True
        ).values_list("reservation_id", flat=True)
    )


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("mw", "chosen", "shed_kw", "short_kw"),
    [
        # 2 kW: one reservation can (r2's 3.22); r4, r3, r1 come first but none alone does.
        ("0.002", {"r2"}, "3.220", "0"),
        # 4 kW: two needed (3.22 + 1.61): r4 (cheapest) with r2 completes it.
        ("0.004", {"r4", "r2"}, "4.830", "0"),
        # 7.245 kW: all four exactly.
        ("0.007245", {"r1", "r2", "r3", "r4"}, "7.245", "0"),
        # 8 kW: all four, and 0.755 kW short (the on-demand work is not touched).
        ("0.008", {"r1", "r2", "r3", "r4"}, "7.245", "0.755"),
    ],
)
def test_the_victims_cover_the_target_as_computed_by_hand(
    fleet, market, mw, chosen, shed_kw, short_kw
):
    site, _ = market
    curtailment = _announce(site, mw=mw)

    assert _victims(curtailment) == {fleet[name].pk for name in chosen}
    assert curtailment.shed_kw == Decimal(shed_kw)
    assert curtailment.short_kw == Decimal(short_kw)
    assert curtailment.headroom_kw == max(Decimal(shed_kw) - Decimal(mw) * 1000, Decimal(0))
    for name, reservation in fleet.items():
        fresh = Reservation.objects.get(pk=reservation.pk)
        if name not in chosen:  # the rest keep running, with no notice
            assert fresh.status == reservation.status and fresh.preempt_at is None, name
        elif name == "r4":  # starts after the notice ends: preempted now, never runs
            assert fresh.status == S.PREEMPTED and fresh.activated_at is None
        else:
            assert fresh.status == S.ACTIVE and fresh.preempt_at == curtailment.preempt_at
    assert (curtailment.reservations_notified, curtailment.reservations_preempted) == (
        len(chosen - {"r4"}),
        int("r4" in chosen),
    )


@pytest.mark.django_db
@pytest.mark.parametrize("mw", ["0.002", "0.004", "0.008"])
def test_the_preview_is_what_announcing_it_then_does(fleet, market, mw):
    site, _ = market
    shed_at = timezone.now() + timedelta(hours=1)
    call = {
        "site": site,
        "shed_at": shed_at,
        "until": shed_at + timedelta(hours=6),
        "target_mw": Decimal(mw),
        "reason": "ERCOT demand response",
    }
    plan = curtailment_preview(**call)
    assert not Curtailment.objects.exists() and not CurtailmentVictim.objects.exists()

    curtailment = curtailment_announce(**call, expected_plan=plan.fingerprint)

    assert _victims(curtailment) == {v.reservation.pk for v in plan.victims}
    preempted = curtailment.victims.filter(outcome=CurtailmentVictim.Outcome.PREEMPTED)
    assert set(preempted.values_list("reservation_id", flat=True)) == {
        v.reservation.pk for v in plan.preempted
    }
    assert (plan.preempt_at, plan.shed_kw, plan.short_kw) == (
        curtailment.preempt_at,
        curtailment.shed_kw,
        curtailment.short_kw,
    )


@pytest.mark.django_db
def test_announcing_other_than_the_plan_shown_is_refused_and_writes_nothing(fleet, market, org):
    site, _ = market
    shed_at = timezone.now() + timedelta(hours=1)
    call = {"site": site, "shed_at": shed_at, "target_mw": Decimal("0.002"), "reason": "EEA"}
    shown = curtailment_preview(**call)
    # A cheaper interruptible booking lands meanwhile: it is now among the fewest preferred.
    landed = _book(org, gpus=4, start=shed_at + timedelta(hours=1), price="0.50")

    with pytest.raises(PlanChanged) as changed:
        curtailment_announce(**call, expected_plan=shown.fingerprint)

    assert changed.value.code == "plan_changed"
    assert [v.reservation.pk for v in changed.value.plan.victims] == [landed.pk]
    assert [v.reservation.pk for v in shown.victims] == [fleet["r2"].pk]
    assert not Curtailment.objects.exists() and not CurtailmentVictim.objects.exists()
    for reservation in [*fleet.values(), landed]:
        fresh = Reservation.objects.get(pk=reservation.pk)
        assert (fresh.status, fresh.preempt_at) == (reservation.status, None)


@pytest.mark.django_db
def test_forgone_gpu_hours_and_revenue_are_the_victims_booked_time_after_the_stop(fleet, market):
    site, _ = market
    curtailment = _announce(site, mw="0.004")  # r4 and r2

    r2 = fleet["r2"]
    r2_hours = (
        Decimal(4) * Decimal(int((r2.ends_at - curtailment.preempt_at).total_seconds())) / 3600
    )
    r4_hours = Decimal(2 * 8)  # never starts: all its booked time
    assert curtailment.gpu_hours_forgone == (r2_hours.quantize(Decimal("0.001")) + r4_hours)
    assert curtailment.revenue_forgone == (
        (r2_hours * Decimal("1.20")).quantize(Decimal("0.01")) + r4_hours * Decimal("0.90")
    )


@pytest.mark.django_db
def test_fresh_power_readings_replace_rated_power_and_stale_ones_do_not(fleet, market):
    site, _ = market
    now = timezone.now()
    gpus = list(Allocation.objects.filter(reservation=fleet["r2"]).values_list("gpu_id", flat=True))
    # r2's four GPUs draw 350 W each now: 4 × 350 × 1.15 = 1.61 kW, no longer the biggest.
    GpuSample.objects.bulk_create(
        [
            GpuSample(gpu_id=g, at=now - timedelta(seconds=s), power_w=350.0)
            for g in gpus
            for s in (5, 35)
        ]
    )

    # 3 kW: two needed now (1.61 + 1.61): r4 (cheapest) and r1 (cheapest running, and r3's
    # 0.805 kW would not complete it).
    curtailment = _announce(site, mw="0.003")

    assert _victims(curtailment) == {fleet["r4"].pk, fleet["r1"].pk}
    assert curtailment.shed_kw == Decimal("3.220")
    curtailment_call_off(curtailment=curtailment)
    # Readings older than CURTAILMENT_POWER_FRESH count for nothing: r2 at rated power again.
    GpuSample.objects.filter(gpu_id__in=gpus).update(at=now - timedelta(minutes=10))
    again = _announce(site, mw="0.003")
    assert _victims(again) == {fleet["r2"].pk}
    victim = CurtailmentVictim.objects.get(curtailment=again)
    assert (victim.draw_kw, victim.draw_basis) == (Decimal("3.220"), "rated")


@pytest.mark.django_db
def test_a_measured_draw_is_recorded_as_such(fleet, market):
    site, _ = market
    gpus = Allocation.objects.filter(reservation=fleet["r3"]).values_list("gpu_id", flat=True)
    GpuSample.objects.bulk_create(
        [GpuSample(gpu_id=g, at=timezone.now(), power_w=610.0) for g in gpus]
    )
    curtailment = _announce(site, mw=None)  # all flexible load
    victim = CurtailmentVictim.objects.get(curtailment=curtailment, reservation=fleet["r3"])
    assert (victim.draw_kw, victim.draw_basis) == (Decimal("0.702"), "measured")  # 610 × 1.15


# --- Notice -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_minimum_notice_is_given_when_staff_announce_a_sooner_shed(fleet, market, settings):
    site, _ = market
    now = timezone.now()
    curtailment = curtailment_announce(
        site=site, shed_at=now + timedelta(seconds=30), reason="peak", now=now
    )
    assert curtailment.preempt_at == now + settings.CURTAILMENT_MIN_NOTICE
    assert not curtailment.short_notice
    fresh = Reservation.objects.get(pk=fleet["r1"].pk)
    assert fresh.preempt_at == now + timedelta(minutes=2)
    assert "Short notice" not in fresh.preempt_reason


@pytest.mark.django_db
def test_a_call_giving_less_notice_is_followed_and_the_notice_says_so(fleet, market):
    site, _ = market
    now = timezone.now()
    curtailment = curtailment_announce(
        site=site, shed_at=now + timedelta(seconds=30), reason="frequency event",
        call_notice=True, now=now,
    )  # fmt: skip
    assert curtailment.preempt_at == now + timedelta(seconds=30)
    assert curtailment.short_notice
    fresh = Reservation.objects.get(pk=fleet["r1"].pk)
    assert fresh.preempt_at == now + timedelta(seconds=30)
    # The operator's reason and ours read as two sentences; times as the API writes them.
    assert fresh.preempt_reason == (
        f"Grid curtailment at {site.name} from {iso_utc(now + timedelta(seconds=30))}: frequency "
        "event. Short notice: the grid operator's call gave 30 s, less than our usual 120 s."
    )


@pytest.mark.django_db
def test_a_window_shorter_than_the_minimum_notice_is_refused_and_changes_nothing(fleet, market):
    site, _ = market
    now = timezone.now()
    with pytest.raises(ValidationFailed) as refused:
        curtailment_announce(
            site=site, shed_at=now, until=now + timedelta(seconds=60), reason="blip", now=now
        )
    assert refused.value.code == "notice_too_short"
    assert not Curtailment.objects.exists() and not CurtailmentVictim.objects.exists()
    assert not Reservation.objects.filter(preempt_at__isnull=False).exists()


# --- Forcing protected work -------------------------------------------------------------------


@pytest.mark.django_db
def test_without_force_protected_work_is_never_touched_and_the_shortfall_is_recorded(fleet, market):
    site, _ = market
    curtailment = _announce(site, mw="0.010")
    assert curtailment.short_kw == Decimal("2.755")  # 10 − 7.245
    on_demand = Reservation.objects.get(pk=fleet["on_demand"].pk)
    assert on_demand.preempt_at is None and on_demand.status == S.ACTIVE


@pytest.mark.django_db
def test_staff_force_protected_work_with_a_reason_recorded_in_the_audit_log(fleet, market, org):
    site, _ = market
    staff = UserFactory(username="grid-desk", is_staff=True)
    reserved = _book(org, tier="reserved", gpus=4, start=timezone.now(), hours=7 * 24, active=True)

    curtailment = _announce(
        site, mw="0.010", hours_ahead=0.05, force_reason="ERCOT EEA3: firm load shed", user=staff
    )

    # 2.755 kW short of flexible load: one protected reservation can cover it, the reserved
    # one (3.22 kW); the on-demand one (1.61 kW) alone cannot.
    assert _victims(curtailment) == {fleet[n].pk for n in ("r1", "r2", "r3", "r4")} | {reserved.pk}
    assert curtailment.short_kw == 0
    victim = CurtailmentVictim.objects.get(reservation=reserved, curtailment=curtailment)
    assert victim.forced and victim.tier == "reserved"
    entry = AuditEntry.objects.get(
        action="reservation.preempt_forced", object_id=reserved.public_id
    )
    assert entry.actor == "staff:grid-desk"
    assert entry.changes["reason"] == "ERCOT EEA3: firm load shed"
    assert "forced by staff: ERCOT EEA3" in Reservation.objects.get(pk=reserved.pk).preempt_reason
    assert Reservation.objects.get(pk=fleet["on_demand"].pk).preempt_at is None

    # At the notice's end the dispatcher preempts it like the interruptible ones.
    Reservation.objects.filter(pk__in=_victims(curtailment)).update(
        preempt_at=timezone.now() - timedelta(seconds=1)
    )
    reservations_dispatch_due()
    assert Reservation.objects.get(pk=reserved.pk).status == S.PREEMPTED
    assert Reservation.objects.get(pk=fleet["on_demand"].pk).status == S.ACTIVE


@pytest.mark.django_db
def test_a_stray_notice_on_a_protected_reservation_is_not_carried_out(fleet, market):
    on_demand = fleet["on_demand"]
    Reservation.objects.filter(pk=on_demand.pk).update(
        preempt_at=timezone.now() - timedelta(seconds=1), preempt_reason="x"
    )
    assert reservations_dispatch_due()["preempted"] == 0
    assert Reservation.objects.get(pk=on_demand.pk).status == S.ACTIVE


# --- Sales in the window ----------------------------------------------------------------------


@pytest.mark.django_db
def test_the_window_sells_only_what_was_shed_beyond_the_target(fleet, market, org):
    site, _ = market
    # 2 kW asked, 3.22 shed: 1.22 kW may be sold again in the window, one GPU (0.805 kW).
    curtailment = _announce(site, mw="0.002")
    start = curtailment.shed_at + timedelta(hours=1)
    search = {
        "gpu_model": "h100-sxm-80gb",
        "starts_at": start,
        "ends_at": start + timedelta(hours=1),
    }

    assert availability_search(AvailabilityQuery(gpu_count=2, tier="on_demand", **search)) == []
    assert [
        o.gpu_count
        for o in availability_search(AvailabilityQuery(gpu_count=1, tier="on_demand", **search))
    ] == [1]
    with pytest.raises(NotAvailable) as refused:
        _book(org, tier="on_demand", gpus=2, start=start, hours=1)
    assert refused.value.code == "site_curtailed"
    _book(org, tier="on_demand", gpus=1, start=start, hours=1)
    assert [t.kw for t in curtailment.takes.all()] == [Decimal("0.805")]
    assert (
        availability_search(AvailabilityQuery(gpu_count=1, tier="on_demand", **search)) == []
    )  # 0.415 kW left
    with pytest.raises(NotAvailable):
        _book(org, tier="interruptible", gpus=1, start=start, hours=1)
    # Before and after the window the site sells as usual.
    before = curtailment.shed_at - timedelta(hours=1)
    assert _book(org, tier="on_demand", gpus=2, start=before, hours=1).status in (
        S.PENDING,
        S.SCHEDULED,
    )
    after = curtailment.until
    assert _book(org, tier="on_demand", gpus=2, start=after, hours=1).status == S.PENDING


def _one_gpu_search(start, hours=1):
    return AvailabilityQuery(
        gpu_count=1,
        tier="on_demand",
        gpu_model="h100-sxm-80gb",
        starts_at=start,
        ends_at=start + timedelta(hours=hours),
    )


@pytest.mark.django_db
def test_a_booking_that_leaves_the_window_gives_its_room_back(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw="0.002")  # 1.22 kW to sell: one GPU at a time
    start = curtailment.shed_at + timedelta(hours=1)
    booked = _book(org, tier="on_demand", gpus=1, start=start, hours=2)
    assert availability_search(_one_gpu_search(start)) == []
    with pytest.raises(NotAvailable):
        _book(org, tier="on_demand", gpus=1, start=start, hours=1)

    reservation_cancel(reservation=booked, actor_label="customer")

    (given_back,) = curtailment.takes.all()  # it had not begun: none of it is sold any more
    assert given_back.reservation_id == booked.pk and given_back.period.isempty
    assert [o.gpu_count for o in availability_search(_one_gpu_search(start))] == [1]
    again = _book(org, tier="on_demand", gpus=1, start=start, hours=2)
    assert list(curtailment.takes.values_list("reservation_id", flat=True)) == [booked.pk, again.pk]


@pytest.mark.django_db
def test_a_booking_ended_inside_the_window_gives_back_the_rest_of_it(fleet, market, org):
    site, _ = market
    # Began 18 s ago, the operator's call giving no notice: its victims stop at once.
    curtailment = _announce(site, mw="0.002", hours_ahead=-0.005, call_notice=True)
    running = _book(org, tier="on_demand", gpus=1, start=timezone.now(), hours=8, active=True)
    take = curtailment.takes.get(reservation=running)
    assert (take.period.lower, take.period.upper) == (running.starts_at, curtailment.until)
    later = timezone.now() + timedelta(hours=2)
    assert availability_search(_one_gpu_search(later)) == []

    running = reservation_cancel(reservation=running, actor_label="customer")  # releasing
    reservation_transition(
        reservation=running, to_status=S.COMPLETED, cause="stopped", actor_label="t"
    )

    take.refresh_from_db()  # what it drew stays on record; the rest is sold again
    assert take.period.lower == running.starts_at and take.period.upper <= timezone.now()
    assert [o.gpu_count for o in availability_search(_one_gpu_search(later))] == [1]


@pytest.mark.django_db
def test_the_window_is_sold_by_the_hour_not_once_for_all_of_it(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw="0.002")  # one GPU's draw at any one time
    first = curtailment.shed_at + timedelta(minutes=30)
    _book(org, tier="on_demand", gpus=1, start=first, hours=1)
    # Back to back, then in a later hour: never two at once, so both fit.
    _book(org, tier="on_demand", gpus=1, start=first + timedelta(hours=1), hours=1)
    _book(org, tier="on_demand", gpus=1, start=first + timedelta(hours=3), hours=1)
    # Overlapping any of them by a minute would be two at once.
    with pytest.raises(NotAvailable) as refused:
        _book(org, tier="on_demand", gpus=1, start=first + timedelta(minutes=119), hours=1)
    assert refused.value.code == "site_curtailed"
    assert availability_search(_one_gpu_search(first + timedelta(minutes=59))) == []
    assert availability_search(_one_gpu_search(first - timedelta(minutes=30), hours=0.5)) != []
    assert curtailment.takes.count() == 3


@pytest.mark.django_db
def test_a_replan_sheds_enough_for_what_was_sold_in_the_window_since(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw="0.002")  # r2 (3.22 kW): 1.22 kW over
    sold = _book(org, tier="on_demand", gpus=1, start=curtailment.shed_at, hours=2)
    assert _victims(curtailment) == {fleet["r2"].pk}

    # 3 MW now: r2 alone would still reach the target, but the 0.805 kW sold since must be
    # shed too (3.805 kW): r4 joins it, and nothing is short.
    replanned = curtailment_replan(
        curtailment=curtailment,
        shed_at=curtailment.shed_at,
        until=curtailment.until,
        target_mw=Decimal("0.003"),
        reason="ERCOT raised the call",
    )

    assert _victims(replanned) == {fleet["r2"].pk, fleet["r4"].pk}
    assert replanned.shed_kw == Decimal("4.830") and replanned.short_kw == 0
    assert Reservation.objects.get(pk=sold.pk).status == S.PENDING  # what was sold stands
    # The window has 4.83 - 3 - 0.805 = 1.025 kW left: one more GPU, not two.
    start = curtailment.shed_at + timedelta(hours=3)
    assert [o.gpu_count for o in availability_search(_one_gpu_search(start))] == [1]


@pytest.mark.django_db
def test_an_extension_into_the_window_is_refused(fleet, market, org):
    site, _ = market
    start = timezone.now() + timedelta(hours=1)
    short = _book(org, tier="on_demand", gpus=1, start=start, hours=1)
    _announce(site, mw=None, hours_ahead=2.5)
    with pytest.raises(NotAvailable) as refused:
        reservation_extend(
            reservation=short, new_ends_at=start + timedelta(hours=3), actor_label="t"
        )
    assert refused.value.code == "site_curtailed"
    assert Reservation.objects.get(pk=short.pk).ends_at == start + timedelta(hours=1)
    # Up to the window's start is fine.
    reservation_extend(
        reservation=short, new_ends_at=start + timedelta(hours=1, minutes=20), actor_label="t"
    )


@pytest.mark.django_db
def test_calling_it_off_before_its_start_sells_the_window_again(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw=None)
    start = curtailment.shed_at + timedelta(hours=1)
    search = {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "tier": "on_demand",
              "starts_at": start, "ends_at": start + timedelta(hours=1)}  # fmt: skip
    assert availability_search(AvailabilityQuery(**search)) == []

    curtailment_call_off(curtailment=curtailment)

    assert availability_search(AvailabilityQuery(**search)) != []
    assert _book(org, tier="on_demand", gpus=2, start=start, hours=1).status == S.PENDING


@pytest.mark.django_db
def test_a_modified_call_is_planned_again(fleet, market):
    site, _ = market
    curtailment = _announce(site, mw="0.002", hours_ahead=2)  # r2
    assert _victims(curtailment) == {fleet["r2"].pk}

    curtailment = curtailment_replan(
        curtailment=curtailment,
        shed_at=curtailment.shed_at,
        until=curtailment.until,
        target_mw=Decimal("0.004"),
        reason="raised to 4 kW",
    )

    assert _victims(curtailment) == {fleet["r4"].pk, fleet["r2"].pk}
    assert curtailment.shed_kw == Decimal("4.830")
    # r2's notice stands as it was: its owner is told once, not withdrawn and told again.
    assert _notice_events(fleet["r2"]) == ["reservation.interruption_scheduled"]
    # Lowered again: r4 was preempted (it had not started) and stays so; its 1.61 kW still
    # counts, so only 0.39 kW more is needed: the first that covers it is r3 (0.805 kW).
    curtailment = curtailment_replan(
        curtailment=curtailment,
        shed_at=curtailment.shed_at,
        until=curtailment.until,
        target_mw=Decimal("0.002"),
        reason="lowered",
    )
    assert curtailment.shed_kw == Decimal("2.415")  # 1.61 + 0.805
    assert _victims(curtailment) == {fleet["r4"].pk, fleet["r3"].pk}
    assert Reservation.objects.get(pk=fleet["r2"].pk).preempt_at is None  # withdrawn
    assert _notice_events(fleet["r2"]) == [
        "reservation.interruption_scheduled",
        "reservation.interruption_withdrawn",
    ]
    assert CurtailmentVictim.objects.filter(
        curtailment=curtailment, reservation=fleet["r2"], withdrawn_at__isnull=False
    ).count() == 2  # fmt: skip


def _notice_events(reservation) -> list[str]:
    return list(
        Event.objects.filter(object_id=reservation.public_id, type__contains="interruption")
        .order_by("pk")
        .values_list("type", flat=True)
    )


# --- Races ------------------------------------------------------------------------------------


def _run_together(*targets):
    barrier = threading.Barrier(len(targets))
    results: list = [None] * len(targets)

    def run(i, target):
        close_old_connections()
        try:
            barrier.wait()
            results[i] = target()
        except Exception as exc:  # noqa: BLE001 - the outcome is asserted by the caller
            results[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, t)) for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


@pytest.mark.django_db(transaction=True)
def test_two_calls_for_the_same_site_at_once_shed_different_reservations(fleet, market):
    site, _ = market
    shed_at = timezone.now() + timedelta(hours=1)

    def call(mw):
        return lambda: curtailment_announce(
            site=site, shed_at=shed_at, until=shed_at + timedelta(hours=2),
            target_mw=Decimal(mw), reason=f"call {mw}", call_notice=True,
        )  # fmt: skip

    first, second = _run_together(call("0.002"), call("0.002"))

    assert isinstance(first, Curtailment) and isinstance(second, Curtailment)
    assert not (_victims(first) & _victims(second))
    # Whichever came first took r2 (3.22 kW); the other the fewest of what was left: two,
    # r4 (cheapest) and then r3 (0.805 kW completes 2 kW; r3 before r1: started later).
    assert sorted([_victims(first), _victims(second)], key=len) == [
        {fleet["r2"].pk},
        {fleet["r4"].pk, fleet["r3"].pk},
    ]


@pytest.mark.django_db(transaction=True)
def test_a_booking_racing_a_curtailment_never_sells_the_shed_window(market, org, owner):
    site, _ = market
    for attempt in range(4):
        shed_at = timezone.now() + timedelta(hours=1 + attempt * 10)
        until = shed_at + timedelta(hours=2)

        def book():
            return _book(org, gpus=2, start=shed_at, hours=1)

        def curtail():
            return curtailment_announce(
                site=site, shed_at=shed_at, until=until, reason="race", call_notice=True
            )

        booked, curtailment = _run_together(book, curtail)

        assert isinstance(curtailment, Curtailment), curtailment
        if isinstance(booked, Exception):  # the curtailment came first: refused, nothing held
            assert isinstance(booked, NotAvailable) and booked.code == "site_curtailed"
        else:  # the booking came first: it is part of the flexible load shed
            assert _victims(curtailment) == {booked.pk}
            assert Reservation.objects.get(pk=booked.pk).status == S.PREEMPTED
        live = Allocation.objects.filter(
            is_live=True, node__site=site, period__overlap=Range(shed_at, until, "[)")
        )
        assert not live.exists()


def _sold_at_most(curtailment) -> Decimal:
    """The most sold at once in the window, read as placement reads it."""
    with connection.cursor() as cur:
        cur.execute(
            "SELECT marketplace_curtailment_sold_kw(%s, %s, %s)",
            [curtailment.pk, curtailment.shed_at, curtailment.until],
        )
        return cur.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_two_bookings_racing_for_the_windows_last_room_get_it_once(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw="0.002")  # 1.22 kW over: one GPU's draw at a time
    start = curtailment.shed_at + timedelta(hours=1)

    def book():
        return _book(org, tier="on_demand", gpus=1, start=start, hours=1)

    first, second = _run_together(book, book)

    won = [r for r in (first, second) if isinstance(r, Reservation)]
    lost = [r for r in (first, second) if not isinstance(r, Reservation)]
    assert len(won) == 1, (first, second)
    # Refused under the curtailment's lock, or found no room when it read the site again.
    assert isinstance(lost[0], NotAvailable) and lost[0].code in ("site_curtailed", "not_available")
    curtailment.refresh_from_db()
    assert _sold_at_most(curtailment) == Decimal("0.805") <= curtailment.headroom_kw


@pytest.mark.django_db(transaction=True)
def test_a_cancel_racing_a_booking_for_its_room_never_oversells_the_window(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw="0.002")
    start = curtailment.shed_at + timedelta(hours=1)
    for attempt in range(3):
        held = _book(org, tier="on_demand", gpus=1, start=start, hours=1)

        def cancel(held=held):
            return reservation_cancel(reservation=held, actor_label="customer")

        def book():
            return _book(org, tier="on_demand", gpus=1, start=start, hours=1)

        cancelled, booked = _run_together(cancel, book)

        assert isinstance(cancelled, Reservation), cancelled
        # The booking waited for the cancel's room or was refused: never both held at once.
        if not isinstance(booked, Reservation):
            assert isinstance(booked, NotAvailable), booked
            booked = None
        curtailment.refresh_from_db()
        assert _sold_at_most(curtailment) <= curtailment.headroom_kw, attempt
        if booked is not None:
            reservation_cancel(reservation=booked, actor_label="customer")  # room for the next
        assert _sold_at_most(curtailment) == 0


# --- What staff see ---------------------------------------------------------------------------


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(username="grid-desk", is_staff=True, is_superuser=True))
    return client


@pytest.mark.django_db
def test_staff_see_asked_shed_short_and_forgone_on_the_dashboard_and_the_record(
    fleet, market, staff_client
):
    site, _ = market
    curtailment = _announce(site, mw="0.008")  # all four, 0.755 kW short

    dashboard = staff_client.get("/staff/").content.decode()
    section = dashboard[dashboard.index("Grid curtailments") :]
    row = section[section.index(f"/admin/marketplace/curtailment/{curtailment.pk}/") :]
    row = row[: row.index("</tr>")]
    cells = [c.split(">", 1)[-1] for c in row.split("<td")[1:]]
    assert [c.replace("</td>", "").strip() for c in cells[2:7]] == [
        "0.008",
        "0.007",  # 7.245 kW
        "0.001",  # 0.755 kW short
        "3",
        "1",
    ]
    page = staff_client.get(f"/admin/marketplace/curtailment/{curtailment.pk}/change/")
    body = page.content.decode()
    assert page.status_code == 200
    assert str(fleet["r2"]) in body and "3.220" in body and "rated" in body
    listing = staff_client.get("/admin/marketplace/curtailment/").content.decode()
    assert '<td class="field-target">0.008</td>' in listing
    assert '<td class="field-shed">0.007245</td>' in listing
    assert '<td class="field-short">0.000755</td>' in listing


def _admin_form(site, shed_at, until, **extra):
    local, end = timezone.localtime(shed_at), timezone.localtime(until)
    return {
        "site": site.pk,
        "shed_at_0": local.strftime("%Y-%m-%d"),
        "shed_at_1": local.strftime("%H:%M:%S"),
        "until_0": end.strftime("%Y-%m-%d"),
        "until_1": end.strftime("%H:%M:%S"),
        "reason": "ERCOT EEA 3",
        **extra,
    }


@pytest.mark.django_db
def test_staff_force_protected_work_from_the_admin_form(fleet, market, staff_client):
    site, _ = market
    shed_at = (timezone.now() + timedelta(hours=1)).replace(microsecond=0)
    form = _admin_form(site, shed_at, shed_at + timedelta(hours=4), target_mw="0.008")

    refused = staff_client.post(
        "/admin/marketplace/curtailment/add/", {**form, "target_mw": "", "force_reason": "x"}
    )
    assert b"Forcing needs a megawatt target" in refused.content
    assert not Curtailment.objects.exists()

    form["force_reason"] = "EEA 3: firm load shed ordered"
    shown = staff_client.post("/admin/marketplace/curtailment/add/", form).content.decode()
    # Shown first: all five, the on-demand one forced, nothing short.
    assert "from 5 reservations, 1 of them protected work forced" in shown
    assert "1.610 kW (rated), forced" in shown and 'id="plan-short"' not in shown
    assert not Curtailment.objects.exists()
    plan = re.search(r'name="plan" value="(\w+)"', shown)[1]

    done = staff_client.post(
        "/admin/marketplace/curtailment/add/",
        {**form, "confirmed": "yes", "plan": plan},
        follow=True,
    )

    (curtailment,) = Curtailment.objects.all()
    # 8 kW: the four interruptible (7.245), 0.755 short; forced, the on-demand reservation
    # (1.61) covers it.
    assert _victims(curtailment) == {r.pk for r in fleet.values()}
    assert curtailment.short_kw == 0
    entry = AuditEntry.objects.get(action="reservation.preempt_forced")
    assert (entry.object_id, entry.actor) == (fleet["on_demand"].public_id, "staff:grid-desk")
    assert b"asked 0.008 MW, shed 0.008855 MW" in done.content


@pytest.mark.django_db
def test_the_admin_record_lists_what_was_sold_in_the_window(fleet, market, org):
    from tests.clients import HttpsClient

    site, _ = market
    curtailment = _announce(site, mw="0.002")
    sold = _book(org, tier="on_demand", gpus=1, start=curtailment.shed_at, hours=1)
    staff = UserFactory(username="grid-desk", is_staff=True, is_superuser=True)
    client = HttpsClient()
    client.force_login(staff)

    page = client.get(f"/admin/marketplace/curtailment/{curtailment.pk}/change/")

    assert page.status_code == 200
    html = page.content.decode()
    assert "sold in the window since" in html.lower() and "0.805" in html
    assert str(sold.pk) in html or sold.public_id in html


@pytest.mark.django_db
def test_nothing_is_sold_in_the_window_before_its_victims_notice_ends(fleet, market, org):
    site, _ = market
    # Shedding in 30 s, announced by staff: the victims get the minimum notice (2 min) and run
    # past the window's start; until they stop nothing is over-shed.
    curtailment = _announce(site, mw="0.002", hours_ahead=30 / 3600)
    assert curtailment.preempt_at > curtailment.shed_at
    early = curtailment.shed_at + timedelta(seconds=10)
    assert availability_search(_one_gpu_search(early)) == []
    with pytest.raises(NotAvailable) as refused:
        _book(org, tier="on_demand", gpus=1, start=early, hours=1)
    assert refused.value.code == "site_curtailed"

    after = curtailment.preempt_at + timedelta(minutes=1)
    assert [o.gpu_count for o in availability_search(_one_gpu_search(after))] == [1]
    assert _book(org, tier="on_demand", gpus=1, start=after, hours=1).status == S.PENDING


@pytest.mark.django_db
def test_a_victim_that_was_sold_in_the_window_sheds_nothing_of_the_target(fleet, market, org):
    site, _ = market
    curtailment = _announce(site, mw="0.002")  # r2 (3.22 kW): 1.22 kW over
    start = curtailment.shed_at + timedelta(hours=1)
    # Interruptible work sold in the window since, cheaper than anything there: the first
    # to shed when the call is raised.
    sold = _book(org, gpus=1, start=start, hours=2, price="0.50")

    # 4.8 kW plus the 0.805 sold: three reservations are needed and the sale is one of them,
    # but preempting it only undoes its own sale. What the site had then sheds 4.83 kW.
    replanned = curtailment_replan(
        curtailment=curtailment,
        shed_at=curtailment.shed_at,
        until=curtailment.until,
        target_mw=Decimal("0.0048"),
        reason="ERCOT raised the call",
    )

    assert fleet["r2"].pk in _victims(replanned) and sold.pk in _victims(replanned)
    assert Reservation.objects.get(pk=sold.pk).status == S.PREEMPTED  # not started yet
    assert replanned.shed_kw == replanned.headroom_kw + Decimal("4.8")
    # What is left to sell is what was really shed beyond 4.8 kW: never a whole GPU more.
    assert replanned.headroom_kw < Decimal("0.805")
    assert availability_search(_one_gpu_search(start)) == []
    with pytest.raises(NotAvailable):
        _book(org, tier="on_demand", gpus=1, start=start, hours=1)
