"""Portal: keys (being written)."""

from django.shortcuts import render
from django.views import View

from marketplace.portal.mixins import PortalView


class KeysView(PortalView, View):
    def get(self, request):
        return render(request, "portal/dashboard.html", {"current": [], "running": 0})
