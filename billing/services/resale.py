"""Resale proceeds: the seller of resold reserved time is credited as the buyer is charged.

Every usage line charged to a reservation bought from a listing is mirrored, in the same
transaction, on the seller's balance by two lines against the seller's reserved term:
- `resale_proceeds`: + what that line charged the buyer (a usage correction, − what it gave
  back), key resale:<listing>:<usage line>;
- `resale_fee`: − the platform's fee, the listing's fee_pct (fixed at the sale) of the
  proceeds, rounded half-up to the cent on the sale's cumulative proceeds (each line is the
  difference, as usage is), key resale-fee:<listing>:<usage line>.

So for every sale: buyer's usage + seller's proceeds = 0, and the fees are the fee_pct of the
proceeds; a buyer who stops early pays for less and the seller gets only that. The seller's
term stays charged as booked (it was prepaid and held for): proceeds are credits on top.
"""

from collections import defaultdict
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Q, Sum
from django.db.models.expressions import RawSQL
from django.db.models.functions import Coalesce

from billing.models import LedgerEntry, LedgerKind
from billing.money import from_minor_units
from marketplace.models import ListingStatus, ResaleListing

__all__ = ["resale_proceeds_book", "resale_settled"]


def _fee_minor(gross_minor: int, fee_pct: Decimal) -> int:
    return int((Decimal(gross_minor) * fee_pct / 100).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def resale_proceeds_book(*, reservation_ids: list[int]) -> int:
    """Mirror the not-yet-mirrored usage lines of these reservations that were bought from a
    listing onto their sellers' balances. Runs in the transaction that wrote the usage lines,
    which holds the buyers' reservation rows locked; returns the lines written."""
    sales = {
        listing.buyer_reservation_id: listing
        # One array parameter, not one per id: the hourly booking passes every reservation it
        # charged (100,000 at fleet scale; PostgreSQL takes at most 65,535 parameters).
        for listing in ResaleListing.objects.filter(
            buyer_reservation_id__in=RawSQL("SELECT unnest(%s::bigint[])", [list(reservation_ids)]),
            status=ListingStatus.SOLD,
        ).select_related("reservation")
    }
    if not sales:
        return 0
    usage = list(
        LedgerEntry.objects.filter(reservation_id__in=list(sales), kind=LedgerKind.USAGE)
        .order_by("id")
        .values("id", "reservation_id", "amount_minor", "period_start", "period_end")
    )
    keys = [f"resale:{sales[u['reservation_id']].pk}:{u['id']}" for u in usage]
    done = set(
        LedgerEntry.objects.filter(idempotency_key__in=keys).values_list(
            "idempotency_key", flat=True
        )
    )
    todo = [u for u, key in zip(usage, keys, strict=True) if key not in done]
    if not todo:
        return 0
    listing_ids = {sales[u["reservation_id"]].pk for u in todo}
    totals: dict[tuple[int, str], int] = defaultdict(int)
    for entry in LedgerEntry.objects.filter(
        kind__in=[LedgerKind.RESALE_PROCEEDS, LedgerKind.RESALE_FEE],
        reservation_id__in={sales[u["reservation_id"]].reservation_id for u in todo},
    ).values("kind", "idempotency_key", "amount_minor"):
        listing_pk = int(entry["idempotency_key"].split(":")[1])
        if listing_pk in listing_ids:
            totals[(listing_pk, entry["kind"])] += entry["amount_minor"]
    entries = []
    for u in todo:
        listing = sales[u["reservation_id"]]
        gross = -u["amount_minor"]
        proceeds_before = totals[(listing.pk, LedgerKind.RESALE_PROCEEDS)]
        fee_before = -totals[(listing.pk, LedgerKind.RESALE_FEE)]
        fee = _fee_minor(proceeds_before + gross, listing.fee_pct) - fee_before
        totals[(listing.pk, LedgerKind.RESALE_PROCEEDS)] += gross
        totals[(listing.pk, LedgerKind.RESALE_FEE)] -= fee
        common = {
            "organization_id": listing.organization_id,
            "currency": listing.currency,
            "reservation_id": listing.reservation_id,
            "period_start": u["period_start"],
            "period_end": u["period_end"],
        }
        entries.append(
            LedgerEntry(
                kind=LedgerKind.RESALE_PROCEEDS,
                amount_minor=gross,
                idempotency_key=f"resale:{listing.pk}:{u['id']}",
                description=f"Resold time {listing.public_id} "
                f"({listing.reservation.public_id}): what the buyer was charged",
                **common,
            )
        )
        if fee:
            entries.append(
                LedgerEntry(
                    kind=LedgerKind.RESALE_FEE,
                    amount_minor=-fee,
                    idempotency_key=f"resale-fee:{listing.pk}:{u['id']}",
                    description=f"Platform fee on resold time {listing.public_id}: "
                    f"{listing.fee_pct} %",
                    **common,
                )
            )
    # The keys are unique: a line already mirrored (a concurrent run) is left as it is.
    LedgerEntry.objects.bulk_create(entries, ignore_conflicts=True)
    return len(entries)


def resale_settled(*, listing_ids: list[int]) -> dict[int, tuple[Decimal, Decimal]]:
    """(proceeds, fees) credited and taken so far per sold listing, in major units."""
    listings = dict(
        ResaleListing.objects.filter(pk__in=listing_ids).values_list("pk", "reservation_id")
    )
    if not listings:
        return {}
    currency_of = dict(ResaleListing.objects.filter(pk__in=listings).values_list("pk", "currency"))
    prefixes = Q()
    for pk in listings:
        prefixes |= Q(idempotency_key__startswith=f"resale:{pk}:") | Q(
            idempotency_key__startswith=f"resale-fee:{pk}:"
        )
    sums: dict[int, list[int]] = {pk: [0, 0] for pk in listings}
    rows = (
        LedgerEntry.objects.filter(prefixes, reservation_id__in=set(listings.values()))
        .values("kind", "idempotency_key")
        .annotate(total=Coalesce(Sum("amount_minor"), 0))
    )
    for row in rows:
        pk = int(row["idempotency_key"].split(":")[1])
        sums[pk][0 if row["kind"] == LedgerKind.RESALE_PROCEEDS else 1] += row["total"]
    return {
        pk: (
            from_minor_units(proceeds, currency_of[pk]),
            from_minor_units(-fees, currency_of[pk]),
        )
        for pk, (proceeds, fees) in sums.items()
    }
