"""The staff dashboard at /staff/: the fleet, its use, reservations, this month's money and the
risks (nodes out of service and what runs on them, provisioning failures, curtailment exposure).

Project-level because it reads every app (inventory, marketplace, billing) and none of them
should depend on the others for it; each figure comes from its app's selectors. Staff only.
"""

from collections import defaultdict
from datetime import UTC, datetime, timedelta

from django.contrib.admin import site as admin_site
from django.contrib.admin.views.decorators import staff_member_required
from django.shortcuts import render
from django.utils import timezone

from billing.models import LedgerKind
from billing.money import from_minor_units
from billing.selectors import delivered_gpu_seconds_by_day, ledger_totals_by_kind, month_start
from inventory.selectors import fleet_gpu_utilisation_by_day
from marketplace.models import ReservationStatus
from marketplace.selectors.staff import (
    curtailment_exposure,
    curtailments_recent,
    fleet_gpus,
    gpus_in_service,
    nodes_out_of_service,
    provisioning_failures,
    reservations_by_status,
)
from marketplace.templatetags.portal_format import status_label

__all__ = ["dashboard", "utilisation_by_day"]

# How this month's ledger reads to staff: (label, kinds, sign that makes it positive).
MONEY_LINES = [
    ("Revenue (usage and reserved terms)", (LedgerKind.USAGE, LedgerKind.RESERVED_CHARGE), -1),
    ("Top-ups", (LedgerKind.TOP_UP,), 1),
    ("Refunds", (LedgerKind.REFUND,), -1),
    ("Credits (goodwill and SLA)", (LedgerKind.CREDIT, LedgerKind.SLA_CREDIT), 1),
    ("Reserved-term refunds (time not delivered)", (LedgerKind.TERM_REFUND,), 1),
    ("Adjustments", (LedgerKind.ADJUSTMENT,), 1),
    # Part of the revenue above is resold time: paid on to its sellers, less the fee kept.
    ("Resale: paid to sellers", (LedgerKind.RESALE_PROCEEDS,), 1),
    ("Resale: fees kept", (LedgerKind.RESALE_FEE,), -1),
]


def _money_lines(totals: dict) -> list[dict]:
    currencies = sorted({currency for _, currency in totals}) or ["usd"]
    lines = []
    for label, kinds, sign in MONEY_LINES:
        for currency in currencies:
            minor = sign * sum(totals.get((kind, currency), 0) for kind in kinds)
            # Exact, in the currency's own unit (a yen has no cents: ¥5,000 is 5000 minor).
            amount = from_minor_units(minor, currency)
            lines.append({"label": label, "currency": currency, "amount": amount})
    return lines


def _fleet_tables(rows: list[dict]) -> tuple[list[dict], dict]:
    """Per site and model: GPUs selling (in use / idle), out of service, failed."""
    table: dict = defaultdict(lambda: {"in_use": 0, "idle": 0, "out": 0, "failed": 0})
    for row in rows:
        cell = table[(row["site"], row["gpu_model"])]
        cell["failed"] += row["failed"]
        if row["node_status"] == "available":
            cell["in_use"] += row["in_use"]
            cell["idle"] += row["gpus"] - row["in_use"] - row["failed"]
        else:
            cell["out"] += row["gpus"]
    flat = [{"site": s, "gpu_model": m, **cell} for (s, m), cell in sorted(table.items())]
    totals = {k: sum(r[k] for r in flat) for k in ("in_use", "idle", "out", "failed")}
    return flat, totals


def utilisation_by_day(*, now: datetime, days: int = 30) -> list[dict]:
    """Per UTC day of the last `days` (today to now): GPU-hours delivered as billing meters
    them, their share of what the GPUs in service could give, and the mean GPU utilisation the
    fleet's telemetry reported (None for a day without telemetry)."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    first = today - timedelta(days=days - 1)
    gpus = gpus_in_service()
    busy = fleet_gpu_utilisation_by_day(first=first, days=days)
    rows = []
    for day, seconds in delivered_gpu_seconds_by_day(first=first, days=days, now=now):
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        capacity = gpus * min(86400, max(0, (now - start).total_seconds()))
        rows.append(
            {
                "day": day,
                "gpu_hours": round(seconds / 3600, 1),
                "share": round(seconds / capacity, 4) if capacity else 0.0,
                "gpu_busy_pct": busy.get(day),
            }
        )
    return rows


def _mean(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return round(sum(known) / len(known), 1) if known else None


@staff_member_required
def dashboard(request):
    now = timezone.now()
    fleet, fleet_totals = _fleet_tables(fleet_gpus(now=now))
    usage = utilisation_by_day(now=now, days=30)
    by_status = reservations_by_status()
    failures_count, failures = provisioning_failures(since=now - timedelta(days=7))
    statuses = [
        {"status": s, "label": status_label(s), "count": by_status.get(s, 0)}
        for s in ReservationStatus.values
    ]
    money = _money_lines(ledger_totals_by_kind(since=month_start(now)))
    exposure = curtailment_exposure(now=now, hours=24)
    charts = {
        "fleet": {
            "type": "bar",
            "labels": [f"{r['gpu_model']} · {r['site']}" for r in fleet],
            "datasets": [
                {"label": "In use", "data": [r["in_use"] for r in fleet]},
                {"label": "Idle", "data": [r["idle"] for r in fleet]},
                {"label": "Out of service", "data": [r["out"] for r in fleet]},
            ],
            "stacked": True,
        },
        "utilisation": {
            "type": "line",
            "labels": [r["day"].isoformat() for r in usage],
            "datasets": [{"label": "Share of GPU-hours delivered (%)",
                          "data": [round(r["share"] * 100, 1) for r in usage]},
                         {"label": "GPU utilisation, telemetry (%)",
                          "data": [r["gpu_busy_pct"] for r in usage]}],
        },
        "statuses": {
            "type": "bar",
            "labels": [s["label"] for s in statuses],
            "datasets": [{"label": "Reservations", "data": [s["count"] for s in statuses]}],
        },
        "exposure": {
            "type": "bar",
            "labels": [r["site"] for r in exposure],
            "datasets": [{"label": "Interruptible GPU-hours, next 24 h",
                          "data": [r["gpu_hours"] for r in exposure]}],
        },
    }  # fmt: skip
    context = {
        **admin_site.each_context(request),
        "title": "Dashboard",
        "now": now,
        "fleet": fleet,
        "fleet_totals": fleet_totals,
        "usage": usage,
        "usage_average": round(sum(r["share"] for r in usage) / len(usage) * 100, 1)
        if usage
        else 0,
        "usage_busy_average": _mean([r["gpu_busy_pct"] for r in usage]),
        "statuses": statuses,
        "money": money,
        "month": month_start(now),
        "out_of_service": nodes_out_of_service(),
        "failures_count": failures_count,
        "failures": failures,
        "exposure": exposure,
        "curtailments": curtailments_recent(now=now),
        "charts": charts,
    }
    return render(request, "staff/dashboard.html", context)
