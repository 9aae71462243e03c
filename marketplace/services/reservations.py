"""Reservations: create (from a quote or directly), cancel, extend.

Create holds GPUs at once: the allocations are inserted in the same transaction as the
reservation, so a reservation booked ahead keeps its GPUs. A start within START_SKEW of now
makes it `scheduled` (due; the provisioning worker picks it up), a later start `pending`.

Cancellation rule (stated before by cancellation_terms, applied after by reservation_cancel):
the "unused amount" is what was charged up front for the part of the period not yet begun.
- on-demand and interruptible are charged only as used: nothing was charged for time not
  used, so the unused amount and the refund are 0 (the fraction stays 1: nothing is kept).
- reserved (charged up front for its whole period): the unused amount is its price for the
  part not yet begun (the whole total before the start), rounded half-up to the cent; 100 %
  of it with at least 7 days' notice before the start, 50 % with at least 24 hours', nothing
  later or after the start (a term is a commitment) — except a term the platform has not got
  running by its start plus the start allowance (start_overdue_at): the delay is ours, so
  the unused rest is refunded in full (the wait itself is SLA downtime, billing's credits).
Cancelling before activation ends the reservation (cancelled); cancelling an active one stops
it early (releasing; the provisioning worker tears it down and completes it).
"""

from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from config.currency import money_round
from config.dates import iso_utc
from config.db import model_insert, retried_on_deadlock
from config.errors import (
    ApplicationError,
    Conflict,
    InvalidTransition,
    NotAvailable,
    NotFound,
    QuoteExpired,
    ValidationFailed,
)
from inventory.models import GpuModel, Site
from marketplace.audit import audit_context
from marketplace.funding import funding_gate
from marketplace.models import (
    Allocation,
    EventType,
    Organization,
    Quote,
    ResaleListing,
    Reservation,
    ReservationStatus,
    ReservationTransition,
    Term,
    Tier,
)
from marketplace.provisioning.kicks import provisioning_kick, release_kick
from marketplace.rules import MAX_DURATION, START_SKEW, validate_request_period
from marketplace.selectors.availability import (
    AvailabilityQuery,
    Offer,
    availability_search,
    site_model_offer,
)
from marketplace.selectors.reference import gpu_model_by_slug, site_by_slug
from marketplace.selectors.resale import (
    resale_breakdown,
    sold_whole_windows,
    term_unused_amount,
)
from marketplace.services.allocation import (
    allocation_place,
    curtailment_headroom_take,
    site_curtailed_refusal,
)
from marketplace.services.audit import audit_record
from marketplace.services.events import reservation_event_record
from marketplace.services.organizations import organization_active_check
from marketplace.services.pricing import period_total, validate_tier_term
from marketplace.services.quotes import nothing_available, resolve_catalogue
from marketplace.services.resale import (
    listings_withdraw_for_reservation,
    resale_allocations_transfer,
)
from marketplace.services.transitions import (
    extension_blocked_by_interruption,
    reservation_action_refusal,
    reservation_transition,
)

__all__ = [
    "BookingRequest",
    "BookingTerms",
    "CancellationTerms",
    "ExtensionTerms",
    "extension_terms",
    "cancellation_rule",
    "cancellation_terms",
    "start_allowance",
    "start_overdue_at",
    "reservation_book",
    "reservation_create",
    "reservation_cancel",
    "reservation_extend",
    "reservations_stop_for_suspension",
]

_FULL_NOTICE = timedelta(days=7)
_HALF_NOTICE = timedelta(hours=24)


@dataclass(frozen=True)
class CancellationTerms:
    action: str  # "cancel" (before activation) or "stop" (active: ends early)
    at: datetime
    currency: str
    unused_amount: Decimal
    refund_fraction: Decimal
    refund_amount: Decimal
    fee_amount: Decimal
    rule: str

    def as_dict(self) -> dict:
        d = asdict(self)
        d["at"] = iso_utc(self.at)
        return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in d.items()}


def start_allowance() -> timedelta:
    """How long after its start a reservation may take to become active before the wait is the
    platform's delay: the start's readiness deadline (PROVISIONING_READINESS_TIMEOUT_SECONDS,
    docs/provisioning.md), not a number of its own."""
    return timedelta(seconds=settings.PROVISIONING_READINESS_TIMEOUT_SECONDS)


def start_overdue_at(reservation: Reservation) -> datetime:
    """From when a reserved term (charged from its start) that is not yet active is late: its
    cancellation refunds the unused rest in full, and the SLA counts the wait as downtime.
    Counted from when its own hours begin: a term whose every GPU was sold for its first
    hours waits for them by its holder's choice (the buyer pays it for them), not ours."""
    return _own_hours_from(reservation) + start_allowance()


def _own_hours_from(reservation: Reservation) -> datetime:
    """The first instant from its start at which the term holds a GPU not sold: its start,
    or the end of the window sold whole that it falls in (sold_whole_windows)."""
    at = reservation.starts_at
    for lo, hi in sold_whole_windows(reservation=reservation):
        if lo <= at < hi:
            at = hi
    return min(at, reservation.ends_at)


def _restarting_since(reservation: Reservation) -> datetime | None:
    """When a term that had run went down to be started again by the platform (moved off a
    failed GPU, restarted in place, back from a resold window), if it is still not running
    again; None otherwise."""
    if reservation.activated_at is None or reservation.status not in (
        ReservationStatus.SCHEDULED,
        ReservationStatus.PROVISIONING,
    ):
        return None
    return (
        ReservationTransition.objects.filter(
            reservation=reservation, from_status=ReservationStatus.ACTIVE
        )
        .order_by("-at", "-id")
        .values_list("at", flat=True)
        .first()
    )


def cancellation_rule(tier: str) -> str:
    """The refund rule for a tier, in words: what a customer is told before reserving."""
    if tier == Tier.RESERVED:
        return (
            "Cancelling refunds the part not yet begun: in full with 7 days' notice or more, "
            "50 % with 24 hours' to 7 days' notice, nothing later or after the start; in full "
            f"if we have not got it running {_allowance_words()} after its start, or again "
            f"{_allowance_words()} after we stopped it to move or restart it."
        )
    return (
        "Cancel any time: only time used is charged, by the second; nothing is charged for "
        "time not used, so there is nothing to refund."
    )


def _allowance_words() -> str:
    seconds = int(start_allowance().total_seconds())
    return f"{seconds // 60} minutes" if seconds % 60 == 0 else f"{seconds} seconds"


def cancellation_terms(reservation: Reservation, at: datetime | None = None) -> CancellationTerms:
    """What cancelling at `at` (default now) would refund. Raises InvalidTransition if not allowed."""
    at = at or timezone.now()
    refusal = reservation_action_refusal(reservation, "cancel", at=at)
    if refusal:
        raise InvalidTransition(refusal, code="cancel_not_allowed")
    if reservation.tier != Tier.RESERVED:
        # Charged only as used: nothing was paid ahead, so nothing comes back and nothing is
        # kept. The fraction is 1 (all of nothing): a cancel naming the 1 shown still passes.
        nothing = money_round(Decimal("0"), reservation.currency)
        return CancellationTerms(
            action="stop" if reservation.status == ReservationStatus.ACTIVE else "cancel",
            at=at,
            currency=reservation.currency,
            unused_amount=nothing,
            refund_fraction=Decimal("1"),
            refund_amount=nothing,
            fee_amount=nothing,
            rule=f"{Tier(reservation.tier).label}: charged only for time used, by the second; "
            "nothing was charged for time not used, so there is nothing to refund.",
        )
    # Time resold to someone else is no longer the holder's to give back: its sale pays them.
    unused = term_unused_amount(reservation, since=at)
    notice = reservation.starts_at - at
    down_since = _restarting_since(reservation)
    if reservation.activated_at is None and at >= start_overdue_at(reservation):
        fraction = Decimal("1")
        rule = (
            f"reserved, not running {_allowance_words()} after its start: the delay is ours, "
            "the unused rest is refunded in full (the wait counts as downtime under the SLA)."
        )
    elif down_since is not None and at >= down_since + start_allowance():
        fraction = Decimal("1")
        rule = (
            f"reserved, not running again {_allowance_words()} after we stopped it to move or "
            "restart it: the delay is ours, the unused rest is refunded in full (the wait "
            "counts as downtime under the SLA)."
        )
    elif notice >= _FULL_NOTICE:
        fraction, rule = Decimal("1"), "reserved, 7 days' notice or more: full refund."
    elif notice >= _HALF_NOTICE:
        fraction, rule = Decimal("0.5"), "reserved, 24 hours' to 7 days' notice: 50 % refund."
    else:
        fraction = Decimal("0")
        rule = "reserved, under 24 hours' notice or after the start: no refund."
    # Half-up to the currency's minor unit, the one money rule (docs/money.md).
    refund = money_round(unused * fraction, reservation.currency)
    return CancellationTerms(
        action="stop" if reservation.status == ReservationStatus.ACTIVE else "cancel",
        at=at,
        currency=reservation.currency,
        unused_amount=unused,
        refund_fraction=fraction,
        refund_amount=refund,
        fee_amount=unused - refund,
        rule=rule,
    )


def _request_actor() -> str:
    """Who books without a user: the API key the request's audit context names (api_key:…),
    so the history can show the key's name; "api" outside a request."""
    context = audit_context()
    return context.actor if context is not None and context.actor else "api"


@dataclass(frozen=True, kw_only=True)
class BookingRequest:
    """What a customer asks to book: a quote to take, or GPUs, a period and a tier asked for
    directly (priced now), with the workload to run. Built and checked once by
    reservation_create; the phases below read it instead of a dozen arguments each."""

    organization: Organization
    user: AbstractBaseUser | None = None
    quote: Quote | None = None
    gpu_model: str | None = None
    gpu_count: int | None = None
    starts_at: datetime | None = None
    ends_at: datetime | None = None
    tier: str | None = None
    term: str = Term.NONE
    site: str | None = None  # the caller chose the site (from a search): book there only
    region: str | None = None
    # Only nodes whose 30-day reliability is at least this (0-1), as the search was filtered.
    min_reliability: Decimal | None = None
    # The most the caller will pay per GPU-hour (as a search's max_price): a booking priced now
    # above it is refused (409 price_above_max) instead of made at a price nobody saw.
    max_price_per_gpu_hour: Decimal | None = None
    workload: dict = field(default_factory=dict)
    # Resold time: the listing to book from (gpu_count GPUs for [starts_at, ends_at) in it).
    listing: ResaleListing | None = None
    # False: a booking the balance does not cover does not start the organisation's
    # automatic recharge; the 402 says what it would charge (the portal asks).
    auto_recharge: bool = True
    now: datetime

    def validate_direct(self) -> None:
        """A booking without a quote names everything, for a period and tier that may be sold."""
        for name in ("gpu_model", "gpu_count", "starts_at", "ends_at", "tier"):
            if getattr(self, name) is None:
                raise ValidationFailed(f"{name} is required without a quote.", field=name)
        validate_request_period(
            starts_at=self.starts_at, ends_at=self.ends_at, gpu_count=self.gpu_count, now=self.now
        )
        validate_tier_term(
            tier=self.tier, term=self.term, starts_at=self.starts_at, ends_at=self.ends_at
        )

    def availability_query(self, *, currency: str | None = None) -> AvailabilityQuery:
        """The search for what this booking asks (a booking takes an offer's price and
        placement only: no curtailment history), with `currency` only offers priced in it."""
        return AvailabilityQuery(
            gpu_count=self.gpu_count,
            starts_at=self.starts_at,
            ends_at=self.ends_at,
            tier=self.tier,
            term=self.term,
            gpu_model=self.gpu_model,
            site=self.site,
            region=self.region,
            min_reliability=self.min_reliability,
            max_price_per_gpu_hour=self.max_price_per_gpu_hour,
            currency=currency,
            with_history=False,
        )

    def price_check(self, *, price_per_gpu_hour: Decimal, currency: str, where: str) -> None:
        """Refuse a price above the caller's max_price (nothing is written)."""
        limit = self.max_price_per_gpu_hour
        if limit is not None and price_per_gpu_hour > limit:
            raise Conflict(
                f"{where} is {price_per_gpu_hour} {currency.upper()} per GPU-hour now, above "
                f"your max_price of {limit}: nothing was booked.",
                code="price_above_max",
                field="max_price",
            )


@dataclass(frozen=True, kw_only=True)
class BookingTerms:
    """What is written for a booking: where, how many GPUs, when, at what price (from an
    offer priced now, or from a quote). `site` and `gpu_model`, when the caller has them in
    hand, are kept on the reservation; `first_plan` is the placement the offer was read with."""

    site_id: int
    gpu_model_id: int
    gpu_count: int
    tier: str
    term: str
    starts_at: datetime
    ends_at: datetime
    currency: str
    price_per_gpu_hour: Decimal
    total_amount: Decimal
    breakdown: dict
    quote: Quote | None = None
    first_plan: list[tuple[int, int]] | None = None
    min_reliability: Decimal | None = None
    site: Site | None = None
    gpu_model: GpuModel | None = None
    # Resold time: the GPUs are moved from the listing's seller instead of placed.
    listing_id: int | None = None

    @classmethod
    def from_offer(cls, offer: Offer, request: BookingRequest) -> "BookingTerms":
        return cls(
            site_id=offer.site.pk,
            gpu_model_id=offer.gpu_model.pk,
            gpu_count=offer.gpu_count,
            tier=request.tier,
            term=request.term,
            starts_at=request.starts_at,
            ends_at=request.ends_at,
            currency=offer.currency,
            price_per_gpu_hour=offer.price_per_gpu_hour,
            total_amount=offer.total,
            breakdown=offer.breakdown.as_dict(),
            first_plan=_plan_from_offer(offer),
            min_reliability=request.min_reliability,
            site=offer.site,
            gpu_model=offer.gpu_model,
        )


@transaction.atomic
def reservation_create(
    *,
    organization: Organization,
    user=None,
    quote: Quote | None = None,
    gpu_model: str | None = None,
    gpu_count: int | None = None,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
    tier: str | None = None,
    term: str = Term.NONE,
    site: str | None = None,
    region: str | None = None,
    workload: dict | None = None,
    auto_recharge: bool = True,
    min_reliability: Decimal | None = None,
    listing: ResaleListing | None = None,
    max_price_per_gpu_hour: Decimal | None = None,
) -> Reservation:
    """Book GPUs from a quote (at its price) or directly (priced now); allocates them at once.
    With a `listing`, books resold time from it (its site, model, tier and asking price).

    The arguments are those of BookingRequest. The reservation comes back with what was just
    written in hand (`transition_list`, `allocation_list`, `outage_list`, as
    reservation_get_for_org loads them), so it can be shown without reading it back.
    """
    if workload is not None and not isinstance(workload, dict):
        raise ValidationFailed("workload must be an object.", field="workload")
    request = BookingRequest(
        organization=organization,
        user=user,
        quote=quote,
        gpu_model=gpu_model,
        gpu_count=gpu_count,
        starts_at=starts_at,
        ends_at=ends_at,
        tier=tier,
        term=term,
        site=site,
        region=region,
        workload=workload or {},
        auto_recharge=auto_recharge,
        min_reliability=min_reliability,
        listing=listing,
        max_price_per_gpu_hour=max_price_per_gpu_hour,
        now=timezone.now(),
    )
    if request.quote is not None:
        return reservation_book(request=request, terms=_quote_take(request))
    if request.listing is not None:
        return reservation_book(request=request, terms=_listing_terms(request))
    request.validate_direct()
    if request.site is not None:
        # Price and place at the chosen site only, from one read of its nodes, instead of
        # searching every site first.
        offer = _offer_at_site(request)
        request.price_check(
            price_per_gpu_hour=offer.price_per_gpu_hour,
            currency=offer.currency,
            where=f"The price at {offer.site.slug}",
        )
        return reservation_book(request=request, terms=BookingTerms.from_offer(offer, request))
    return _book_cheapest(request)


def _book_cheapest(request: BookingRequest) -> Reservation:
    """Book the cheapest offer; a site taken meanwhile falls through to the next."""
    resolve_catalogue(gpu_model=request.gpu_model, site=None, region=request.region)
    # Only offers in the currency the organisation is billed in: one in another would be
    # refused (currency_mismatch) while a site in its own currency has the GPUs.
    currency = funding_gate().billing_currency(organization_id=request.organization.pk)
    query = request.availability_query(currency=currency)
    for offer in availability_search(query):  # cheapest first
        try:
            with transaction.atomic():
                terms = BookingTerms.from_offer(offer, request)
                return reservation_book(request=request, terms=terms)
        except NotAvailable:
            continue
    raise nothing_available(query)


def _plan_from_offer(offer: Offer) -> list[tuple[int, int]]:
    """The placement the offer was computed with (best-fit node, or its cluster's nodes)."""
    if offer.placement == "single_node":
        return [(offer.nodes[0].node_id, offer.gpu_count)]
    plan, remaining = [], offer.gpu_count
    for node in offer.nodes:
        take = min(node.free_gpus, remaining)
        plan.append((node.node_id, take))
        remaining -= take
    return plan


def _offer_at_site(request: BookingRequest) -> Offer:
    """The offer at the site the request names; NotAvailable if it has none."""
    model = gpu_model_by_slug(request.gpu_model)
    if model is None:
        raise ValidationFailed(
            f"Unknown GPU model {request.gpu_model!r}.",
            code="unknown_gpu_model",
            field="gpu_model",
        )
    site = site_by_slug(request.site)
    if site is None:
        raise ValidationFailed(f"Unknown site {request.site!r}.", code="unknown_site", field="site")
    resolve_catalogue(gpu_model=None, site=None, region=request.region)
    offer = None
    if request.region is None or site.region == request.region:
        offer = site_model_offer(query=request.availability_query(), site=site, gpu_model=model)
    if offer is None:
        refusal = site_curtailed_refusal(
            site_id=site.pk, starts_at=request.starts_at, ends_at=request.ends_at
        )
        if refusal is not None:
            raise refusal
        raise NotAvailable(
            f"{request.site} has no {request.gpu_count} {request.gpu_model} GPU(s) free for "
            "that period.",
            code="not_available",
        )
    return offer


def _listing_terms(request: BookingRequest) -> BookingTerms:
    """Resold time at the listing's asking price; whether it can still be sold is decided
    under its locks when the GPUs are moved (resale_allocations_transfer)."""
    listing = request.listing
    for name, asked, offered in (
        ("gpu_model", request.gpu_model, listing.gpu_model.slug),
        ("site", request.site, listing.site.slug),
        ("tier", request.tier, listing.tier),
    ):
        if asked is not None and asked != offered:
            raise ValidationFailed(
                f"This listing offers {offered} as its {name}, not {asked}.", field=name
            )
    if request.term != Term.NONE:
        raise ValidationFailed(
            "Resold time is booked without a term.", code="term_not_allowed", field="term"
        )
    for name in ("gpu_count", "starts_at", "ends_at"):
        if getattr(request, name) is None:
            raise ValidationFailed(f"{name} is required to book from a listing.", field=name)
    validate_request_period(
        starts_at=request.starts_at,
        ends_at=request.ends_at,
        gpu_count=request.gpu_count,
        now=request.now,
    )
    request.price_check(
        price_per_gpu_hour=listing.price_per_gpu_hour,
        currency=listing.currency,
        where=f"Listing {listing.public_id}'s asking price",
    )
    breakdown = resale_breakdown(
        listing=listing,
        gpu_count=request.gpu_count,
        starts_at=request.starts_at,
        ends_at=request.ends_at,
    )
    return BookingTerms(
        site_id=listing.site_id,
        gpu_model_id=listing.gpu_model_id,
        gpu_count=request.gpu_count,
        tier=listing.tier,
        term=Term.NONE,
        starts_at=request.starts_at,
        ends_at=request.ends_at,
        currency=listing.currency,
        price_per_gpu_hour=listing.price_per_gpu_hour,
        total_amount=breakdown.total,
        breakdown=breakdown.as_dict(),
        site=listing.site,
        gpu_model=listing.gpu_model,
        listing_id=listing.pk,
    )


def _quote_take(request: BookingRequest) -> BookingTerms:
    """The quote's terms, once it is checked to be this organisation's, unused and current."""
    # The lock serialises two attempts to use the same quote.
    locked = Quote.objects.select_for_update().filter(pk=request.quote.pk).first()
    if locked is None or locked.organization_id != request.organization.pk:
        raise NotFound("No such quote.", field="quote")
    if Reservation.objects.filter(quote=locked).exists():
        raise Conflict("This quote has already been used.", code="quote_used", field="quote")
    now = request.now
    if now >= locked.expires_at:
        raise QuoteExpired(
            f"The quote expired at {locked.expires_at.isoformat()}; ask for a new one.",
            field="quote",
        )
    request.price_check(
        price_per_gpu_hour=locked.price_per_gpu_hour,
        currency=locked.currency,
        where=f"Quote {locked.public_id}'s price",
    )
    starts_at, ends_at = locked.starts_at, locked.ends_at
    if starts_at < now:
        # A "start now" quote accepted a little later: keep the length (so the total bought
        # is exactly the quoted total) and start now.
        starts_at, ends_at = now, now + (ends_at - starts_at)
    return BookingTerms(
        quote=locked,
        site_id=locked.site_id,
        gpu_model_id=locked.gpu_model_id,
        gpu_count=locked.gpu_count,
        tier=locked.tier,
        term=locked.term,
        starts_at=starts_at,
        ends_at=ends_at,
        currency=locked.currency,
        price_per_gpu_hour=locked.price_per_gpu_hour,
        total_amount=locked.total_amount,
        breakdown=locked.breakdown,
        min_reliability=locked.min_reliability,
    )


def reservation_book(*, request: BookingRequest, terms: BookingTerms) -> Reservation:
    """Write a booking on its terms: the reservation, its GPUs, its hold, its history.

    Runs inside the caller's transaction; NotAvailable or a refused hold rolls it all back.
    """
    reservation = _reservation_insert(request=request, terms=terms)
    if terms.listing_id is not None:
        allocations = resale_allocations_transfer(
            buyer=reservation,
            listing_id=terms.listing_id,
            gpu_count=terms.gpu_count,
            starts_at=terms.starts_at,
            ends_at=terms.ends_at,
            now=request.now,
        )
    else:
        allocations = allocation_place(
            reservation=reservation,
            site_id=terms.site_id,
            gpu_model_id=terms.gpu_model_id,
            gpu_count=terms.gpu_count,
            starts_at=terms.starts_at,
            ends_at=terms.ends_at,
            first_plan=terms.first_plan,
            min_reliability=terms.min_reliability,
        )
    # A suspension committed meanwhile is seen; one being written waits for this booking.
    organization_active_check(organization_id=reservation.organization_id)
    # Last, once the GPUs are placed: the money lock is held from here to the commit only, and
    # taken after the node locks, as an extension takes it (one lock order, no deadlock).
    funding_gate().reservation_authorize(
        reservation=reservation, auto_recharge=request.auto_recharge
    )
    reservation.charged_amount = Decimal("0.00")  # just booked: nothing charged yet
    _created_record(reservation=reservation, request=request, allocations=allocations)
    if reservation.status == ReservationStatus.SCHEDULED:
        # Due now: start provisioning once this commits rather than at the next dispatch tick.
        provisioning_kick(reservation.pk)
    return reservation


def _reservation_insert(*, request: BookingRequest, terms: BookingTerms) -> Reservation:
    """The reservation row: scheduled when it starts within START_SKEW, else pending."""
    due = terms.starts_at <= request.now + START_SKEW
    reservation = Reservation(
        organization=request.organization,
        created_by=request.user,
        quote=terms.quote,
        gpu_model_id=terms.gpu_model_id,
        site_id=terms.site_id,
        gpu_count=terms.gpu_count,
        tier=terms.tier,
        term=terms.term,
        starts_at=terms.starts_at,
        ends_at=terms.ends_at,
        currency=terms.currency,
        price_per_gpu_hour=terms.price_per_gpu_hour,
        total_amount=terms.total_amount,
        breakdown=terms.breakdown,
        status=ReservationStatus.SCHEDULED if due else ReservationStatus.PENDING,
        workload=request.workload,
    )
    reservation = model_insert(reservation)
    if terms.site is not None:
        reservation.site = terms.site
    if terms.gpu_model is not None:
        reservation.gpu_model = terms.gpu_model
    return reservation


def _created_record(
    *, reservation: Reservation, request: BookingRequest, allocations: list[Allocation]
) -> None:
    """The first history row, the event and the audit entry of a new reservation; the rows
    written are kept on it as reservation_get_for_org loads them (allocations by node, then
    GPU index; no outages can exist yet), so the caller shows it without reading it back."""
    quote, user = reservation.quote, request.user
    transition = model_insert(
        ReservationTransition(
            reservation=reservation,
            from_status="",
            to_status=reservation.status,
            cause="created from quote " + quote.public_id if quote else "created",
            actor_label=f"user:{user.get_username()}" if user else _request_actor(),
        )
    )
    reservation.transition_list = [transition]
    # sorted() is stable and placement returns each node's GPUs in index order.
    reservation.allocation_list = sorted(allocations, key=lambda a: a.node_id)
    reservation.outage_list = []
    # Kept on it: the API shows the new reservation from the event's data, serialised once.
    reservation.created_event = reservation_event_record(
        reservation=reservation, type=EventType.RESERVATION_CREATED
    )
    _audit(
        reservation,
        "reservation.create",
        {
            "after": {
                "status": reservation.status,
                "gpu_count": reservation.gpu_count,
                "tier": reservation.tier,
                "starts_at": iso_utc(reservation.starts_at),
                "ends_at": iso_utc(reservation.ends_at),
                "total": str(reservation.total_amount),
                "currency": reservation.currency,
            }
        },
    )


@transaction.atomic
def reservation_cancel(
    *,
    reservation: Reservation,
    actor_label: str,
    reason: str = "",
    expected_refund_fraction: Decimal | None = None,
) -> Reservation:
    """Cancel (before activation) or stop early (active), recording the refund terms.

    `expected_refund_fraction`: the share of the unused time the customer was shown as
    refunded; if the rule gives less now (the page was left open across a notice boundary),
    Conflict `refund_changed` and nothing changes. Checked under the row lock, so what is
    applied is never less than what was confirmed."""
    locked = Reservation.objects.select_for_update().get(pk=reservation.pk)
    terms = cancellation_terms(locked)
    if expected_refund_fraction is not None and terms.refund_fraction < expected_refund_fraction:
        raise Conflict(
            f"The refund is now {terms.refund_fraction * 100:.0f} % of the unused time, not "
            f"the {expected_refund_fraction * 100:.0f} % shown: nothing was cancelled. Read "
            "the terms again.",
            code="refund_changed",
        )
    to_status = (
        ReservationStatus.RELEASING
        if locked.status == ReservationStatus.ACTIVE
        else ReservationStatus.CANCELLED
    )
    who = "staff" if actor_label.startswith("staff:") else "customer"
    cause = f"cancelled by {who}: {reason}" if reason else f"cancelled by {who}"
    # Stopped early: released for billing now, as the stop's terms say, while the GPUs are
    # torn down (releasing → completed) at the agent's pace.
    stopped = {"released_at": timezone.now()} if to_status == ReservationStatus.RELEASING else None
    updated = reservation_transition(
        reservation=locked,
        to_status=to_status,
        cause=cause,
        actor_label=actor_label,
        fields=stopped,
    )
    updated.cancellation = {**terms.as_dict(), "reason": reason, "actor_label": actor_label}
    updated.save(update_fields=["cancellation", "updated_at"])
    # Under the row lock a buyer's transfer takes first: nothing of it is sold from here on.
    listings_withdraw_for_reservation(reservation=updated)
    _audit(
        updated,
        "reservation.cancel",
        {
            "before": {"status": locked.status},
            "after": {"status": to_status, "refund": str(terms.refund_amount), "reason": reason},
        },
    )
    funding_gate().reservation_ended(reservation=updated)
    if to_status == ReservationStatus.RELEASING:
        # Billed until released_at: tear down promptly rather than when the sweeper notices.
        release_kick(updated.pk)
    elif locked.status == ReservationStatus.PROVISIONING:
        # Its prepare and start may be queued or running at a site: the release task cancels
        # them and stops what started (a teardown) now rather than at the next dispatch.
        release_kick(updated.pk)
    return updated


def reservations_stop_for_suspension(
    *, organization: Organization, reason: str, actor_label: str
) -> tuple[list[str], list[tuple[str, str]]]:
    """Staff suspended `organization` and chose to stop its work: each reservation running is
    stopped now (billed until now) and each not started yet is cancelled, as staff cancel one
    (reservation_cancel: its tier's refund rule, the transition, the teardown), each in its
    own transaction. Returns the ids stopped, and (id, why) for those that could not be."""
    stopped, refused = [], []
    live = Reservation.objects.filter(
        organization=organization,
        status__in=[
            ReservationStatus.PENDING,
            ReservationStatus.SCHEDULED,
            ReservationStatus.PROVISIONING,
            ReservationStatus.ACTIVE,
        ],
    )
    for reservation in live.order_by("pk"):
        try:
            reservation_cancel(
                reservation=reservation,
                actor_label=actor_label,
                reason=f"organisation suspended: {reason}",
            )
        except ApplicationError as exc:
            refused.append((reservation.public_id, exc.message))
        else:
            stopped.append(reservation.public_id)
    return stopped, refused


_GPUS_BOOKED_SQL = """
SELECT min(lower(a.period))
FROM marketplace_allocation a
WHERE a.is_live AND a.reservation_id <> %(rid)s
  AND a.gpu_id = ANY(%(gpu_ids)s)
  AND a.period && tstzrange(%(old_end)s, %(new_end)s, '[)')
"""
_NODES_BLOCKED_SQL = """
SELECT n.hostname, n.status, s.status,
       (SELECT min(lower(w.period)) FROM inventory_maintenancewindow w
        WHERE w.node_id = n.id AND w.period && tstzrange(%(old_end)s, %(new_end)s, '[)')),
       EXISTS (SELECT 1 FROM inventory_gpu g
               WHERE g.node_id = n.id AND g.id = ANY(%(gpu_ids)s) AND g.health = 'failed')
FROM inventory_node n JOIN inventory_site s ON s.id = n.site_id
WHERE n.id = ANY(%(node_ids)s)
ORDER BY n.id
"""


@dataclass(frozen=True)
class ExtensionTerms:
    """What extending to `new_ends_at` would cost, stated before reservation_extend applies it."""

    ends_at: datetime
    new_ends_at: datetime
    currency: str
    price_per_gpu_hour: Decimal
    extra_amount: Decimal
    new_total: Decimal
    charged_now: Decimal
    rule: str
    # What may still stop it, said before it is asked for: a grid curtailment of its site
    # during the extra time.
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        d = asdict(self)
        for name in ("ends_at", "new_ends_at"):
            d[name] = iso_utc(d[name])
        return {k: (str(v) if isinstance(v, Decimal) else v) for k, v in d.items()}


def extension_terms(
    reservation: Reservation,
    new_ends_at: datetime,
    *,
    at: datetime | None = None,
    warn: bool = True,
) -> ExtensionTerms:
    """The extra time priced as the reservation was (its price per GPU-hour, the whole period
    totalled as when it was booked). Raises what reservation_extend would for a bad end.

    Whether the GPUs stay free and the money is there is decided when it is applied; a grid
    curtailment of its site during the extra time, which may refuse it then, is a warning
    (`warn`; the extension itself checks the curtailment instead).
    """
    at = at or timezone.now()
    refusal = reservation_action_refusal(reservation, "extend", at=at)
    if refusal:
        code = (
            "interruption_announced"
            if extension_blocked_by_interruption(reservation)
            else "extend_not_allowed"
        )
        raise InvalidTransition(refusal, code=code)
    if not isinstance(new_ends_at, datetime) or new_ends_at.tzinfo is None:
        raise ValidationFailed("ends_at must be a time with a time zone.", field="ends_at")
    if new_ends_at <= reservation.ends_at:
        raise ValidationFailed(
            f"The new end must be after the current end ({reservation.ends_at.isoformat()}).",
            code="not_later",
            field="ends_at",
        )
    if new_ends_at - reservation.starts_at > MAX_DURATION:
        raise ValidationFailed(
            f"A reservation may last at most {MAX_DURATION.days} days.",
            code="period_too_long",
            field="ends_at",
        )
    new_total = period_total(
        price_per_gpu_hour=reservation.price_per_gpu_hour,
        gpu_count=reservation.gpu_count,
        seconds=int((new_ends_at - reservation.starts_at).total_seconds()),
        currency=reservation.currency,
    )
    extra = new_total - reservation.total_amount
    if reservation.tier == Tier.RESERVED:
        charged_now = extra
        rule = "A reserved term's extra time is charged at once, at the term's price."
    else:
        charged_now = Decimal("0.00")
        rule = (
            "The extra time is charged by the second as it is used, at the same price; its "
            "committed part is held against the balance now, as a new reservation's is."
        )
    curtailed = (
        warn
        and reservation.site_id
        and site_curtailed_refusal(
            site_id=reservation.site_id, starts_at=reservation.ends_at, ends_at=new_ends_at
        )
    )
    warnings = (
        (
            f"{curtailed.message} The extension is refused when it is made unless the site "
            "sheds more than it was asked to by then; an interruptible reservation is stopped "
            "for it.",
        )
        if curtailed
        else ()
    )
    return ExtensionTerms(
        ends_at=reservation.ends_at,
        new_ends_at=new_ends_at,
        currency=reservation.currency,
        price_per_gpu_hour=reservation.price_per_gpu_hour,
        extra_amount=extra,
        new_total=new_total,
        charged_now=charged_now,
        rule=rule,
        warnings=warnings,
    )


# A curtailment being planned locks a site's nodes, then the reservations on them; an extension
# holds its reservation and waits for its nodes: PostgreSQL breaks such a cycle by failing one
# side, and either side runs again (as the curtailment does).
@retried_on_deadlock()
def reservation_extend(
    *,
    reservation: Reservation,
    new_ends_at: datetime,
    actor_label: str,
    auto_recharge: bool = True,
) -> Reservation:
    """Move the end later, keeping the same GPUs and the reservation's price per GPU-hour.

    The history records it beside the transitions (same status before and after, the cause
    naming the old and new end and the new total), so a reservation's record shows who
    lengthened it and when, as it shows who cancelled it.
    """
    locked = Reservation.objects.select_for_update().get(pk=reservation.pk)
    gpus = _gpus_at_end(locked)
    # Its time is read once the node locks are held (a curtailment planned meanwhile has
    # committed), from the database's clock: the one a curtailment's call is stamped by.
    now = _extension_nodes_lock(gpus)
    terms = extension_terms(locked, new_ends_at, at=now, warn=False)
    old_end, old_total = locked.ends_at, locked.total_amount
    _extension_gpus_check(reservation=locked, gpus=gpus, new_ends_at=new_ends_at)
    _allocations_lengthen(reservation=locked, new_ends_at=new_ends_at)
    _reservation_lengthen(reservation=locked, terms=terms, now=now)
    organization_active_check(organization_id=locked.organization_id)
    # The extra time is priced as the original was and passes the same gate (a hold for it;
    # a reserved term's difference charged at once): refused, all of the above rolls back.
    funding_gate().extension_authorize(
        reservation=locked, old_ends_at=old_end, old_total=old_total, auto_recharge=auto_recharge
    )
    _extended_record(
        reservation=locked, old_ends_at=old_end, old_total=old_total, actor_label=actor_label
    )
    return locked


# The nodes locked in id order, then the database's clock read: the count consumes every
# locked row before the one row it feeds is made, so clock_timestamp() is read once all the
# locks are held (statement_timestamp() would be the statement's start, before any wait).
_NODES_LOCK_SQL = """
WITH locked AS (SELECT id FROM inventory_node WHERE id = ANY(%s) ORDER BY id FOR UPDATE)
SELECT clock_timestamp() FROM (SELECT count(*) FROM locked) AS held
"""


def _extension_nodes_lock(gpus: list[tuple[int, int]]) -> datetime:
    """Lock the nodes of the GPUs held at the end, in the order placement locks them (node
    locks first, then the billing account's), so extending and booking cannot deadlock;
    returns the database's time once they are held."""
    with connection.cursor() as cur:
        cur.execute(_NODES_LOCK_SQL, [sorted({node_id for _, node_id in gpus})])
        return cur.fetchone()[0]


def _extension_gpus_check(
    *, reservation: Reservation, gpus: list[tuple[int, int]], new_ends_at: datetime
) -> None:
    """NotAvailable unless the reservation's GPUs can also serve [its end, new_ends_at): their
    nodes taking work, no maintenance, no failed GPU, no other booking. Under the node locks
    (_extension_nodes_lock)."""
    node_ids = sorted({node_id for _, node_id in gpus})
    old_end = reservation.ends_at
    params = {
        "rid": reservation.pk,
        "gpu_ids": [gpu_id for gpu_id, _ in gpus],
        "node_ids": node_ids,
        "old_end": old_end,
        "new_end": new_ends_at,
    }
    with connection.cursor() as cur:
        cur.execute(_NODES_BLOCKED_SQL, params)
        for hostname, node_status, site_status, maintenance_from, gpu_failed in cur.fetchall():
            if node_status != "available" or site_status != "active" or gpu_failed:
                raise NotAvailable(
                    f"Node {hostname} cannot take on more time now; extension refused.",
                    code="not_extendable",
                )
            if maintenance_from is not None:
                raise NotAvailable(
                    "Those GPUs have maintenance planned from "
                    f"{max(maintenance_from, old_end).isoformat()}.",
                    code="not_extendable",
                )
        cur.execute(_GPUS_BOOKED_SQL, params)
        (booked_from,) = cur.fetchone()
    if booked_from is not None:
        raise NotAvailable(
            f"Those GPUs are booked from {booked_from.isoformat()}.", code="not_extendable"
        )
    if node_ids:  # more time is more load: a grid curtailment of the site may forbid it
        curtailment_headroom_take(
            reservation_id=reservation.pk,
            node_id=node_ids[0],
            gpu_count=len(gpus),
            starts_at=old_end,
            ends_at=new_ends_at,
        )


# (GPU, node) of each GPU a reservation holds at its end: its live allocations that run to the
# end, and GPUs whose time up to the end was resold (the term keeps its GPUs: an extension
# gives them back to the holder from the old end on).
_GPUS_AT_END_SQL = """
SELECT a.gpu_id, a.node_id FROM marketplace_allocation a
WHERE a.reservation_id = %(rid)s AND a.is_live AND upper(a.period) = %(end)s
UNION ALL
SELECT g.gpu_id, l.node_id
FROM marketplace_resalelisting l CROSS JOIN LATERAL unnest(l.gpu_ids) AS g(gpu_id)
WHERE l.reservation_id = %(rid)s AND l.status = 'sold' AND l.ends_at = %(end)s
"""


def _gpus_at_end(reservation: Reservation) -> list[tuple[int, int]]:
    with connection.cursor() as cur:
        cur.execute(_GPUS_AT_END_SQL, {"rid": reservation.pk, "end": reservation.ends_at})
        return cur.fetchall()


# An allocation ending at the old end is lengthened; a GPU whose time up to the old end was
# resold gets a new allocation from the old end on (the buyer's ends there). One statement.
_LENGTHEN_SQL = """
WITH lengthened AS (
    UPDATE marketplace_allocation SET period = tstzrange(lower(period), %(new_end)s, '[)')
    WHERE reservation_id = %(rid)s AND is_live AND upper(period) = %(old_end)s
    RETURNING id
)
INSERT INTO marketplace_allocation (reservation_id, gpu_id, node_id, period, is_live, created_at)
SELECT %(rid)s, g.gpu_id, l.node_id, tstzrange(%(old_end)s, %(new_end)s, '[)'), true,
       statement_timestamp()
FROM marketplace_resalelisting l CROSS JOIN LATERAL unnest(l.gpu_ids) AS g(gpu_id)
WHERE l.reservation_id = %(rid)s AND l.status = 'sold' AND l.ends_at = %(old_end)s
"""


def _allocations_lengthen(*, reservation: Reservation, new_ends_at: datetime) -> None:
    """The GPUs held at the end serve on to new_ends_at; the exclusion constraint has the
    last word."""
    params = {"rid": reservation.pk, "old_end": reservation.ends_at, "new_end": new_ends_at}
    try:
        with transaction.atomic():
            with connection.cursor() as cur:
                cur.execute(_LENGTHEN_SQL, params)
    except IntegrityError as exc:
        if getattr(exc.__cause__, "sqlstate", None) != "23P01":
            raise
        raise NotAvailable("Those GPUs are booked later on.", code="not_extendable") from exc


def _reservation_lengthen(
    *, reservation: Reservation, terms: ExtensionTerms, now: datetime
) -> None:
    """The new end and total on the row, the breakdown's hours and total, the extension noted."""
    seconds = int((terms.new_ends_at - reservation.starts_at).total_seconds())
    breakdown = dict(reservation.breakdown or {})
    breakdown["hours"] = str((Decimal(seconds) / Decimal(3600)).quantize(Decimal("0.000001")))
    breakdown["total"] = str(terms.new_total)
    breakdown["extensions"] = [
        *breakdown.get("extensions", []),
        {
            "from": iso_utc(terms.ends_at),
            "to": iso_utc(terms.new_ends_at),
            "at": iso_utc(now),
        },
    ]
    reservation.total_amount = terms.new_total
    reservation.ends_at = terms.new_ends_at
    reservation.breakdown = breakdown
    reservation.save(update_fields=["ends_at", "total_amount", "breakdown", "updated_at"])


def _extended_record(
    *, reservation: Reservation, old_ends_at: datetime, old_total: Decimal, actor_label: str
) -> None:
    """The extension's history row (same status before and after), event and audit entry."""
    ReservationTransition.objects.create(
        reservation=reservation,
        from_status=reservation.status,
        to_status=reservation.status,
        cause=(
            f"extended: end {old_ends_at.isoformat()} → {reservation.ends_at.isoformat()}, "
            f"total {reservation.total_amount} {reservation.currency.upper()}"
        ),
        actor_label=actor_label,
    )
    reservation_event_record(reservation=reservation, type=EventType.RESERVATION_EXTENDED)
    _audit(
        reservation,
        "reservation.extend",
        {
            "before": {"ends_at": iso_utc(old_ends_at), "total": str(old_total)},
            "after": {
                "ends_at": iso_utc(reservation.ends_at),
                "total": str(reservation.total_amount),
            },
        },
    )


def _audit(reservation: Reservation, action: str, changes: dict) -> None:
    audit_record(
        organization_id=reservation.organization_id,
        action=action,
        object_type="reservation",
        object_id=reservation.public_id,
        changes=changes,
    )
