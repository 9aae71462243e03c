"""Portal: where the GPUs are. Every site with its power, cooling and capacity, and, per site,
what is free for a window (the API's sites and sites/{slug}/availability)."""

from datetime import timedelta

from django import forms
from django.shortcuts import render
from django.utils import timezone
from django.views import View

from config.errors import ApplicationError
from config.replica import replica_reads
from inventory.selectors import zone_prices_between
from marketplace.portal.fields import PortalDateTimeField
from marketplace.portal.mixins import PortalView
from marketplace.selectors.availability import site_availability
from marketplace.selectors.catalogue import (
    site_capacity_summaries,
    site_get_public,
    site_list_public,
)

__all__ = ["SiteListView", "SiteDetailView", "SiteWindowForm"]

MAX_HOURS = 366 * 24  # the API's longest window


class SiteWindowForm(forms.Form):
    starts_at = PortalDateTimeField(
        label="From (UTC)",
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="Blank: now.",
    )
    hours = forms.IntegerField(label="Hours", min_value=1, max_value=MAX_HOURS, initial=24)

    def window(self):
        starts_at = self.cleaned_data.get("starts_at") or timezone.now().replace(microsecond=0)
        return starts_at, starts_at + timedelta(hours=self.cleaned_data["hours"])


class SiteListView(PortalView, View):
    @replica_reads
    def get(self, request):
        sites = list(site_list_public())
        capacity = site_capacity_summaries(site_ids=[site.pk for site in sites])
        rows = [(site, capacity[site.pk]) for site in sites]
        return render(request, "portal/sites.html", {"rows": rows})


FORECAST_DAYS = 14


def free_by_day(site, *, now, days: int = FORECAST_DAYS) -> dict:
    """GPUs free for each whole UTC day ahead (today: from now), per model, from the same
    availability query as the window below; for the chart and the table beside it."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    labels, series = [], {}
    for n in range(days):
        day = today + timedelta(days=n)
        start, end = max(day, now.replace(microsecond=0)), day + timedelta(days=1)
        labels.append(day.date())
        for a in site_availability(site=site, starts_at=start, ends_at=end):
            series.setdefault(a.gpu_model.name, [0] * days)[n] = a.free_gpus
    return {
        "labels": labels,
        "rows": sorted(series.items()),
        "chart": {
            "free": {
                "type": "line",
                "labels": [d.isoformat() for d in labels],
                "datasets": [
                    {"label": name, "data": data} for name, data in sorted(series.items())
                ],
            }
        },
    }


def zone_prices_next_day(site, *, now) -> dict | None:
    """The site's price zone's prices from this hour for 24 hours: a chart and its table."""
    if site.price_zone_id is None:
        return None
    zone = site.price_zone
    start = now.replace(minute=0, second=0, microsecond=0)
    prices = list(
        zone_prices_between(zone=zone, starts_at=start, ends_at=start + timedelta(days=1))
    )
    return {
        "zone": zone,
        "start": start,
        "prices": prices,
        "chart": {
            "power": {
                "type": "line",
                "labels": [p.starts_at.strftime("%H:%M") for p in prices],
                "datasets": [
                    {
                        "label": f"{zone.currency.upper()} per MWh",
                        "data": [float(p.price_per_mwh) for p in prices],  # display only
                        "stepped": True,
                    }
                ],
            }
        },
    }


class SiteDetailView(PortalView, View):
    @replica_reads
    def get(self, request, slug: str):
        site = site_get_public(slug=slug)  # unknown or retired: a 404 (PortalView)
        form = SiteWindowForm(request.GET or {"hours": 24})
        availability, window, status = None, None, 200
        if form.is_valid():
            window = form.window()
            try:
                availability = site_availability(site=site, starts_at=window[0], ends_at=window[1])
            except ApplicationError as exc:
                form.add_error(None, exc.message)
        if form.errors:
            status = 400
        capacity = site_capacity_summaries(site_ids=[site.pk])[site.pk]
        now = timezone.now()
        forecast = free_by_day(site, now=now) if site.status == "active" else None
        return render(
            request,
            "portal/site.html",
            {
                "site": site,
                "capacity": capacity,
                "form": form,
                "availability": availability,
                "window": window,
                "forecast": forecast,
                "power": zone_prices_next_day(site, now=now),
            },
            status=status,
        )
