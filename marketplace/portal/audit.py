"""Portal: the organisation's audit log (owners and admins), newest first, filtered, paged."""

from django.core.paginator import Paginator
from django.shortcuts import render
from django.views import View

from marketplace.portal.mixins import PortalView
from marketplace.selectors.audit import audit_list_for_org
from marketplace.services.organizations import MANAGER_ROLES

PAGE_SIZE = 50


class AuditLogView(PortalView, View):
    read_roles = MANAGER_ROLES
    write_roles = frozenset()

    def get(self, request):
        entries = audit_list_for_org(organization=self.organization).order_by("-created_at", "-id")
        actor = request.GET.get("actor", "").strip()[:160]
        action = request.GET.get("action", "").strip()[:64]
        if actor:
            entries = entries.filter(actor=actor)
        if action:
            entries = entries.filter(
                **{"action__startswith" if action.endswith(".") else "action": action}
            )
        page = Paginator(entries, PAGE_SIZE).get_page(request.GET.get("page"))
        context = {"page": page, "actor": actor, "action": action}
        return render(request, "portal/audit_log.html", context)
