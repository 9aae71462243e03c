"""Grid curtailment: the site sheds a number of megawatts (or all its flexible load) for a
window, with notice.

A site's grid operator, or an aggregator, asks it to cut consumption from `shed_at` to `until`
(demand response): that is the contract a former mining site sells its flexibility under, and
what the interruptible tier is priced for. Announcing one (staff in the admin, or a signed
demand-response call, marketplace.services.demand_response) plans it:

- candidates: the site's interruptible reservations (bought as such or resold as such) that
  would still be running when the notice ends, and are not already shed by another
  curtailment in effect (a reservation is shed by one at a time: a database constraint);
- each candidate's draw: GPUs × board power × the site's PUE, where board power is the mean
  power the GPU reported over the last CURTAILMENT_POWER_FRESH when it is running and did,
  else its model's rated power (TDP);
- victims (`victims_choose`): the fewest candidates whose draw covers the target and, among
  the sets that few, the one that comes first in the order lowest price per GPU-hour paid,
  then most recently started (activated, or due to start), then most recently booked;
  "all flexible load" takes every candidate. If the candidates cannot cover the target, all
  are taken and the curtailment records how much is short. Only then, and only when staff
  force it with a reason, are on-demand and reserved reservations taken (the same rule, for
  the shortfall): the reason goes to the audit log and billing credits them (docs/grid.md);
- notice: victims are preempted at `preempt_at`, which is shed_at, unless that leaves less than
  CURTAILMENT_MIN_NOTICE: then it is now + the minimum, unless the call itself gives less
  (`call_notice`: demand-response calls always), when it stays at shed_at and the notice
  says it is short. Victims that would only start at or after preempt_at are preempted at
  once (never run, never charged); the others are noticed (API, e-mail, agent) and the
  dispatcher preempts them at preempt_at (`reservations_preempt_due`);
- sales: new load at the site in the window is refused except for what the victims shed beyond
  the target (`headroom_kw`, taken by each booking under the curtailment's row lock,
  marketplace.services.allocation.curtailment_headroom_take). The site stays active and
  sells outside the window; the reservations not chosen keep running;
- the record: MW asked, shed and short, victims noticed and preempted, GPU-hours and revenue
  forgone (their booked time from the preemption on, at the price they paid).

Staff see the plan before it is carried out (`curtailment_preview`: the same validation and
selection, `_plan_make`, read without locks, nothing written) and announce it only as shown:
`expected_plan` is its fingerprint, checked under the locks (PlanChanged, with the new plan).

A curtailment is re-planned when its call changes (`curtailment_replan`), and called off or
ended early (`curtailment_call_off`): notices not yet carried out are withdrawn, and sales of
the window come back; what was already preempted stays preempted (and uncharged). A re-plan
counts as shed only the victims that would have run in the new window (`_shedding`), cuts
the takes of what was sold to the new window and gives takes to what was sold since the call
in the hours it newly covers, what was booked before the call being its baseline
(`_takes_refit`).
"""

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Exists, F, OuterRef, Q
from django.utils import timezone

from config.currency import money_round
from config.dates import iso_utc
from config.db import retried_on_deadlock
from config.errors import Conflict, ValidationFailed
from inventory.models import Site, SiteStatus
from marketplace.mail import mail_send_on_commit, portal_link
from marketplace.models import (
    Curtailment,
    CurtailmentTake,
    CurtailmentVictim,
    EventType,
    Membership,
    Reservation,
    ReservationStatus,
    Role,
    Tier,
)
from marketplace.services.audit import audit_record
from marketplace.services.events import reservation_event_record
from marketplace.services.transitions import PREEMPTIBLE_STATUSES, reservation_transition

__all__ = [
    "Candidate",
    "CurtailmentPlan",
    "PlannedVictim",
    "PlanChanged",
    "victims_choose",
    "reservation_draws",
    "site_flexible_kw",
    "curtailment_preview",
    "curtailment_announce",
    "curtailment_replan",
    "curtailment_call_off",
    "curtailment_validate",
    "reservations_preempt_due",
    "SHED_AT_SKEW",
]

logger = logging.getLogger(__name__)
# An announcement may name a shed time this far in the past (the operator's call came a moment
# ago); further back is a mistake.
SHED_AT_SKEW = timedelta(minutes=1)
_NOT_STARTED = (ReservationStatus.PENDING, ReservationStatus.SCHEDULED)
_PROTECTED_TIERS = (Tier.ON_DEMAND, Tier.RESERVED)
_ACTOR = "grid curtailment"
_KW = Decimal("0.001")


@dataclass(frozen=True)
class Candidate:
    """A reservation a curtailment may shed, with what shedding it saves."""

    reservation_id: int
    draw_kw: Decimal
    price_per_gpu_hour: Decimal
    started: datetime  # activated, or due to start
    basis: str = "rated"  # "measured", "partly measured" or "rated"

    def preference(self) -> tuple:
        """Lowest price first, then most recently started, then most recently booked."""
        return (self.price_per_gpu_hour, -self.started.timestamp(), -self.reservation_id)


@dataclass(frozen=True)
class PlannedVictim:
    """A reservation a plan sheds: its draw, whether staff force it, and whether it is
    preempted at once (it would only start at or after the preemption: never runs)."""

    reservation: Reservation
    draw_kw: Decimal
    basis: str
    forced: bool
    at_once: bool


@dataclass(frozen=True)
class CurtailmentPlan:
    """Whom a plan sheds and when. Its figures are a new curtailment's (nothing shed before,
    nothing sold in its window since): what curtailment_preview shows."""

    preempt_at: datetime
    short_notice: bool
    at_shed_time: bool  # preempted at shed_at; else the minimum notice moved it later
    target_kw: Decimal | None  # None: all flexible load
    victims: tuple[PlannedVictim, ...]

    @property
    def noticed(self) -> list[PlannedVictim]:
        return [v for v in self.victims if not v.at_once]

    @property
    def preempted(self) -> list[PlannedVictim]:
        return [v for v in self.victims if v.at_once]

    @property
    def shed_kw(self) -> Decimal:
        return sum((v.draw_kw for v in self.victims), Decimal(0))

    @property
    def short_kw(self) -> Decimal:
        if self.target_kw is None:
            return Decimal(0)
        return max(self.target_kw - self.shed_kw, Decimal(0))

    @property
    def fingerprint(self) -> str:
        """Who is shed and how: the same reservations noticed, preempted at once and forced,
        under the same notice rule. Draws are left out: measured ones move minute by minute."""
        parts = [
            "shed_at" if self.at_shed_time else "min_notice",
            "short" if self.short_notice else "full",
            *sorted(
                f"{v.reservation.pk}:{'now' if v.at_once else 'notice'}:{int(v.forced)}"
                for v in self.victims
            ),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


class PlanChanged(Conflict):
    """The plan made under the locks is not the one staff confirmed; `plan` is the new one."""

    def __init__(self, plan: CurtailmentPlan):
        super().__init__(
            "What this curtailment would do changed since it was shown (a booking landed, "
            "ended or started, or time moved the notice): nothing was announced. Read the new "
            "plan and confirm again.",
            code="plan_changed",
        )
        self.plan = plan


def victims_choose(candidates: Sequence[Candidate], target_kw: Decimal | None) -> list[Candidate]:
    """The victims for a target (None: all flexible load), in preference order.

    Fewest first: k is the least number of candidates whose draws can reach the target (the
    k largest draws). Among the sets of k that reach it, the preference order decides: walk
    the candidates in order and take each one if the target can still be reached with the
    slots left and the largest draws after it; so a set of k is chosen that comes first in
    that order. If all candidates together fall short, all are taken (the caller records
    the shortfall). Pure: the same candidates give the same victims.
    """
    ordered = sorted(candidates, key=Candidate.preference)
    if target_kw is None:
        return ordered
    if target_kw <= 0:
        return []
    by_draw = sorted((c.draw_kw for c in ordered), reverse=True)
    running, k = Decimal(0), 0
    for draw in by_draw:
        if running >= target_kw:
            break
        running += draw
        k += 1
    if running < target_kw:
        return ordered  # short: everything there is
    chosen: list[Candidate] = []
    need = target_kw
    for i, candidate in enumerate(ordered):
        if need <= 0:
            break
        slots = k - len(chosen) - 1
        rest = sorted((c.draw_kw for c in ordered[i + 1 :]), reverse=True)[:slots]
        if candidate.draw_kw + sum(rest, Decimal(0)) >= need:
            chosen.append(candidate)
            need -= candidate.draw_kw
    return chosen


# Mean reported board power over the freshness window, per GPU allocated to a running
# reservation (the raw samples: the per-minute rollup lags by up to a minute).
_MEASURED_SQL = """
SELECT a.reservation_id, a.gpu_id, avg(s.power_w)
FROM marketplace_allocation a
JOIN inventory_gpusample s ON s.gpu_id = a.gpu_id
WHERE a.is_live AND a.reservation_id = ANY(%(ids)s)
  AND s.at >= %(since)s AND s.at <= %(now)s AND s.power_w IS NOT NULL
GROUP BY a.reservation_id, a.gpu_id
"""


def reservation_draws(
    reservations: Sequence[Reservation], *, site: Site, now: datetime
) -> dict[int, tuple[Decimal, str]]:
    """kW each reservation draws from the grid (board power × PUE) and how it is known: its
    GPUs' fresh readings when it runs and they reported, rated power (TDP) otherwise."""
    running = [r.pk for r in reservations if r.status == ReservationStatus.ACTIVE]
    measured: dict[int, list[float]] = {}
    if running:
        with connection.cursor() as cur:
            cur.execute(
                _MEASURED_SQL,
                {"ids": running, "since": now - settings.CURTAILMENT_POWER_FRESH, "now": now},
            )
            for reservation_id, _gpu_id, watts in cur.fetchall():
                measured.setdefault(reservation_id, []).append(watts)
    draws = {}
    for r in reservations:
        readings = measured.get(r.pk, [])[: r.gpu_count]
        rated = r.gpu_count - len(readings)
        watts = sum((Decimal(str(round(w, 1))) for w in readings), Decimal(0))
        watts += Decimal(r.gpu_model.tdp_watts) * rated
        kw = (watts * site.pue / 1000).quantize(_KW, rounding=ROUND_HALF_UP)
        basis = "rated" if not readings else ("measured" if not rated else "partly measured")
        draws[r.pk] = (kw, basis)
    return draws


def curtailment_validate(
    *,
    site: Site,
    shed_at: datetime,
    until: datetime | None,
    reason: str,
    now: datetime,
    target_mw: Decimal | None = None,
) -> None:
    """Raise ValidationFailed or Conflict unless this curtailment can be announced."""
    if not (reason or "").strip():
        raise ValidationFailed("Say why: the customers whose work stops read it.", field="reason")
    if shed_at.tzinfo is None or (until is not None and until.tzinfo is None):
        raise ValidationFailed("Times must carry a time zone.", field="shed_at")
    if shed_at < now - SHED_AT_SKEW:
        raise ValidationFailed("shed_at is in the past.", code="shed_at_past", field="shed_at")
    if until is not None and until <= shed_at:
        raise ValidationFailed("until must be after shed_at.", code="period_invalid", field="until")
    if until is not None and until <= now:
        raise ValidationFailed("The window has already ended.", code="period_past", field="until")
    if target_mw is not None and (isinstance(target_mw, float) or target_mw <= 0):
        raise ValidationFailed(
            "target_mw must be a positive number of megawatts (empty: all flexible load).",
            field="target_mw",
        )
    if site.status not in (SiteStatus.ACTIVE, SiteStatus.CURTAILED):
        raise Conflict(
            f"{site.slug} is {site.status}; only an active or already curtailed site sheds load.",
            code="site_not_active",
            field="site",
        )


@retried_on_deadlock()
def curtailment_announce(
    *,
    site: Site,
    shed_at: datetime,
    reason: str,
    until: datetime | None = None,
    target_mw: Decimal | None = None,
    call_notice: bool = False,
    force_reason: str = "",
    user=None,
    demand_response_event=None,
    expected_plan: str | None = None,
    now: datetime | None = None,
) -> Curtailment:
    """Record the curtailment and plan it (see the module docstring).

    `call_notice`: the operator's call itself gives the notice it gives (shed_at), even if
    shorter than CURTAILMENT_MIN_NOTICE. `force_reason`: staff take on-demand and reserved
    reservations too, if the flexible load falls short (recorded, credited).
    `expected_plan`: the fingerprint of the plan staff were shown (curtailment_preview); if
    the plan made under the locks differs, PlanChanged (with it) and nothing is written.
    """
    now = now or timezone.now()
    locked_site = _lock_site(site.pk)
    curtailment_validate(
        site=locked_site, shed_at=shed_at, until=until, reason=reason, now=now, target_mw=target_mw
    )
    curtailment = Curtailment.objects.create(
        site=locked_site,
        shed_at=shed_at,
        until=until,
        target_mw=target_mw,
        reason=reason.strip(),
        announced_by=user,
        demand_response_event=demand_response_event,
        forced_reason=force_reason.strip(),
        currency=settings.CURRENCY,
    )
    _announced_at_stamp(curtailment)
    _plan(
        curtailment,
        site=locked_site,
        now=now,
        call_notice=call_notice,
        user=user,
        expected=expected_plan,
    )
    return curtailment


def curtailment_preview(
    *,
    site: Site,
    shed_at: datetime,
    reason: str,
    until: datetime | None = None,
    target_mw: Decimal | None = None,
    call_notice: bool = False,
    force_reason: str = "",
    now: datetime | None = None,
) -> CurtailmentPlan:
    """What curtailment_announce with these arguments would do now: the same validation and
    selection, read without locks, nothing written. Announce with its `fingerprint` as
    `expected_plan` to have exactly this done, or be told it changed."""
    now = now or timezone.now()
    curtailment_validate(
        site=site, shed_at=shed_at, until=until, reason=reason, now=now, target_mw=target_mw
    )
    probe = Curtailment(
        site=site,
        shed_at=shed_at,
        until=until,
        target_mw=target_mw,
        forced_reason=force_reason.strip(),
    )
    return _plan_make(probe, site=site, now=now, call_notice=call_notice, lock=False)


def _announced_at_stamp(curtailment: Curtailment) -> None:
    """The call's time on the database's clock, under the site's and its nodes' locks: what was
    booked (an allocation's created_at) or extended (an extension's `at`) after the call is told
    apart by comparing stamps of that one clock, each taken under the locks that order the
    two (never two app hosts' clocks, which may disagree)."""
    with connection.cursor() as cur:
        cur.execute(
            "UPDATE marketplace_curtailment SET announced_at = statement_timestamp() "
            "WHERE id = %s RETURNING announced_at",
            [curtailment.pk],
        )
        (curtailment.announced_at,) = cur.fetchone()


@retried_on_deadlock()
def curtailment_replan(
    *,
    curtailment: Curtailment,
    shed_at: datetime,
    until: datetime | None,
    target_mw: Decimal | None,
    reason: str,
    call_notice: bool = True,
    now: datetime | None = None,
) -> Curtailment:
    """The call changed (megawatts, window): withdraw the notices not yet carried out and plan
    again. Reservations already preempted stay so; their draw still counts as shed."""
    now = now or timezone.now()
    locked_site = _lock_site(curtailment.site_id)
    locked = Curtailment.objects.select_for_update().get(pk=curtailment.pk)
    if locked.called_off_at is not None:
        raise Conflict("This curtailment was called off.", code="already_called_off")
    if locked.until is not None and locked.until <= now:
        raise Conflict("This curtailment has ended.", code="curtailment_ended")
    # Once the window has begun, its start is history: the call can change the rest.
    started = locked.shed_at <= now
    shed_at = locked.shed_at if started else shed_at
    curtailment_validate(
        site=locked_site,
        shed_at=now if started else shed_at,
        until=until,
        reason=reason,
        now=now,
        target_mw=target_mw,
    )
    # Withdrawn quietly: a reservation chosen again with the same notice hears nothing; one
    # no longer chosen is told its notice is withdrawn, one with a new time gets the new one.
    before = _withdraw(locked, now=now, announce=False)
    old_shed_at, old_until = locked.shed_at, locked.until
    locked.shed_at, locked.until, locked.target_mw = shed_at, until, target_mw
    locked.reason = reason.strip()
    locked.save(update_fields=["shed_at", "until", "target_mw", "reason"])
    _takes_refit(locked, old_shed_at=old_shed_at, old_until=old_until, now=now)
    _plan(locked, site=locked_site, now=now, call_notice=call_notice, user=None, before=before)
    # Not chosen again: told the notice is withdrawn. One chosen again that had not started by
    # the new time was preempted instead (and told so), never withdrawn.
    for reservation in Reservation.objects.filter(
        pk__in=before, preempt_at__isnull=True, status__in=PREEMPTIBLE_STATUSES
    ):
        reservation_event_record(
            reservation=reservation, type=EventType.RESERVATION_INTERRUPTION_WITHDRAWN
        )
    _top_up_others(locked_site, exclude=locked.pk, now=now)
    return locked


# What was sold out of the window's over-shed holds its draw from where it was sold (a
# booking: its start; an extension: the old end) to the booking's end: when the window moves
# or stretches, the takes of the bookings still live (a live allocation: one that left ended
# its take, marketplace.services.transitions) are cut again to the new window, each row on
# its own (a resold term's take is cut around the hours it sold, which its buyer took:
# marketplace.services.resale). A take that began at the old window's start reaches back to
# the booking's start (where it was sold from is not known: it may count more as sold than
# was, never less), one that ran to the old window's end on to the booking's end.
_TAKES_REFIT_SQL = """
WITH live AS (
    SELECT t.id, t.reservation_id, t.kw,
           tstzrange(CASE WHEN lower(t.period) > %(old_lo)s THEN lower(t.period)
                          ELSE r.starts_at END,
                     CASE WHEN upper(t.period) < coalesce(%(old_hi)s::timestamptz, 'infinity')
                          THEN upper(t.period) ELSE r.ends_at END, '[)')
           * tstzrange(%(lo)s, %(hi)s, '[)') AS inside
    FROM marketplace_curtailmenttake t
    JOIN marketplace_reservation r ON r.id = t.reservation_id
    WHERE t.curtailment_id = %(cid)s AND NOT isempty(t.period)
      AND EXISTS (SELECT 1 FROM marketplace_allocation a
                  WHERE a.reservation_id = r.id AND a.is_live)),
gone AS (
    DELETE FROM marketplace_curtailmenttake t USING live WHERE t.id = live.id)
INSERT INTO marketplace_curtailmenttake (curtailment_id, reservation_id, kw, period, created_at)
SELECT %(cid)s, reservation_id, kw, inside, %(now)s FROM live WHERE NOT isempty(inside)
"""


# What was sold since the call in the hours a re-plan newly covers (the new window less the
# old one), per reservation live there and per stretch of time in which its GPUs and takes do
# not change: `kw` is its GPUs' draw there less what its takes hold then. A reservation's (a
# resale buyer's: its seller term's) hours count as sold when it was placed after the call was
# announced (its first allocation is later), or, placed before, those of the extensions made
# since; what was there before the call is the call's baseline (docs/grid.md). The three
# stamps come from the database's clock, each read under the node locks that order a booking
# or an extension and the call (_announced_at_stamp).
_NEW_HOURS_OWED_CTE = """
WITH fresh AS (
    SELECT tstzmultirange(tstzrange(%(lo)s, %(hi)s, '[)'))
           - tstzmultirange(tstzrange(%(old_lo)s, %(old_hi)s, '[)')) AS hours),
sold AS (
    SELECT a.reservation_id AS rid, piece
    FROM marketplace_allocation a
    CROSS JOIN fresh
    JOIN inventory_node n ON n.id = a.node_id
    LEFT JOIN marketplace_resalelisting l ON l.buyer_reservation_id = a.reservation_id
    JOIN marketplace_reservation src ON src.id = coalesce(l.reservation_id, a.reservation_id)
    CROSS JOIN LATERAL unnest(
        tstzmultirange(a.period) * fresh.hours
        * CASE WHEN (SELECT min(f.created_at) FROM marketplace_allocation f
                     WHERE f.reservation_id = src.id) > %(announced_at)s
               THEN '{(,)}'::tstzmultirange
               ELSE (SELECT coalesce(range_agg(tstzrange((e->>'from')::timestamptz,
                                                         (e->>'to')::timestamptz, '[)')),
                                     '{}')
                     FROM jsonb_array_elements(
                         CASE WHEN jsonb_typeof(src.breakdown->'extensions') = 'array'
                              THEN src.breakdown->'extensions' ELSE '[]' END) e
                     WHERE (e->>'at')::timestamptz > %(announced_at)s) END) AS piece
    WHERE n.site_id = %(site)s AND a.is_live AND a.period && tstzrange(%(lo)s, %(hi)s, '[)')
      AND tstzmultirange(a.period) && fresh.hours),
held AS (
    SELECT t.reservation_id AS rid, t.kw, t.period FROM marketplace_curtailmenttake t
    WHERE t.curtailment_id = %(cid)s AND NOT isempty(t.period)
      AND t.reservation_id IN (SELECT rid FROM sold)),
edges AS (
    SELECT rid, lower(piece) AS at FROM sold UNION SELECT rid, upper(piece) FROM sold
    UNION SELECT rid, lower(period) FROM held UNION SELECT rid, upper(period) FROM held),
stretches AS (
    SELECT rid, at AS lo, lead(at) OVER (PARTITION BY rid ORDER BY at) AS hi FROM edges),
owed AS (
    SELECT s.rid, tstzrange(s.lo, s.hi, '[)') AS period,
           round((SELECT count(*) FROM sold g WHERE g.rid = s.rid AND g.piece @> s.lo)
                 * m.tdp_watts * site.pue / 1000.0, 3)
           - (SELECT coalesce(sum(h.kw), 0) FROM held h
              WHERE h.rid = s.rid AND h.period @> s.lo) AS kw
    FROM fresh, stretches s
    JOIN marketplace_reservation r ON r.id = s.rid
    JOIN inventory_gpumodel m ON m.id = r.gpu_model_id
    JOIN inventory_site site ON site.id = %(site)s
    WHERE s.lo IS NOT NULL AND s.hi IS NOT NULL AND fresh.hours @> s.lo)"""
# A reservation whose takes there hold more than it draws (a term whose hours there are partly
# resold: cut above to its end as if it held all its GPUs) has its takes in the new hours cut
# away, to be given again by the next statement, exactly.
_NEW_HOURS_UNTAKE_SQL = (
    _NEW_HOURS_OWED_CTE
    + """,
over AS (SELECT DISTINCT rid FROM owed WHERE kw < 0),
hit AS (
    DELETE FROM marketplace_curtailmenttake t USING over, fresh
    WHERE t.curtailment_id = %(cid)s AND t.reservation_id = over.rid
      AND NOT isempty(t.period) AND tstzmultirange(t.period) && fresh.hours
    RETURNING t.reservation_id, t.kw, t.period)
INSERT INTO marketplace_curtailmenttake (curtailment_id, reservation_id, kw, period, created_at)
SELECT %(cid)s, hit.reservation_id, hit.kw, piece, %(now)s
FROM hit, fresh, unnest(tstzmultirange(hit.period) - fresh.hours) AS piece
"""
)
# Then each is given what it is owed there.
_NEW_HOURS_TAKE_SQL = (
    _NEW_HOURS_OWED_CTE
    + """
INSERT INTO marketplace_curtailmenttake (curtailment_id, reservation_id, kw, period, created_at)
SELECT %(cid)s, rid, kw, period, %(now)s FROM owed WHERE kw > 0
"""
)
# The reservations whose takes a re-plan cuts or gives (those live in the hours it newly
# covers), locked in id order before either.
_TAKERS_LOCK_SQL = """
SELECT r.id FROM marketplace_reservation r
WHERE r.id IN (SELECT reservation_id FROM marketplace_curtailmenttake WHERE curtailment_id = %(cid)s)
   OR r.id IN (SELECT a.reservation_id FROM marketplace_allocation a
               JOIN inventory_node n ON n.id = a.node_id
               WHERE n.site_id = %(site)s AND a.is_live
                 AND a.period && tstzrange(%(lo)s, %(hi)s, '[)')
                 AND tstzmultirange(a.period)
                     && tstzmultirange(tstzrange(%(lo)s, %(hi)s, '[)'))
                        - tstzmultirange(tstzrange(%(old_lo)s, %(old_hi)s, '[)')))
ORDER BY r.id FOR UPDATE OF r"""


def _takes_refit(
    curtailment: Curtailment,
    *,
    old_shed_at: datetime,
    old_until: datetime | None,
    now: datetime,
) -> None:
    """Cut the takes of the bookings still live to the curtailment's (new) window, and give
    takes to what was sold since the call in the hours it newly covers. The reservations are
    locked first (id order), so one leaving the live statuses meanwhile (which ends its takes)
    is seen as gone, not given its room back, and one leaving after sees the takes it ends."""
    params = {
        "cid": curtailment.pk,
        "site": curtailment.site_id,
        "announced_at": curtailment.announced_at,
        "old_lo": old_shed_at,
        "old_hi": old_until,
        "lo": curtailment.shed_at,
        "hi": curtailment.until,
        "now": now,
    }
    with connection.cursor() as cur:
        cur.execute(_TAKERS_LOCK_SQL, params)
        cur.execute(_TAKES_REFIT_SQL, params)
        cur.execute(_NEW_HOURS_UNTAKE_SQL, params)
        cur.execute(_NEW_HOURS_TAKE_SQL, params)


@retried_on_deadlock()
def curtailment_call_off(
    *, curtailment: Curtailment, user=None, now: datetime | None = None
) -> int:
    """The operator called the event off (before its window: it never happens) or allows the
    load back early (during it: it ends now). Notices not yet carried out are withdrawn and the
    rest of the window is sold again; what it preempted stays preempted (never charged for the
    time after). Returns how many notices were withdrawn."""
    now = now or timezone.now()
    site = _lock_site(curtailment.site_id)
    locked = Curtailment.objects.select_for_update().get(pk=curtailment.pk)
    if locked.called_off_at is not None:
        raise Conflict("This curtailment was already called off.", code="already_called_off")
    if locked.until is not None and locked.until <= now:
        raise Conflict("This curtailment has already ended.", code="curtailment_ended")
    withdrawn = len(_withdraw(locked, now=now))
    if now < locked.shed_at:
        locked.called_off_at = now
        locked.save(update_fields=["called_off_at"])
    else:  # the window so far stays on record
        locked.until = max(now, locked.shed_at + timedelta(microseconds=1))
        locked.save(update_fields=["until"])
    _totals(locked, now=now)
    _top_up_others(site, exclude=locked.pk, now=now)
    logger.warning("curtailment %s called off: %d notice(s) withdrawn", locked.pk, withdrawn)
    return withdrawn


def _top_up_others(site: Site, *, exclude: int, now: datetime) -> None:
    """Reservations released from one curtailment may be what another at the site still
    needs (all flexible load, or short of its target): plan those again on top of what they
    already shed (a covered one takes nothing more)."""
    others = (
        Curtailment.objects.select_for_update()
        .filter(site=site, called_off_at__isnull=True)
        .filter(Q(until__isnull=True) | Q(until__gt=now))
        .filter(Q(target_mw__isnull=True) | Q(short_kw__gt=0))
        .exclude(pk=exclude)
        .order_by("pk")
    )
    for other in others:
        call_notice = other.short_notice or other.demand_response_event_id is not None
        at, _short = _preempt_at_for(other, now=now, call_notice=call_notice, keep_preempt_at=True)
        if other.until is not None and at >= other.until:
            continue  # its window ends before a notice given now could run out: nothing to add
        _plan(other, site=site, now=now, call_notice=call_notice, user=None, keep_preempt_at=True)


def _lock_site(site_id: int) -> Site:
    """The site row, then every node of it in id order (the lock a booking takes first), so
    a booking at the site is placed wholly before or wholly after the plan. Without their keys
    (NO KEY UPDATE): a transaction that holds a reservation this plan will lock next and, at its
    commit, checks a foreign key to the site or a node (a row that names them) takes only a key
    share, which these locks let through; FOR UPDATE would block it there and deadlock."""
    site = Site.objects.select_for_update(no_key=True).get(pk=site_id)
    with connection.cursor() as cur:
        cur.execute(
            "SELECT id FROM inventory_node WHERE site_id = %s ORDER BY id FOR NO KEY UPDATE",
            [site_id],
        )
    return site


def site_flexible_kw(
    *,
    site: Site,
    shed_at: datetime,
    until: datetime | None,
    now: datetime | None = None,
    curtailment: Curtailment | None = None,
) -> Decimal:
    """The draw a curtailment of the site from shed_at to until could shed now (its
    candidates' draws, unlocked): what a zone's call is spread by. `curtailment`: the site's
    curtailment for this very call, re-planned: what it sheds in that window counts too (its
    victims are no longer candidates, and a re-plan keeps them)."""
    now = now or timezone.now()
    since = max(shed_at, now)
    probe = Curtailment(site=site, shed_at=shed_at, until=until)
    flexible = _candidates(
        site=site,
        curtailment=probe,
        tiers=[Tier.INTERRUPTIBLE],
        preempt_at=since,
        lock=False,
    )
    draws = reservation_draws(flexible, site=site, now=now)
    kw = sum((kw for kw, _basis in draws.values()), Decimal(0))
    if curtailment is not None:
        kept = _shedding(curtailment.pk, since=since, until=until)
        kw += sum((v.draw_kw for v in kept), Decimal(0))
    return kw


def _candidates(
    *, site: Site, curtailment: Curtailment, tiers, preempt_at: datetime, lock: bool = True
):
    window = Q(ends_at__gt=preempt_at) & (
        Q() if curtailment.until is None else Q(starts_at__lt=curtailment.until)
    )
    rows = Reservation.objects.select_for_update(of=("self",)) if lock else Reservation.objects
    return list(
        rows.filter(window, site=site, tier__in=tiers, status__in=PREEMPTIBLE_STATUSES)
        .exclude(
            Exists(
                CurtailmentVictim.objects.filter(
                    reservation=OuterRef("pk"), withdrawn_at__isnull=True
                )
            )
        )
        .select_related("organization", "gpu_model")
        .order_by("pk")
    )


def _plan(
    curtailment: Curtailment,
    *,
    site: Site,
    now: datetime,
    call_notice: bool,
    user,
    keep_preempt_at: bool = False,
    before: dict[int, datetime] | None = None,
    expected: str | None = None,
):
    """Make the plan (_plan_make) and shed each victim: preempted now if it has not started
    by then, else given notice; then its totals, the log line and the e-mails. `expected`:
    the fingerprint the plan must have, else PlanChanged before anything is shed."""
    plan = _plan_make(
        curtailment, site=site, now=now, call_notice=call_notice, keep_preempt_at=keep_preempt_at
    )
    if expected is not None and plan.fingerprint != expected:
        raise PlanChanged(plan)
    preempt_at = plan.preempt_at
    cause = _curtailment_cause(curtailment, site=site, now=now)
    notified, preempted = [], []
    for victim in plan.victims:
        reservation = victim.reservation
        shed = _victim_shed(
            curtailment, reservation, draw=(victim.draw_kw, victim.basis), forced=victim.forced,
            before_start=victim.at_once, preempt_at=preempt_at, cause=cause, user=user, now=now,
            before=before,
        )  # fmt: skip
        if shed == "preempted":
            preempted.append(reservation)
        elif shed == "notified":
            notified.append(reservation)

    _totals(curtailment, now=now)
    logger.warning(
        "curtailment of %s from %s: target %s MW, shed %s kW (short %s kW); %d noticed, %d "
        "preempted now, %d forced",
        site.slug,
        curtailment.shed_at.isoformat(),
        "all flexible" if curtailment.target_mw is None else curtailment.target_mw,
        curtailment.shed_kw,
        curtailment.short_kw,
        len(notified),
        len(preempted),
        sum(1 for v in plan.victims if v.forced),
    )
    _email_notices(notified=notified, preempted=preempted, preempt_at=preempt_at, reason=cause)


def _plan_make(
    curtailment: Curtailment,
    *,
    site: Site,
    now: datetime,
    call_notice: bool,
    keep_preempt_at: bool = False,
    lock: bool = True,
) -> CurtailmentPlan:
    """Set when the curtailment preempts and choose the reservations it sheds (interruptible
    first, protected ones only when staff force it), each noticed or, if it would not have
    started by then, preempted at once. Writes nothing (`lock`: the candidates' rows are
    locked, for a plan that is then carried out)."""
    preempt_at = _preempt_at_set(
        curtailment, now=now, call_notice=call_notice, keep_preempt_at=keep_preempt_at
    )
    rows, draws, chosen, forced = _victims_select(
        curtailment, site=site, preempt_at=preempt_at, now=now, lock=lock
    )
    victims = tuple(
        PlannedVictim(
            reservation=rows[c.reservation_id],
            draw_kw=c.draw_kw,
            basis=draws[c.reservation_id][1],
            forced=is_forced,
            at_once=_before_start(rows[c.reservation_id], preempt_at),
        )
        for c, is_forced in [(c, False) for c in chosen] + [(c, True) for c in forced]
    )
    return CurtailmentPlan(
        preempt_at=preempt_at,
        short_notice=curtailment.short_notice,
        at_shed_time=preempt_at == curtailment.shed_at,
        target_kw=None if curtailment.target_mw is None else curtailment.target_mw * 1000,
        victims=victims,
    )


def _before_start(reservation: Reservation, preempt_at: datetime) -> bool:
    """It would only start at or after preempt_at: preempted at once (never runs, never
    charged) rather than noticed."""
    return reservation.status in _NOT_STARTED and reservation.starts_at >= preempt_at


def _preempt_at_set(
    curtailment: Curtailment, *, now: datetime, call_notice: bool, keep_preempt_at: bool
) -> datetime:
    """When the curtailment preempts: its start, but not before the minimum notice unless the
    grid operator's call gave less (nor earlier than set before, when kept); short notice is
    marked on it. Refused when the window ends first."""
    preempt_at, short_notice = _preempt_at_for(
        curtailment, now=now, call_notice=call_notice, keep_preempt_at=keep_preempt_at
    )
    if curtailment.until is not None and preempt_at >= curtailment.until:
        raise ValidationFailed(
            "The window ends before the minimum notice runs out "
            f"({settings.CURTAILMENT_MIN_NOTICE.total_seconds():.0f} s).",
            code="notice_too_short",
            field="until",
        )
    curtailment.preempt_at, curtailment.short_notice = preempt_at, short_notice
    return preempt_at


def _preempt_at_for(
    curtailment: Curtailment, *, now: datetime, call_notice: bool, keep_preempt_at: bool
) -> tuple[datetime, bool]:
    """When a plan made now would preempt, and whether that is short notice (no writes)."""
    minimum = now + settings.CURTAILMENT_MIN_NOTICE
    preempt_at = max(curtailment.shed_at, now)
    if preempt_at < minimum and not call_notice:
        preempt_at = minimum  # the minimum notice is honoured
    if keep_preempt_at and curtailment.preempt_at is not None:
        preempt_at = max(curtailment.preempt_at, preempt_at)
    short_notice = preempt_at < minimum or (keep_preempt_at and curtailment.short_notice)
    return preempt_at, short_notice


def _curtailment_cause(curtailment: Curtailment, *, site: Site, now: datetime) -> str:
    """Why a reservation is shed, in words (with the short notice, if so)."""
    notice_s = int((curtailment.preempt_at - now).total_seconds())
    gave = f"gave {notice_s} s" if notice_s > 0 else "gave no notice"
    short = (
        f" Short notice: the grid operator's call {gave}, less than our usual "
        f"{settings.CURTAILMENT_MIN_NOTICE.total_seconds():.0f} s."
        if curtailment.short_notice
        else ""
    )
    reason = curtailment.reason.strip()
    if short and reason and reason[-1] not in ".!?":
        reason += "."  # the operator's words, then ours: two sentences, not one run together
    return f"Grid curtailment at {site.name} from {iso_utc(curtailment.shed_at)}: {reason}{short}"


def _victims_select(
    curtailment: Curtailment, *, site: Site, preempt_at: datetime, now: datetime, lock: bool
):
    """The reservations to shed towards the target not yet met by those kept: interruptible
    ones, then protected ones when staff force it and those fall short. Returns the rows and
    draws by id, and the chosen and the forced candidates."""
    target_kw = None if curtailment.target_mw is None else curtailment.target_mw * 1000
    kept = list(_shedding(curtailment.pk, since=preempt_at, until=curtailment.until))
    # Load sold in the window since an earlier plan counts on top of the target: a re-plan
    # that shed less than target + sold would leave the window oversold. A victim that was
    # such a sale sheds nothing of the target (its take goes with it).
    sold = _sold_kw(curtailment, now=now, skip={v.reservation_id for v in kept})
    need = (
        None
        if target_kw is None
        else target_kw + sold - _effective_kw(kept, _sold_here(curtailment))
    )

    flexible = _candidates(
        site=site,
        curtailment=curtailment,
        tiers=[Tier.INTERRUPTIBLE],
        preempt_at=preempt_at,
        lock=lock,
    )
    rows = {r.pk: r for r in flexible}
    draws = reservation_draws(flexible, site=site, now=now)
    chosen = victims_choose(_as_candidates(flexible, draws), need)
    forced: list = []
    covered = sum((c.draw_kw for c in chosen), Decimal(0))
    if need is not None and covered < need and curtailment.forced_reason:
        protected = _candidates(
            site=site,
            curtailment=curtailment,
            tiers=_PROTECTED_TIERS,
            preempt_at=preempt_at,
            lock=lock,
        )
        rows.update({r.pk: r for r in protected})
        protected_draws = reservation_draws(protected, site=site, now=now)
        draws.update(protected_draws)
        forced = victims_choose(_as_candidates(protected, protected_draws), need - covered)
    return rows, draws, chosen, forced


def _victim_shed(
    curtailment: Curtailment,
    reservation: Reservation,
    *,
    draw: tuple,
    forced: bool,
    before_start: bool,
    preempt_at: datetime,
    cause: str,
    user,
    now: datetime,
    before: dict[int, datetime] | None,
) -> str | None:
    """Record the reservation as shed and act: preempt it now if it has not started by
    `preempt_at` (`before_start`), else give it notice (again only if its time changed).
    Returns "preempted", "notified", or None when it was told that time already."""
    _victim_record(
        curtailment, reservation, draw=draw, forced=forced, before_start=before_start,
        preempt_at=preempt_at, now=now,
    )  # fmt: skip
    why = cause + (f" (forced by staff: {curtailment.forced_reason})" if forced else "")
    if forced:
        audit_record(
            organization_id=reservation.organization_id,
            action="reservation.preempt_forced",
            object_type="reservation",
            object_id=reservation.public_id,
            changes={
                "curtailment": curtailment.pk,
                "reason": curtailment.forced_reason,
                "preempt_at": iso_utc(preempt_at),
                "tier": reservation.tier,
            },
            actor=f"staff:{user.get_username()}" if user is not None else None,
        )
    if before_start:
        reservation_transition(
            reservation=reservation,
            to_status=ReservationStatus.PREEMPTED,
            cause=why,
            actor_label=_ACTOR,
            force_preemption=forced,
        )
        return "preempted"
    unchanged = (before or {}).get(reservation.pk) == preempt_at
    _notice(reservation, preempt_at=preempt_at, cause=why, announce=not unchanged)
    return None if unchanged else "notified"  # unchanged: told already, at that time


def _victim_record(
    curtailment: Curtailment,
    reservation: Reservation,
    *,
    draw: tuple,
    forced: bool,
    before_start: bool,
    preempt_at: datetime,
    now: datetime,
) -> None:
    """The victim row: its draw, and the GPU-hours and revenue forgone from the stop on."""
    kw, basis = draw
    stop = reservation.starts_at if before_start else max(reservation.starts_at, preempt_at)
    hours = (
        Decimal(reservation.gpu_count)
        * Decimal(int((reservation.ends_at - stop).total_seconds()))
        / Decimal(3600)
    )
    CurtailmentVictim.objects.create(
        curtailment=curtailment,
        reservation=reservation,
        tier=reservation.tier,
        draw_kw=kw,
        draw_basis=basis,
        forced=forced,
        outcome=(
            CurtailmentVictim.Outcome.PREEMPTED
            if before_start
            else CurtailmentVictim.Outcome.NOTICED
        ),
        gpu_hours_forgone=hours.quantize(_KW, rounding=ROUND_HALF_UP),
        revenue_forgone=money_round(hours * reservation.price_per_gpu_hour, reservation.currency),
        chosen_at=now,
    )


def _as_candidates(reservations, draws) -> list[Candidate]:
    return [
        Candidate(
            reservation_id=r.pk,
            draw_kw=draws[r.pk][0],
            price_per_gpu_hour=r.price_per_gpu_hour,
            started=r.activated_at or r.starts_at,
            basis=draws[r.pk][1],
        )
        for r in reservations
    ]


def _sold_kw(curtailment: Curtailment, *, now: datetime, skip=()) -> Decimal:
    """The most load sold at once in the rest of the window out of its over-shed (the takes
    of bookings made since it was planned, marketplace.services.allocation), leaving out the
    reservations in `skip` (its victims: their takes end when they are preempted)."""
    if curtailment.pk is None:
        return Decimal(0)
    lo = max(curtailment.shed_at, now)
    if curtailment.until is not None and curtailment.until <= lo:
        return Decimal(0)
    with connection.cursor() as cur:
        cur.execute(
            "SELECT marketplace_curtailment_sold_kw(%s::bigint, %s::timestamptz, "
            "coalesce(%s::timestamptz, 'infinity'), %s::bigint[])",
            [curtailment.pk, lo, curtailment.until, sorted(skip)],
        )
        return cur.fetchone()[0]


def _sold_here(curtailment: Curtailment) -> set[int]:
    """The reservations that bought load in the window after it was planned (a take, empty
    once given back). Shedding one only undoes its own sale: its draw counts against the
    target as nothing, and its take no longer counts as sold."""
    if curtailment.pk is None:  # a preview: nothing sold against it
        return set()
    return set(
        CurtailmentTake.objects.filter(
            curtailment=curtailment, reservation__isnull=False
        ).values_list("reservation_id", flat=True)
    )


def _effective_kw(victims, sold_here: set[int]) -> Decimal:
    """What the victims shed of the load the site had when the plan was made."""
    return sum((v.draw_kw for v in victims if v.reservation_id not in sold_here), Decimal(0))


def _shedding(curtailment_id: int, *, since: datetime, until: datetime | None):
    """The curtailment's victims in effect whose booked time meets [since, until): only they
    shed in that window. One preempted for a window the call has since moved away from sheds
    nothing in the new one (it stays preempted, and on the record as forgone)."""
    booked = Q(reservation__ends_at__gt=since)
    if until is not None:
        booked &= Q(reservation__starts_at__lt=until)
    return CurtailmentVictim.objects.filter(
        booked, curtailment_id=curtailment_id, withdrawn_at__isnull=True
    )


def _totals(curtailment: Curtailment, *, now: datetime) -> None:
    """The record's figures from its victims in effect (short of the target counts the load
    sold in the window since, which must be shed too)."""
    live = list(
        CurtailmentVictim.objects.filter(
            curtailment=curtailment, withdrawn_at__isnull=True
        ).annotate(currency=F("reservation__currency"))
    )
    since = curtailment.preempt_at or curtailment.shed_at
    shedding = list(_shedding(curtailment.pk, since=since, until=curtailment.until))
    # A victim that was itself sold in the window since sheds none of the load the plan had.
    shed = _effective_kw(shedding, _sold_here(curtailment))
    sold = _sold_kw(curtailment, now=now, skip={v.reservation_id for v in shedding})
    target_kw = None if curtailment.target_mw is None else curtailment.target_mw * 1000
    curtailment.shed_kw = shed
    curtailment.short_kw = (
        Decimal(0)
        if target_kw is None or curtailment.called_off_at is not None  # it never happens
        else max(target_kw + sold - shed, Decimal(0))
    )
    curtailment.headroom_kw = Decimal(0) if target_kw is None else max(shed - target_kw, Decimal(0))
    curtailment.reservations_notified = sum(
        1 for v in live if v.outcome == CurtailmentVictim.Outcome.NOTICED
    )
    curtailment.reservations_preempted = len(live) - curtailment.reservations_notified
    curtailment.gpu_hours_forgone = sum((v.gpu_hours_forgone for v in live), Decimal(0))
    curtailment.revenue_forgone = sum((v.revenue_forgone for v in live), Decimal(0))
    currencies = {v.currency for v in live}
    if len(currencies) == 1:  # the victims' prices' currency, not the platform's default
        curtailment.currency = currencies.pop()
    elif currencies:
        logger.warning(
            "curtailment %s: victims priced in %s; its revenue total mixes currencies",
            curtailment.pk,
            ", ".join(sorted(currencies)),
        )
    curtailment.save()


def _withdraw(
    curtailment: Curtailment, *, now: datetime, announce: bool = True
) -> dict[int, datetime]:
    """Withdraw the notices of this curtailment not yet carried out (with the event, if
    `announce`); returns the reservations' ids with the time their notice said. The victims
    and their reservations are locked together: one the dispatcher is preempting at that
    moment is read again once it commits, and left preempted (test_grid_probe_call_off_race)."""
    pending = list(
        CurtailmentVictim.objects.select_for_update()
        .filter(
            curtailment=curtailment,
            withdrawn_at__isnull=True,
            reservation__status__in=PREEMPTIBLE_STATUSES,
        )
        .select_related("reservation")
        .order_by("pk")
    )
    withdrawn = {}
    for victim in pending:
        reservation = victim.reservation
        withdrawn[reservation.pk] = reservation.preempt_at
        victim.withdrawn_at = now
        victim.save(update_fields=["withdrawn_at"])
        Reservation.objects.filter(pk=reservation.pk).update(
            preempt_at=None, preempt_reason="", updated_at=now
        )
        reservation.preempt_at, reservation.preempt_reason = None, ""
        if announce:
            reservation_event_record(
                reservation=reservation, type=EventType.RESERVATION_INTERRUPTION_WITHDRAWN
            )
    return withdrawn


def _notice(
    reservation: Reservation, *, preempt_at: datetime, cause: str, announce: bool = True
) -> None:
    """Give notice of a preemption at preempt_at; an earlier notice already given stands.
    `announce`: send the event (not when the customer was told this very time already)."""
    if reservation.preempt_at is not None and reservation.preempt_at <= preempt_at:
        return
    reservation.preempt_at, reservation.preempt_reason = preempt_at, cause
    reservation.save(update_fields=["preempt_at", "preempt_reason", "updated_at"])
    if announce:
        reservation_event_record(
            reservation=reservation, type=EventType.RESERVATION_INTERRUPTION_SCHEDULED
        )


def reservations_preempt_due(*, now: datetime | None = None, limit: int = 500) -> int:
    """Preempt every reservation whose notice has run out; returns how many.

    Run by the dispatcher before it looks for work to tear down, so the workload of a
    preempted running reservation is stopped in the same tick. Rows a worker holds are
    skipped and taken on the next tick. A protected reservation is preempted only as the
    forced victim of a curtailment (billing then credits it).
    """
    now = now or timezone.now()
    done = 0
    with transaction.atomic():
        due = list(
            Reservation.objects.filter(preempt_at__lte=now, status__in=PREEMPTIBLE_STATUSES)
            .select_for_update(skip_locked=True)
            .order_by("preempt_at", "pk")[:limit]
        )
        forced = set(
            CurtailmentVictim.objects.filter(
                reservation__in=[r.pk for r in due], forced=True, withdrawn_at__isnull=True
            ).values_list("reservation_id", flat=True)
        )
        for reservation in due:
            if reservation.tier != Tier.INTERRUPTIBLE and reservation.pk not in forced:
                # A protected reservation no curtailment forces: its notice is void. Lifted
                # (with the event), so the next ticks do not take it again ahead of the
                # interruptible work that is due.
                logger.error("notice on protected reservation %s withdrawn", reservation.public_id)
                Reservation.objects.filter(pk=reservation.pk).update(
                    preempt_at=None, preempt_reason="", updated_at=now
                )
                reservation.preempt_at, reservation.preempt_reason = None, ""
                reservation_event_record(
                    reservation=reservation, type=EventType.RESERVATION_INTERRUPTION_WITHDRAWN
                )
                continue
            # Billing ends at the notice's time, as the notice promised, not at this tick
            # (late when beat or the workers were held up); never before the work started.
            stop = max(reservation.preempt_at, reservation.activated_at or reservation.preempt_at)
            if reservation.released_at is None:
                Reservation.objects.filter(pk=reservation.pk).update(released_at=stop)
                reservation.released_at = stop  # the transition keeps a released_at set
            reservation_transition(
                reservation=reservation,
                to_status=ReservationStatus.PREEMPTED,
                cause=reservation.preempt_reason or "Preempted.",
                actor_label=_ACTOR,
                force_preemption=reservation.pk in forced,
            )
            done += 1
    return done


def _email_notices(*, notified, preempted, preempt_at: datetime, reason: str) -> None:
    by_org: dict[int, list[str]] = {}
    for reservation in notified:
        by_org.setdefault(reservation.organization_id, []).append(
            f"- {reservation.public_id} ({reservation.gpu_count} GPU(s), {reservation.tier}): "
            f"stops at {max(preempt_at, reservation.starts_at).astimezone(UTC):%Y-%m-%d %H:%M} UTC"
            f"\n  {portal_link('portal:reservation', public_id=reservation.public_id)}"
        )
    for reservation in preempted:
        by_org.setdefault(reservation.organization_id, []).append(
            f"- {reservation.public_id} ({reservation.gpu_count} GPU(s), {reservation.tier}): "
            "will not start (nothing is charged)"
            f"\n  {portal_link('portal:reservation', public_id=reservation.public_id)}"
        )
    for org_id, lines in by_org.items():
        recipients = list(
            Membership.objects.filter(
                organization_id=org_id,
                role__in=[Role.OWNER, Role.ADMIN],
                user__is_active=True,  # not an account deactivated since
            )
            .exclude(user__email="")
            .values_list("user__email", flat=True)
        )
        if not recipients:
            continue
        body = (
            "The site's grid operator has asked it to shed load. These reservations are "
            "preempted:\n\n" + "\n".join(lines) + f"\n\nReason: {reason}\n"
            "Time after the stop is not charged. Other reservations at the site keep running."
        )
        mail_send_on_commit(
            subject="Switchyard: reservations preempted (grid curtailment)",
            body=body,
            recipients=recipients,
        )
