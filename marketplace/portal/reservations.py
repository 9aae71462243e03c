"""Portal: reservations (being written)."""

from django.shortcuts import render
from django.views import View

from marketplace.portal.mixins import PortalView


class SearchView(PortalView, View):
    def get(self, request):
        return render(request, "portal/dashboard.html", {"current": [], "running": 0})


class ReservationListView(SearchView):
    pass


class ReservationDetailView(PortalView, View):
    def get(self, request, public_id):
        return render(request, "portal/dashboard.html", {"current": [], "running": 0})
