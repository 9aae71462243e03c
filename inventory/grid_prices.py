"""Power prices per zone: taking them in (CSV from staff, the API from a feed), and reading
them back for pricing and for the admin's feed health. Docs: docs/grid.md.

Every way in goes through `zone_price_rows_parse` (what a row may be) and `zone_prices_upsert`
(how rows are written), so the CSV upload, the command and the API refuse the same things:

- a row needs a known zone, an aware start and end (end after start, at most a day apart:
  24 hours, or a day of the zone's local time, 25 hours when its clocks go back), a price per
  MWh with at most 2 decimal places inside [GRID_PRICE_FLOOR_PER_MWH, GRID_PRICE_CAP_PER_MWH],
  and the zone's currency; rows of one zone may not overlap;
- one bad row refuses the whole batch, with every problem listed: nothing is half-imported;
- upserts are idempotent: a row equal to the stored one changes nothing (not even when it was
  received, which is what staleness is measured by); a different price for the same interval
  replaces it; an interval cutting across stored ones replaces the part it covers and leaves
  the rest of those as they were.
"""

import csv
import io
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.db import transaction
from django.db.models.expressions import RawSQL
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from config.dates import OUT_OF_RANGE, within_bounds
from config.errors import ValidationFailed
from config.replica import read_connection
from inventory.models import PriceZone, ZonePrice

__all__ = [
    "MAX_INTERVAL",
    "MIN_INTERVAL",
    "MAX_ROWS",
    "CSV_COLUMNS",
    "PriceRow",
    "PriceProblem",
    "PricesRefused",
    "UpsertResult",
    "ZoneSeries",
    "FeedHealth",
    "zone_price_rows_parse",
    "zone_prices_csv_parse",
    "zone_prices_csv_load",
    "zone_prices_upsert",
    "zone_price_series",
    "zone_feed_health",
    "price_zones_with_feed_health",
    "price_is_absurd",
]

MAX_INTERVAL = timedelta(days=1)
# Markets settle in 5-minute steps at the finest: a shorter interval is no price anyone pays,
# and a feed of them would only grow the table.
MIN_INTERVAL = timedelta(minutes=5)
MAX_ROWS = 20_000  # a year of hourly prices for two zones; larger loads go in several files
CSV_COLUMNS = ["zone", "starts_at", "ends_at", "price_per_mwh", "currency"]
_CENT = Decimal("0.01")
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


@dataclass(frozen=True)
class PriceRow:
    zone: PriceZone
    starts_at: datetime
    ends_at: datetime
    price_per_mwh: Decimal
    currency: str


@dataclass(frozen=True)
class PriceProblem:
    where: str  # "line 4" (CSV) or "prices[3]" (API)
    field: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class PricesRefused(ValidationFailed):
    """The batch has problems; nothing was written."""

    def __init__(self, problems: list[PriceProblem]):
        self.problems = problems
        shown = "; ".join(str(p) for p in problems[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        first = problems[0]
        super().__init__(
            f"{len(problems)} problem(s), nothing was written: {shown}{more}",
            code="prices_refused",
            field=first.where if first.field is None else f"{first.where}.{first.field}",
        )

    def as_dict(self) -> dict:
        return {
            **super().as_dict(),
            "problems": [
                {"where": p.where, "field": p.field, "message": p.message} for p in self.problems
            ],
        }


def price_is_absurd(price_per_mwh: Decimal) -> bool:
    return not settings.GRID_PRICE_FLOOR_PER_MWH <= price_per_mwh <= settings.GRID_PRICE_CAP_PER_MWH


def _parse_time(value, name: str, problems: list, where: str) -> datetime | None:
    parsed = value if isinstance(value, datetime) else None
    if parsed is None and isinstance(value, str):
        try:
            parsed = parse_datetime(value.strip())
        except ValueError:
            parsed = None
    if parsed is None:
        problems.append(PriceProblem(where, name, f"{name} {value!r} is not an ISO 8601 time."))
        return None
    if parsed.tzinfo is None:
        problems.append(
            PriceProblem(where, name, f"{name} {value!r} has no UTC offset (add Z or +01:00).")
        )
        return None
    if not within_bounds(parsed):
        problems.append(PriceProblem(where, name, f"{name} {value!r}: {OUT_OF_RANGE}"))
        return None
    return parsed


def zone_price_rows_parse(
    items: list[tuple[str, dict]],
    *,
    zones: dict[str, PriceZone] | None = None,
    window: tuple[datetime, datetime] | None = None,
) -> list[PriceRow]:
    """[(where, {zone, starts_at, ends_at, price_per_mwh, currency})] → rows, or PricesRefused
    listing every problem. `zones` limits which zone codes are accepted (None: any that exists);
    `window` ([from, until)), the time the rows may cover (a site's node: a day back to a week
    ahead, so one node cannot rewrite its zone's history or fill its future).
    """
    if len(items) > MAX_ROWS:
        raise PricesRefused(
            [PriceProblem("batch", None, f"{len(items)} rows; at most {MAX_ROWS} at a time.")]
        )
    if not items:
        raise PricesRefused([PriceProblem("batch", None, "No price rows.")])
    known = zones if zones is not None else PriceZone.objects.in_bulk(field_name="code")
    problems: list[PriceProblem] = []
    rows: list[tuple[str, PriceRow]] = []
    for where, raw in items:
        row = _price_row_parse(where, raw, known=known, chosen=zones is not None, problems=problems)
        if (
            row is not None
            and window is not None
            and not (window[0] <= row.starts_at and row.ends_at <= window[1])
        ):
            problems.append(
                PriceProblem(
                    where,
                    "starts_at",
                    f"This source prices {window[0].isoformat()} to {window[1].isoformat()} only.",
                )
            )
        elif row is not None:
            rows.append((where, row))
    _batch_overlaps_find(rows, problems)
    if problems:
        raise PricesRefused(problems)
    return [row for _, row in rows]


def _price_row_parse(
    where: str, raw: dict, *, known: dict, chosen: bool, problems: list[PriceProblem]
) -> PriceRow | None:
    """One row, or None with its problems added to `problems`."""
    count = len(problems)
    code = str(raw.get("zone") or "").strip()
    zone = known.get(code)
    if zone is None:
        scope = " here (not among the zones chosen)" if chosen else ""
        problems.append(PriceProblem(where, "zone", f"Unknown price zone {code!r}{scope}."))
    starts_at = _parse_time(raw.get("starts_at"), "starts_at", problems, where)
    ends_at = _parse_time(raw.get("ends_at"), "ends_at", problems, where)
    if starts_at and ends_at:
        if ends_at <= starts_at:
            problems.append(PriceProblem(where, "ends_at", "ends_at must be after starts_at."))
        elif ends_at - starts_at < MIN_INTERVAL:
            problems.append(
                PriceProblem(where, "ends_at", "An interval lasts at least five minutes.")
            )
        elif ends_at > _day_after(starts_at, zone):
            problems.append(
                PriceProblem(
                    where,
                    "ends_at",
                    "An interval may last at most one day (24 hours, or the zone's local day: "
                    "23 or 25 hours when its clocks change).",
                )
            )
    price = _price_parse(where, raw, problems)
    currency = str(raw.get("currency") or "").strip().lower() or (zone and zone.currency)
    if zone is not None and currency != zone.currency:
        problems.append(
            PriceProblem(
                where,
                "currency",
                f"Zone {zone.code} is priced in {zone.currency}, not {currency!r}.",
            )
        )
    if len(problems) != count:
        return None
    return PriceRow(zone, starts_at, ends_at, price.quantize(_CENT), currency)


def _day_after(starts_at: datetime, zone: PriceZone | None) -> datetime:
    """The latest end of an interval from `starts_at`: 24 hours, or the same wall-clock time a
    day later in the zone's time zone when that is later (a market's day of 25 hours, when its
    clocks go back, is one interval)."""
    latest = starts_at + MAX_INTERVAL
    if zone is None:
        return latest
    try:
        tz = ZoneInfo(zone.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        return latest
    # Aware arithmetic within one ZoneInfo is wall-clock arithmetic: a local day.
    local_day = (starts_at.astimezone(tz) + timedelta(days=1)).astimezone(starts_at.tzinfo)
    return max(latest, local_day)


def _price_parse(where: str, raw: dict, problems: list[PriceProblem]) -> Decimal | None:
    """The row's price per MWh: a number with at most 2 decimal places within the accepted range
    (a problem is added otherwise; None if it is not a number at all)."""
    try:
        text = str(raw.get("price_per_mwh", "")).strip()
        if not _DECIMAL_TEXT.fullmatch(text):  # Decimal() also reads "1e3" and other digits
            raise InvalidOperation
        price = Decimal(text)
    except (InvalidOperation, ValueError):
        problems.append(
            PriceProblem(where, "price_per_mwh", f"{raw.get('price_per_mwh')!r} is not a number.")
        )
        return None
    # The range first: rounding a number of more digits than the context's precision to cents
    # raises InvalidOperation, and such a number is outside the range anyway.
    if price_is_absurd(price):
        problems.append(
            PriceProblem(
                where,
                "price_per_mwh",
                f"{price} per MWh is outside the accepted range "
                f"[{settings.GRID_PRICE_FLOOR_PER_MWH}, "
                f"{settings.GRID_PRICE_CAP_PER_MWH}] (GRID_PRICE_FLOOR_PER_MWH, "
                "GRID_PRICE_CAP_PER_MWH).",
            )
        )
    elif price != price.quantize(_CENT):
        problems.append(PriceProblem(where, "price_per_mwh", "At most 2 decimal places per MWh."))
    return price


def _batch_overlaps_find(rows: list[tuple[str, PriceRow]], problems: list[PriceProblem]) -> None:
    """A problem for each row that overlaps an earlier one of its zone in the batch."""
    by_zone: dict[int, list[tuple[str, PriceRow]]] = defaultdict(list)
    for where, row in rows:
        by_zone[row.zone.pk].append((where, row))
    for zone_rows in by_zone.values():
        zone_rows.sort(key=lambda item: item[1].starts_at)
        for (_, before), (where, row) in zip(zone_rows, zone_rows[1:], strict=False):
            if row.starts_at < before.ends_at:
                problems.append(
                    PriceProblem(
                        where,
                        "starts_at",
                        f"Overlaps another row of {row.zone.code} in this batch "
                        f"({before.starts_at.isoformat()} to {before.ends_at.isoformat()}).",
                    )
                )


def zone_prices_csv_parse(text: str, *, zones=None) -> list[PriceRow]:
    """A CSV with the header zone,starts_at,ends_at,price_per_mwh,currency (currency may be
    empty: the zone's). Every problem is reported with its line; PricesRefused if any."""
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    missing = [c for c in CSV_COLUMNS if c not in header and c != "currency"]
    if missing:
        raise PricesRefused(
            [
                PriceProblem(
                    "line 1",
                    None,
                    f"The header lacks {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}.",
                )
            ]
        )
    items = []
    for record in reader:
        raw = {(k or "").strip(): v for k, v in record.items()}
        if None in record:  # more cells than columns
            raw = {**raw, "_extra": True}
        items.append((f"line {reader.line_num}", raw))
    extra = [PriceProblem(w, None, "More cells than columns.") for w, r in items if "_extra" in r]
    if extra:
        raise PricesRefused(extra)
    known = None if zones is None else {z.code: z for z in zones}
    return zone_price_rows_parse(items, zones=known)


@dataclass
class UpsertResult:
    created: int = 0
    corrected: int = 0
    unchanged: int = 0
    replaced: int = 0  # stored rows cut by new intervals (deleted, their remainder kept)
    gaps: list[tuple[str, datetime, datetime]] = field(default_factory=list)  # in the batch

    def summary(self) -> str:
        text = (
            f"{self.created} new, {self.corrected} corrected, {self.unchanged} unchanged, "
            f"{self.replaced} replaced"
        )
        if self.gaps:
            text += f"; {len(self.gaps)} gap(s) between the rows sent"
        return text

    def as_dict(self) -> dict:
        return {
            "created": self.created,
            "corrected": self.corrected,
            "unchanged": self.unchanged,
            "replaced": self.replaced,
            "gaps": [{"zone": z, "starts_at": a, "ends_at": b} for z, a, b in self.gaps],
        }


@dataclass
class _Stored:
    pk: int | None
    starts_at: datetime
    ends_at: datetime
    price_per_mwh: Decimal
    currency: str
    source: str
    received_at: datetime
    dirty: bool = False
    trimmed: bool = False  # the rest of a stored row another row of this batch cut


@transaction.atomic
def zone_prices_upsert(*, rows: list[PriceRow], source: str) -> UpsertResult:
    """Write parsed rows (zone_price_rows_parse); see the module's docstring for the rules.

    Each zone's row is locked first (in id order), so two feeds writing the same zone take
    turns; the exclusion constraint remains the last word on overlaps.
    """
    now = timezone.now()
    result = UpsertResult()
    by_zone: dict[int, list[PriceRow]] = defaultdict(list)
    for row in rows:
        by_zone[row.zone.pk].append(row)
    list(PriceZone.objects.select_for_update().filter(pk__in=by_zone).order_by("pk"))
    for zone_id in sorted(by_zone):
        batch = sorted(by_zone[zone_id], key=lambda r: r.starts_at)
        code = batch[0].zone.code
        for before, row in zip(batch, batch[1:], strict=False):
            if row.starts_at > before.ends_at:
                result.gaps.append((code, before.ends_at, row.starts_at))
        stored = [
            _Stored(
                p.pk, p.starts_at, p.ends_at, p.price_per_mwh, p.currency, p.source, p.received_at
            )  # fmt: skip
            for p in ZonePrice.objects.filter(
                zone_id=zone_id, starts_at__lt=batch[-1].ends_at, ends_at__gt=batch[0].starts_at
            )
        ]
        original = {s.pk for s in stored}
        for row in batch:
            _stored_merge(stored, row, source=source, now=now, result=result)
        _stored_write(zone_id, stored, original=original, result=result)
    return result


def _stored_merge(
    stored: list[_Stored], row: PriceRow, *, source: str, now: datetime, result: UpsertResult
) -> None:
    """Take one new row into the zone's stored intervals (in memory): the same interval is
    corrected (or left unchanged), overlapped ones are cut to the parts it does not cover."""
    hits = [s for s in stored if s.starts_at < row.ends_at and s.ends_at > row.starts_at]
    if len(hits) == 1 and (hits[0].starts_at, hits[0].ends_at) == (row.starts_at, row.ends_at):
        hit = hits[0]
        same = (hit.price_per_mwh, hit.currency) == (row.price_per_mwh, row.currency)
        if same and not hit.trimmed:
            result.unchanged += 1
            return
        hit.price_per_mwh, hit.currency = row.price_per_mwh, row.currency
        hit.source, hit.received_at, hit.dirty = source, now, True
        if hit.trimmed:
            hit.trimmed = False
            result.created += 1
        else:
            result.corrected += 1
        return
    for hit in hits:
        stored.remove(hit)
        for start, end in ((hit.starts_at, row.starts_at), (row.ends_at, hit.ends_at)):
            if start < end:  # the part the new interval does not cover stays
                stored.append(
                    _Stored(
                        None,
                        start,
                        end,
                        hit.price_per_mwh,
                        hit.currency,
                        hit.source,
                        hit.received_at,
                        trimmed=True,
                    )
                )
    stored.append(
        _Stored(None, row.starts_at, row.ends_at, row.price_per_mwh, row.currency, source, now)
    )
    result.created += 1


def _stored_write(
    zone_id: int, stored: list[_Stored], *, original: set[int], result: UpsertResult
) -> None:
    """Write the zone's merged intervals: delete the stored rows cut, update the corrected
    ones, insert the new ones and the remainders."""
    kept = {s.pk for s in stored if s.pk is not None}
    gone = original - kept
    result.replaced += len(gone)
    ZonePrice.objects.filter(pk__in=gone).delete()  # before inserting what replaces them
    for s in stored:
        if s.pk is not None and s.dirty:
            ZonePrice.objects.filter(pk=s.pk).update(
                price_per_mwh=s.price_per_mwh,
                currency=s.currency,
                source=s.source,
                received_at=s.received_at,
            )
    ZonePrice.objects.bulk_create(
        ZonePrice(
            zone_id=zone_id,
            starts_at=s.starts_at,
            ends_at=s.ends_at,
            price_per_mwh=s.price_per_mwh,
            currency=s.currency,
            source=s.source,
            received_at=s.received_at,
        )  # fmt: skip
        for s in stored
        if s.pk is None
    )


class _DryRun(Exception):
    pass


def zone_prices_csv_load(
    *, data: bytes, source: str, zones=None, dry_run: bool = False
) -> UpsertResult:
    """Parse and upsert a CSV file's bytes (UTF-8); every problem or nothing written. `zones`:
    the PriceZone rows the file may name (None: any). `dry_run`: report, then roll back."""
    if len(data) > settings.INVENTORY_IMPORT_MAX_BYTES:
        raise PricesRefused(
            [
                PriceProblem(
                    "file",
                    None,
                    f"The file is larger than {settings.INVENTORY_IMPORT_MAX_BYTES} bytes.",
                )
            ]
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise PricesRefused([PriceProblem("file", None, "The file is not UTF-8 text.")]) from None
    rows = zone_prices_csv_parse(text, zones=zones)
    if not dry_run:
        return zone_prices_upsert(rows=rows, source=source)
    try:
        with transaction.atomic():
            result = zone_prices_upsert(rows=rows, source=source)
            raise _DryRun
    except _DryRun:
        return result


# --- Reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZoneSeries:
    """What pricing needs of one zone: its prices overlapping the asked span (in order), the
    last published interval (the horizon and the last known price) and when a price was last
    received. Values outside the accepted range are left out and counted."""

    zone_id: int
    code: str
    currency: str
    intervals: tuple[tuple[datetime, datetime, Decimal], ...]
    last: tuple[datetime, datetime, Decimal] | None
    last_received_at: datetime | None
    absurd: int = 0
    # The history before the span, summed in the database: (from, to, Σ price × seconds,
    # published seconds) over [from, to), values outside the accepted range left out.
    lookback: tuple[datetime, datetime, Decimal, int] | None = None


# One statement for every zone of a search: the rows overlapping the span, the history before
# it summed (a month of hourly rows per zone would cost more to load than the search itself),
# each zone's last interval and its newest receipt (both by index: (zone, ends_at) and (zone,
# received_at)).
_SERIES_SQL = """
SELECT z.id, z.code, z.currency, 'w' AS kind, p.starts_at, p.ends_at, p.price_per_mwh,
       NULL::timestamptz, NULL::numeric
FROM inventory_pricezone z JOIN inventory_zoneprice p ON p.zone_id = z.id
WHERE z.id = ANY(%(zones)s) AND p.ends_at > %(lo)s AND p.starts_at < %(hi)s
UNION ALL
SELECT p.zone_id, NULL, NULL, 'a', NULL::timestamptz, NULL::timestamptz,
       sum(p.price_per_mwh * extract(epoch FROM least(p.ends_at, %(lo)s)
                                              - greatest(p.starts_at, %(back)s))),
       NULL::timestamptz,
       sum(extract(epoch FROM least(p.ends_at, %(lo)s) - greatest(p.starts_at, %(back)s)))
FROM inventory_zoneprice p
WHERE p.zone_id = ANY(%(zones)s) AND p.ends_at > %(back)s AND p.starts_at < %(lo)s
  AND p.price_per_mwh BETWEEN %(floor)s AND %(cap)s
GROUP BY p.zone_id
UNION ALL
SELECT z.id, z.code, z.currency, 'l', l.starts_at, l.ends_at, l.price_per_mwh, r.received_at,
       NULL
FROM inventory_pricezone z
LEFT JOIN LATERAL (SELECT starts_at, ends_at, price_per_mwh FROM inventory_zoneprice
                   WHERE zone_id = z.id ORDER BY ends_at DESC LIMIT 1) l ON true
LEFT JOIN LATERAL (SELECT received_at FROM inventory_zoneprice
                   WHERE zone_id = z.id ORDER BY received_at DESC LIMIT 1) r ON true
WHERE z.id = ANY(%(zones)s)
ORDER BY 1, 4 DESC, 5
"""


def zone_price_series(
    *, zone_ids, starts_at: datetime, ends_at: datetime, lookback_from: datetime | None = None
) -> dict[int, ZoneSeries]:
    """{zone id: ZoneSeries} for the zones, with the prices overlapping [starts_at, ends_at)
    and, with `lookback_from`, those of [lookback_from, starts_at) summed."""
    zone_ids = sorted(set(zone_ids))
    if not zone_ids:
        return {}
    params = {
        "zones": zone_ids,
        "lo": starts_at,
        "hi": ends_at,
        "back": lookback_from or starts_at,
        "floor": settings.GRID_PRICE_FLOOR_PER_MWH,
        "cap": settings.GRID_PRICE_CAP_PER_MWH,
    }
    with read_connection().cursor() as cur:  # prices may be a moment old: the replica will do
        cur.execute(_SERIES_SQL, params)
        rows = cur.fetchall()
    found: dict[int, dict] = {}
    sums: dict[int, tuple[Decimal, int]] = {}
    for zone_id, code, currency, kind, start, end, price, received, seconds in rows:
        if kind == "a":
            sums[zone_id] = (price, int(seconds))
            continue
        entry = found.setdefault(
            zone_id,
            {"code": code, "currency": currency, "intervals": [], "last": None,
             "received": None, "absurd": 0},
        )  # fmt: skip
        if kind == "l":
            entry["received"] = received
            if start is not None and not price_is_absurd(price):
                entry["last"] = (start, end, price)
        elif price_is_absurd(price):
            entry["absurd"] += 1
        else:
            entry["intervals"].append((start, end, price))
    return {
        zone_id: ZoneSeries(
            zone_id=zone_id,
            code=e["code"],
            currency=e["currency"],
            intervals=tuple(e["intervals"]),
            last=e["last"],
            last_received_at=e["received"],
            absurd=e["absurd"],
            lookback=None
            if lookback_from is None or lookback_from >= starts_at
            else (lookback_from, starts_at, *sums.get(zone_id, (Decimal(0), 0))),
        )
        for zone_id, e in found.items()
    }


@dataclass(frozen=True)
class FeedHealth:
    """A zone's feed as staff see it (the admin's zone list)."""

    zone_id: int
    last_received_at: datetime | None
    horizon: datetime | None  # the end of the last published interval
    current_price: Decimal | None  # in force now, None: no price for now
    gaps: int  # holes between intervals from a day ago to the horizon
    absurd: int  # stored values outside today's accepted range, same span
    stale: bool

    @classmethod
    def of(cls, zone, *, now: datetime) -> "FeedHealth":
        """From a zone of price_zones_with_feed_health()."""
        received = zone.feed_last_received_at
        return cls(
            zone_id=zone.pk,
            last_received_at=received,
            horizon=zone.feed_horizon,
            current_price=zone.feed_current_price,
            gaps=zone.feed_gaps,
            absurd=zone.feed_absurd,
            stale=received is None or now - received > settings.GRID_PRICE_MAX_AGE,
        )

    @property
    def problems(self) -> list[str]:
        found = []
        if self.last_received_at is None:
            return ["no prices"]
        if self.stale:
            found.append("stale")
        if self.current_price is None:
            found.append("no price for now")
        if self.gaps:
            found.append(f"{self.gaps} gap(s)")
        if self.absurd:
            found.append(f"{self.absurd} absurd value(s)")
        return found


def _health_sql(now_param: str) -> dict[str, str]:
    # Correlated on the zone row, so the admin's list is one statement for its page.
    zone = "inventory_pricezone.id"
    return {
        "feed_last_received_at": f"SELECT max(received_at) FROM inventory_zoneprice "
        f"WHERE zone_id = {zone}",
        "feed_horizon": f"SELECT max(ends_at) FROM inventory_zoneprice WHERE zone_id = {zone}",
        "feed_current_price": f"SELECT price_per_mwh FROM inventory_zoneprice "
        f"WHERE zone_id = {zone} AND starts_at <= {now_param} AND ends_at > {now_param}",
        "feed_gaps": "SELECT count(*) FROM (SELECT starts_at, lag(ends_at) OVER "
        "(ORDER BY starts_at) AS prev_end FROM inventory_zoneprice "
        f"WHERE zone_id = {zone} AND ends_at > %s) p "
        "WHERE p.prev_end IS NOT NULL AND p.starts_at > p.prev_end",
        "feed_absurd": f"SELECT count(*) FROM inventory_zoneprice WHERE zone_id = {zone} "
        "AND ends_at > %s AND (price_per_mwh < %s OR price_per_mwh > %s)",
    }


def price_zones_with_feed_health(now: datetime | None = None):
    """PriceZone rows annotated with their feed's health (FeedHealth.of reads them)."""
    now = now or timezone.now()
    since = now - timedelta(days=1)
    sql = _health_sql("%s")
    params = {
        "feed_last_received_at": [],
        "feed_horizon": [],
        "feed_current_price": [now, now],
        "feed_gaps": [since],
        "feed_absurd": [
            since,
            settings.GRID_PRICE_FLOOR_PER_MWH,
            settings.GRID_PRICE_CAP_PER_MWH,
        ],
    }
    return PriceZone.objects.annotate(
        **{name: RawSQL(f"({query})", params[name]) for name, query in sql.items()}
    )


def zone_feed_health(*, zone_ids, now: datetime | None = None) -> dict[int, FeedHealth]:
    """{zone id: FeedHealth} for the zones, in one statement."""
    now = now or timezone.now()
    zones = price_zones_with_feed_health(now).filter(pk__in=set(zone_ids))
    return {zone.pk: FeedHealth.of(zone, now=now) for zone in zones}
