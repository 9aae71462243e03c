"""Set-up for the resale tests: a site with one 8-GPU node, a funded seller holding a 1-week
reserved term on it, and a funded buyer."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.db import connection
from django.db.models import F

from billing.models import LedgerKind
from billing.services.accounts import billing_account_get_or_create
from billing.services.ledger import ledger_entry_add
from marketplace.models import (
    Allocation,
    Organization,
    ResaleListing,
    Reservation,
    ReservationTransition,
)
from marketplace.services.resale import listing_create
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow

# The energy floor of an H100 GPU-hour at the factory site: 700 W × PUE 1.15 × 38.50 USD/MWh
# = 0.0309925, plus the policy's 20 % margin = 0.037191, rounded up to 4 places.
FLOOR = Decimal("0.0372")


@dataclass
class Market:
    site: object
    model: object
    node: object
    seller: Organization
    buyer: Organization
    term: Reservation

    @property
    def start(self) -> datetime:
        return self.term.starts_at


def fund(organization: Organization, amount_minor: int = 1_000_000) -> None:
    billing_account_get_or_create(organization=organization)
    ledger_entry_add(
        organization=organization,
        kind=LedgerKind.CREDIT,
        amount_minor=amount_minor,
        currency="usd",
        idempotency_key=f"fund:{organization.pk}:{amount_minor}",
    )


def market(
    *, gpus: int = 8, term_gpus: int = 8, starts_at: datetime | None = None, nodes: int = 1
) -> Market:
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    site = SiteFactory()
    node, *_ = make_nodes(site, model, nodes, gpus=gpus)
    seller, buyer = OrganizationFactory(), OrganizationFactory()
    fund(seller)
    fund(buyer)
    starts_at = starts_at or tomorrow()
    term = reservation_create(
        organization=seller,
        gpu_model=model.slug,
        gpu_count=term_gpus,
        starts_at=starts_at,
        ends_at=starts_at + timedelta(days=8),
        tier="reserved",
        term="1w",
        site=site.slug,
    )
    return Market(site=site, model=model, node=node, seller=seller, buyer=buyer, term=term)


H = timedelta(hours=1)


def listing(m: Market, *, gpus=4, start_h=24, hours=24, price="1.5000", tier="on_demand", **kw):
    """The seller lists `gpus` of its term from `start_h` hours after the term starts."""
    return listing_create(
        organization=m.seller,
        reservation=m.term,
        gpu_count=gpus,
        starts_at=m.start + start_h * H,
        ends_at=m.start + (start_h + hours) * H,
        price_per_gpu_hour=Decimal(price),
        tier=tier,
        **kw,
    )


def buy(m: Market, lst, *, gpus=None, start_h=24, hours=24, org=None, tier=None):
    """The buyer (or `org`) books `gpus` of the listing (all of it by default)."""
    return reservation_create(
        organization=org or m.buyer,
        listing=lst,
        gpu_count=gpus or lst.gpu_count,
        starts_at=m.start + start_h * H,
        ends_at=m.start + (start_h + hours) * H,
        tier=tier,
    )


def time_passes(delta: timedelta) -> None:
    """Move every reservation, allocation and listing `delta` earlier: as if that much time
    had passed since they were booked (periods cannot be booked in the past)."""
    # Row by row, the earliest first when moving earlier (the latest first when later): the
    # exclusion constraint is checked at each row, and one UPDATE of all of them in no order
    # could move a row onto a neighbour on its GPU that has not moved yet (back to back
    # allocations: a seller's hours and its buyer's).
    order = "ASC" if delta > timedelta(0) else "DESC"
    with connection.cursor() as cur:
        cur.execute(f"SELECT id FROM marketplace_allocation ORDER BY lower(period) {order}, id")
        for (allocation_id,) in cur.fetchall():
            cur.execute(
                "UPDATE marketplace_allocation SET period = tstzrange(lower(period) - %s, "
                "upper(period) - %s, '[)') WHERE id = %s",
                [delta, delta, allocation_id],
            )
    Reservation.objects.update(
        starts_at=F("starts_at") - delta,
        ends_at=F("ends_at") - delta,
        activated_at=F("activated_at") - delta,
        released_at=F("released_at") - delta,
    )
    ReservationTransition.objects.update(at=F("at") - delta)
    ResaleListing.objects.update(starts_at=F("starts_at") - delta, ends_at=F("ends_at") - delta)


def time_passes_until(at: datetime, *, past: timedelta = timedelta(seconds=1)) -> None:
    """As time_passes, so that `at` is `past` ago."""
    from django.utils import timezone

    time_passes(at - timezone.now() + past)


def live_rows(reservation: Reservation) -> list[tuple[int, datetime, datetime]]:
    """(GPU index, start, end) of a reservation's live allocations, in order."""
    return sorted(
        (a.gpu.index, a.period.lower, a.period.upper)
        for a in Allocation.objects.filter(reservation=reservation, is_live=True).select_related(
            "gpu"
        )
    )


OVERLAPS_SQL = """
SELECT count(*) FROM marketplace_allocation a JOIN marketplace_allocation b
  ON a.gpu_id = b.gpu_id AND a.id < b.id AND a.period && b.period
WHERE a.is_live AND b.is_live
"""


def overlapping_live_pairs() -> int:
    with connection.cursor() as cur:
        cur.execute(OVERLAPS_SQL)
        return cur.fetchone()[0]
