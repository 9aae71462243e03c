"""Demand-response calls taken automatically: a grid operator's or aggregator's signed call
becomes a curtailment with no person (docs/grid.md#demand-response-calls).

- A source (DemandResponseSource, set up by staff) signs each request with its secret:
  HMAC-SHA256 over "<timestamp>.<body>" (`demand_response_signature`). A request is refused,
  and changes nothing, when it is unsigned, from an unknown source, stale (its timestamp
  further than DEMAND_RESPONSE_SIGNATURE_TOLERANCE from our clock) or badly signed
  (`demand_response_verify`), or when its signature was accepted before (a replay: the
  signature is stored, unique per source, in the same transaction as the call's effect).
- A call is idempotent by (source, event id): the same call again answers the state it made;
  a higher modification number changes it (megawatts, window: the curtailments are planned
  again) or cancels it (before its start: called off, the window sold again; during it:
  ended now); a lower one, or the same number with another content, is refused (409).
- A call names a site or a price zone (a source is granted sites and zones; a zone granted
  grants its sites). A zone's call is spread over the zone's sites (active or curtailed) in proportion to their flexible load when the
  call arrives (on a modification, with what each already sheds for it), in whole kilowatts
  (each site's share at most what it can shed, so the shares cover the call
  whenever the zone's flexible load does); with no flexible load anywhere, in proportion to
  the sites' power capacity (each then records what it is short). "All flexible load" is
  all of it at every site.
- Demand-response calls give the notice they give: the curtailment preempts at the call's
  start even if that is sooner than the minimum notice, and the notice says so.
"""

import hashlib
import hmac
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_DOWN, Decimal

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from config.errors import Conflict, PermissionDenied, ValidationFailed
from inventory.models import PriceZone, Site, SiteStatus
from marketplace.models import (
    Curtailment,
    DemandResponseEvent,
    DemandResponseNonce,
    DemandResponseSource,
)
from marketplace.services.curtailment import (
    curtailment_announce,
    curtailment_call_off,
    curtailment_replan,
    site_flexible_kw,
)

__all__ = [
    "DemandResponseCall",
    "SignatureRefused",
    "demand_response_signature",
    "demand_response_verify",
    "demand_response_apply",
]

_WHOLE_KW = Decimal(1)


class SignatureRefused(Exception):
    """The request is not a valid signed call from a known source (code says why)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class DemandResponseCall:
    event_id: str
    modification_number: int
    status: str
    site: str | None
    zone: str | None
    starts_at: datetime
    ends_at: datetime
    target_mw: Decimal | None
    reason: str


def demand_response_signature(*, secret: str, timestamp: str, body: bytes) -> str:
    """The hex HMAC-SHA256 a source sends in X-DR-Signature (as "sha256=<hex>")."""
    message = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def demand_response_verify(
    *, source_name: str, timestamp: str, signature: str, body: bytes, now: datetime | None = None
) -> tuple[DemandResponseSource, str]:
    """The source and the signature's hex digest, or SignatureRefused. Reads only."""
    now = now or timezone.now()
    if not (source_name and timestamp and signature):
        raise SignatureRefused(
            "signature_missing",
            "Sign the call: X-DR-Source, X-DR-Timestamp and X-DR-Signature are required.",
        )
    # A NUL cannot be in a name (nor in a PostgreSQL string: the lookup itself would fail).
    source = (
        None
        if "\x00" in source_name
        else DemandResponseSource.objects.filter(name=source_name, is_active=True).first()
    )
    if source is None:
        raise SignatureRefused("unknown_source", "No active demand-response source of that name.")
    # ASCII digits only, and no more of them than a time this century has: int() would also
    # read "1_0", other scripts' digits, and numbers too large to compare with a clock.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 11):
        raise SignatureRefused("timestamp_invalid", "X-DR-Timestamp must be Unix seconds.")
    sent_at = int(timestamp)
    skew = abs(now.timestamp() - sent_at)
    if skew > settings.DEMAND_RESPONSE_SIGNATURE_TOLERANCE.total_seconds():
        raise SignatureRefused(
            "timestamp_stale",
            f"X-DR-Timestamp is {skew:.0f} s from our clock; at most "
            f"{settings.DEMAND_RESPONSE_SIGNATURE_TOLERANCE.total_seconds():.0f} s is accepted.",
        )
    digest = signature.removeprefix("sha256=").strip().lower()
    # As bytes: compare_digest refuses str with non-ASCII characters (a TypeError, not a no).
    if not any(
        hmac.compare_digest(
            digest.encode(),
            demand_response_signature(secret=secret, timestamp=timestamp, body=body).encode(),
        )
        for secret in source.secrets_accepted(now)
    ):
        raise SignatureRefused("signature_invalid", "The signature does not match the body.")
    return source, digest


def _nonce_take(*, source: DemandResponseSource, digest: str, now: datetime) -> None:
    """Record the signature, or Conflict if it was accepted before (a replay). The source's
    signatures older than twice the tolerance are dropped: their timestamps are stale anyway.
    Only its own, under its lock: deleting another source's locks those rows to this call's
    commit, so one source's call (a zone's planning) held up every other source's."""
    DemandResponseNonce.objects.filter(
        source=source, seen_at__lt=now - 2 * settings.DEMAND_RESPONSE_SIGNATURE_TOLERANCE
    ).delete()
    try:
        with transaction.atomic():
            DemandResponseNonce.objects.create(source=source, signature=digest, seen_at=now)
    except IntegrityError:
        raise Conflict(
            "This signed request was already received (a replay); sign each request anew.",
            code="replayed",
        ) from None


@transaction.atomic
def demand_response_apply(
    *,
    source: DemandResponseSource,
    digest: str,
    call: DemandResponseCall,
    body: dict,
    now: datetime | None = None,
) -> tuple[DemandResponseEvent, str]:
    """Apply a verified call; returns its event and what happened ("created", "updated",
    "cancelled" or "unchanged"). Refusals raise and write nothing (not even the nonce)."""
    now = now or timezone.now()
    # One call of a source at a time: the same event sent twice at once is applied once.
    DemandResponseSource.objects.select_for_update().get(pk=source.pk)
    _nonce_take(source=source, digest=digest, now=now)
    site, zone = _target(source=source, call=call)
    event = (
        DemandResponseEvent.objects.select_for_update()
        .filter(source=source, event_id=call.event_id)
        .first()
    )
    if event is None:
        return _create(source=source, call=call, site=site, zone=zone, body=body, now=now)
    if (event.site_id, event.zone_id) != (
        site.pk if site else None,
        zone.pk if zone else None,
    ):
        raise ValidationFailed(
            "A call cannot move to another site or zone; cancel it and send a new event.",
            code="target_changed",
            field="site" if site else "zone",
        )
    if call.modification_number < event.modification_number:
        raise Conflict(
            f"Modification {call.modification_number} is older than the one applied "
            f"({event.modification_number}).",
            code="stale_modification",
            field="modification_number",
        )
    if call.modification_number == event.modification_number:
        if _same(event, call):
            return event, "unchanged"
        raise Conflict(
            f"Modification {call.modification_number} was applied with other content; "
            "raise modification_number to change the call.",
            code="modification_number_reused",
            field="modification_number",
        )
    if event.status == DemandResponseEvent.Status.CANCELLED:
        raise Conflict("This event was cancelled; send a new event id.", code="event_cancelled")
    _record(event, call=call, body=body)
    if call.status == DemandResponseEvent.Status.CANCELLED:
        for curtailment in _in_effect(event, now):
            curtailment_call_off(curtailment=curtailment, now=now)
        return event, "cancelled"
    in_effect = _in_effect(event, now)
    if call.ends_at <= now and in_effect:
        # The window moved to end at a time already past: the load comes back now, as at a
        # cancellation during the window (no window ends in the past).
        for curtailment in in_effect:
            curtailment_call_off(curtailment=curtailment, now=now)
        return event, "updated"
    _replan(event, source=source, call=call, site=site, zone=zone, now=now)
    return event, "updated"


def _target(*, source, call: DemandResponseCall):
    if call.site:
        site = Site.objects.filter(slug=call.site).first()
        if site is None:
            raise ValidationFailed(
                f"Unknown site {call.site!r}.", code="unknown_site", field="site"
            )
        granted = source.sites.filter(pk=site.pk).exists() or (
            site.price_zone_id is not None and source.zones.filter(pk=site.price_zone_id).exists()
        )  # a zone granted grants its sites
        if not granted:
            raise PermissionDenied(
                f"{source.name} may not curtail {site.slug}.", code="site_not_allowed"
            )
        return site, None
    zone = PriceZone.objects.filter(code=call.zone).first()
    if zone is None:
        raise ValidationFailed(f"Unknown zone {call.zone!r}.", code="unknown_zone", field="zone")
    if not source.zones.filter(pk=zone.pk).exists():
        raise PermissionDenied(
            f"{source.name} may not curtail {zone.code}.", code="zone_not_allowed"
        )
    return None, zone


def _same(event: DemandResponseEvent, call: DemandResponseCall) -> bool:
    return (
        event.status,
        event.starts_at,
        event.ends_at,
        event.target_mw,
        event.reason,
    ) == (call.status, call.starts_at, call.ends_at, call.target_mw, call.reason)


def _record(event: DemandResponseEvent, *, call: DemandResponseCall, body: dict) -> None:
    event.modification_number = call.modification_number
    event.status = call.status
    event.starts_at, event.ends_at = call.starts_at, call.ends_at
    event.target_mw, event.reason, event.body = call.target_mw, call.reason, body
    event.save()


def _reason(source, call: DemandResponseCall) -> str:
    why = f" — {call.reason}" if call.reason else ""
    return f"Demand-response event {call.event_id} from {source.name}{why}"


def _create(*, source, call, site, zone, body, now):
    event = DemandResponseEvent.objects.create(
        source=source,
        event_id=call.event_id,
        modification_number=call.modification_number,
        status=call.status,
        site=site,
        zone=zone,
        starts_at=call.starts_at,
        ends_at=call.ends_at,
        target_mw=call.target_mw,
        reason=call.reason,
        body=body,
    )
    if call.status == DemandResponseEvent.Status.CANCELLED:
        return event, "cancelled"  # cancelled before we heard of it: nothing to shed
    if call.ends_at <= now:
        raise ValidationFailed("The call's window has already ended.", field="end")
    for target_site, share in _shares(source=source, call=call, site=site, zone=zone, now=now):
        curtailment_announce(
            site=target_site,
            shed_at=max(call.starts_at, now),
            until=call.ends_at,
            target_mw=share,
            reason=_reason(source, call),
            call_notice=True,
            demand_response_event=event,
            now=now,
        )
    return event, "created"


def _in_effect(event: DemandResponseEvent, now: datetime) -> list[Curtailment]:
    return [
        c
        for c in event.curtailments.filter(called_off_at__isnull=True).order_by("site_id", "pk")
        if c.until is None or c.until > now
    ]


def _replan(event, *, source, call, site, zone, now) -> None:
    if call.ends_at <= now:
        raise ValidationFailed("The call's window has already ended.", field="end")
    current = {c.site_id: c for c in _in_effect(event, now)}
    shares = dict(
        (s.pk, (s, share))
        for s, share in _shares(
            source=source, call=call, site=site, zone=zone, now=now, current=current
        )
    )
    for site_id, curtailment in sorted(current.items()):
        if site_id not in shares:
            curtailment_call_off(curtailment=curtailment, now=now)
    for site_id, (target_site, share) in sorted(shares.items()):
        if site_id in current:
            curtailment_replan(
                curtailment=current[site_id],
                shed_at=max(call.starts_at, now),
                until=call.ends_at,
                target_mw=share,
                reason=_reason(source, call),
                now=now,
            )
        else:
            curtailment_announce(
                site=target_site,
                shed_at=max(call.starts_at, now),
                until=call.ends_at,
                target_mw=share,
                reason=_reason(source, call),
                call_notice=True,
                demand_response_event=event,
                now=now,
            )


def _shares(
    *, source, call, site, zone, now, current: dict[int, Curtailment] | None = None
) -> list[tuple[Site, Decimal | None]]:
    """Each site's part of the call (None: all its flexible load), as the module says.
    `current`: the call's curtailments by site, when it is modified: what each already sheds
    for it is part of that site's flexible load."""
    if site is not None:
        return [(site, call.target_mw)]
    sites = list(
        zone.sites.filter(status__in=[SiteStatus.ACTIVE, SiteStatus.CURTAILED]).order_by("pk")
    )
    if not sites:
        raise Conflict(f"Zone {zone.code} has no site that can shed load.", code="zone_empty")
    if call.target_mw is None:
        return [(s, None) for s in sites]
    shed_at = max(call.starts_at, now)
    current = current or {}
    weights = [
        site_flexible_kw(
            site=s, shed_at=shed_at, until=call.ends_at, now=now, curtailment=current.get(s.pk)
        )
        for s in sites
    ]
    if sum(weights) == 0:
        weights = [Decimal(s.power_capacity_kw) for s in sites]
    total = sum(weights)
    if total == 0:
        weights, total = [Decimal(1)] * len(sites), Decimal(len(sites))
    # Whole kilowatts, as a curtailment's target is stored (MW to 3 places): each share rounded
    # down, then the kilowatts left one each to the largest remainders (the first site on a
    # tie), so the shares sum to the call and none exceeds its exact part by a kilowatt.
    target_kw = call.target_mw * 1000
    exact = [target_kw * w / total for w in weights]
    kws = [e.quantize(_WHOLE_KW, rounding=ROUND_DOWN) for e in exact]
    left = int(target_kw - sum(kws))
    by_remainder = sorted(
        (i for i, w in enumerate(weights) if w > 0), key=lambda i: (kws[i] - exact[i], i)
    )
    for i in by_remainder[:left]:
        kws[i] += 1
    return [(s, kw / 1000) for s, kw in zip(sites, kws, strict=True) if kw > 0]
