"""Portal: the link in an invitation e-mail, /invitations/<token>.

Signed out, the page says who invites you where, and offers to sign in or sign up and come
back (?next=); signing up through it joins the inviting organisation instead of creating one
(views.SignupView). Signed in, a button accepts. The token is the proof: the account's e-mail
need not be the invited one.
"""

from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect, render
from django.views import View

from config.errors import ApplicationError, NotFound
from marketplace.models import Invitation
from marketplace.portal.mixins import portal_organization_set
from marketplace.selectors.organizations import invitation_get_by_token
from marketplace.services.organizations import (
    invitation_accept,
    invitation_check_joinable,
    invitation_check_open,
)

__all__ = ["InvitationAcceptView", "open_invitation_for"]

TEMPLATE = "portal/invitation.html"


def open_invitation_for(token: str) -> Invitation | None:
    """The invitation behind a link if it can still be accepted, else None."""
    try:
        invitation = invitation_get_by_token(token=token)
        invitation_check_open(invitation)
    except ApplicationError:
        return None
    return invitation


class InvitationAcceptView(View):
    def get(self, request, token: str):
        invitation = self._invitation(token)
        try:
            # Not offered to join while its organisation is suspended (it would be refused).
            invitation_check_joinable(invitation)
        except ApplicationError as exc:
            return self._closed(request, invitation, exc)
        return render(request, TEMPLATE, {"invitation": invitation})

    def post(self, request, token: str):
        invitation = self._invitation(token)
        if not request.user.is_authenticated:
            return redirect(request.path)
        try:
            membership = invitation_accept(token=token, user=request.user)
        except NotFound as exc:
            raise Http404(exc.message) from exc
        except ApplicationError as exc:
            return self._closed(request, invitation, exc)
        organization = membership.organization
        portal_organization_set(request, organization.public_id)
        messages.success(request, f"You joined {organization.name} as {membership.role}.")
        return redirect("portal:dashboard")

    def _invitation(self, token: str) -> Invitation:
        try:
            return invitation_get_by_token(token=token)
        except NotFound as exc:
            raise Http404(exc.message) from exc

    def _closed(self, request, invitation: Invitation, exc: ApplicationError):
        context = {"invitation": invitation, "refusal": exc}
        return render(request, TEMPLATE, context, status=exc.status_code)
