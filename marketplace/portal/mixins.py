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
from django.middleware.csrf import rotate_token
from django.shortcuts import redirect

from config.api.context import OrgContext
from config.errors import ApplicationError, NotFound
from marketplace.models import Membership, Role
from marketplace.services.organizations import organization_suspended_error

__all__ = [
    "SESSION_ORG_KEY",
    "PortalView",
    "portal_membership",
    "portal_organization_set",
    "show_error",
]

SESSION_ORG_KEY = "portal_organization"
SESSION_ENDED = (
    "You were signed out (the session ended), so the form you sent was not saved and nothing "
    "changed. Sign in, then fill it in and send it again."
)

ORGANIZATION_LEFT = (
    "You are no longer a member of the organisation this page was opened for, so nothing was "
    "saved or changed. Go to the overview to see which organisation you now act for."
)


def portal_organization_set(request: HttpRequest, public_id: str) -> None:
    """Act for organisation `public_id` from now on. When that is another than the session
    acted for, the CSRF token is renewed: a form still open for the one before (in another
    tab) is refused, as one from before signing in is, instead of acting for this one."""
    previous = request.session.get(SESSION_ORG_KEY)
    request.session[SESSION_ORG_KEY] = public_id
    if previous != public_id:  # None: the oldest membership, which may have been another
        rotate_token(request)


def _portal_memberships(request: HttpRequest) -> tuple[Membership | None, int]:
    """The membership the session acts for (else the oldest) and how many the user has."""
    memberships = list(
        Membership.objects.select_related("organization", "user")
        .filter(user=request.user)
        .order_by("created_at", "pk")
    )
    wanted = request.session.get(SESSION_ORG_KEY)
    chosen = next((m for m in memberships if m.organization.public_id == wanted), None)
    return chosen or (memberships[0] if memberships else None), len(memberships)


def portal_membership(request: HttpRequest) -> Membership | None:
    return _portal_memberships(request)[0]


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
    # A POST that only stops spending (cancel, stop early): still open while staff have the
    # organisation suspended, so a customer is never made to pay for work they want ended.
    allowed_while_suspended = False

    def dispatch(self, request, *args, **kwargs):
        if not request.user.is_authenticated:
            if request.method == "POST":
                # A form sent after the session ended: the sign-in page says what happened.
                messages.error(request, SESSION_ENDED)
            return self.handle_no_permission()
        self.membership, count = _portal_memberships(request)
        acted_for = request.session.get(SESSION_ORG_KEY)
        acting_for = self.membership.organization.public_id if self.membership else None
        if acted_for and acting_for != acted_for:
            # The member left the organisation the session acted for, or was removed from it.
            if request.method == "POST":
                raise PermissionDenied(ORGANIZATION_LEFT)
            if acting_for:
                messages.warning(
                    request,
                    f"You are no longer a member of the organisation you were acting for; now "
                    f"acting for {self.membership.organization.name}.",
                )
        if self.membership is None:
            request.session.pop(SESSION_ORG_KEY, None)
            return redirect("portal:organization-new")
        if acted_for and acting_for != acted_for:
            portal_organization_set(request, acting_for)
        elif acted_for is None and count > 1:
            # Noted once a member has a choice: a form opened for one organisation then never
            # acts for another (one left, or switched to in another tab).
            request.session[SESSION_ORG_KEY] = acting_for
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
        if (
            request.method == "POST"
            and self.organization.suspended_at is not None
            and not self.allowed_while_suspended
        ):
            # Suspended by staff: its pages read (every page says why), nothing changes but
            # what only stops spending (allowed_while_suspended).
            raise PermissionDenied(organization_suspended_error(self.organization).message)
        try:
            return super().dispatch(request, *args, **kwargs)
        except NotFound as exc:
            raise Http404(exc.message) from exc
