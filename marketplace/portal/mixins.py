"""What every signed-in portal page shares: the member's organisation, roles, and errors.

The organisation is the one the session names (set by the switcher), else the member's
oldest membership. A member of no organisation is sent to create one. Pages that change
something declare the roles allowed to (the same role sets as the API); the others are
refused with a message, never with a half-done change.
"""

from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest
from django.shortcuts import redirect

from config.api.context import OrgContext
from config.errors import ApplicationError, NotFound
from marketplace.models import Membership, Role

__all__ = ["SESSION_ORG_KEY", "PortalView", "portal_membership", "show_error"]

SESSION_ORG_KEY = "portal_organization"
SESSION_ENDED = (
    "You were signed out (the session ended), so the form you sent was not saved and nothing "
    "changed. Sign in, then fill it in and send it again."
)


def portal_membership(request: HttpRequest) -> Membership | None:
    memberships = Membership.objects.select_related("organization", "user").filter(
        user=request.user
    )
    wanted = request.session.get(SESSION_ORG_KEY)
    membership = memberships.filter(organization__public_id=wanted).first() if wanted else None
    return membership or memberships.order_by("created_at", "pk").first()


def show_error(request: HttpRequest, exc: ApplicationError) -> None:
    """A refused action, as the API would word it, shown at the top of the next page."""
    messages.error(request, exc.message)


class PortalView(LoginRequiredMixin):
    """Base for signed-in pages: sets self.membership, self.organization and self.org_context.

    Another organisation's object (a selector's NotFound) is a 404 page, as in the API.
    """

    # Roles that may see the page, and roles that may use its POST handler.
    read_roles: frozenset = frozenset(Role.values)
    write_roles: frozenset = frozenset(Role.values)

    def dispatch(self, request, *args, **kwargs):
        if not request.user.is_authenticated:
            if request.method == "POST":
                # A form sent after the session ended: the sign-in page says what happened.
                messages.error(request, SESSION_ENDED)
            return self.handle_no_permission()
        self.membership = portal_membership(request)
        if self.membership is None:
            return redirect("portal:organization-new")
        request.portal_membership = self.membership
        self.organization = self.membership.organization
        self.org_context = OrgContext(
            organization=self.organization, membership=self.membership, api_key=None
        )
        allowed = self.write_roles if request.method == "POST" else self.read_roles
        if self.membership.role not in allowed:
            raise PermissionDenied(
                f"Your role ({self.membership.role}) cannot do this; it needs one of: "
                f"{', '.join(sorted(allowed))}."
            )
        try:
            return super().dispatch(request, *args, **kwargs)
        except NotFound as exc:
            raise Http404(exc.message) from exc
