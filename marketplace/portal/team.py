"""Portal: the organisation's members. Every member sees the team, as in the API.

Owners and admins (MANAGER_ROLES) invite by e-mail and change roles; members join only by
accepting an invitation. The services hold the rest of the rules (only an owner touches the
owner role; the last owner stays). Anyone may leave. The invitation link itself is answered by
portal.invitations.
"""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.utils import timezone
from django.views import View

from config.errors import ApplicationError
from marketplace.models import Membership, Role
from marketplace.portal.forms import InvitationCreateForm, MemberRoleForm
from marketplace.portal.mixins import PortalView, show_error
from marketplace.selectors.organizations import (
    invitation_get_for_org,
    invitation_list_for_org,
    member_get_for_org,
    member_list_for_org,
)
from marketplace.services.organizations import (
    MANAGER_ROLES,
    invitation_create,
    invitation_revoke,
    member_change_role,
    member_remove,
)


class _MemberView(PortalView, View):
    def get_member(self, public_id: str) -> Membership:
        # Another organisation's member is not found: a 404 (PortalView).
        return member_get_for_org(organization=self.organization, public_id=public_id)


class TeamView(PortalView, View):
    write_roles = MANAGER_ROLES
    template_name = "portal/team.html"

    def get(self, request):
        return self.render_page(request)

    def render_page(self, request, invite_form=None, *, status=200):
        members = member_list_for_org(organization=self.organization).order_by("created_at", "pk")
        can_manage = self.membership.role in MANAGER_ROLES
        context = {
            "invite_form": invite_form or InvitationCreateForm(prefix="invite"),
            "members": members,
            "invitations": (
                invitation_list_for_org(organization=self.organization) if can_manage else []
            ),
            "now": timezone.now(),
            "roles": Role.choices,
            "can_manage": can_manage,
        }
        return render(request, self.template_name, context, status=status)


class InvitationCreateView(TeamView):
    """POST from the team page's "Invite by e-mail" form; errors re-render the team page."""

    http_method_names = ["post"]

    def post(self, request):
        form = InvitationCreateForm(request.POST, prefix="invite")
        if not form.is_valid():
            return self.render_page(request, invite_form=form, status=400)
        email, role = form.cleaned_data["email"], form.cleaned_data["role"]
        try:
            invitation, _ = invitation_create(actor=self.membership, email=email, role=role)
        except ApplicationError as exc:
            show_error(request, exc)
            return self.render_page(request, invite_form=form, status=exc.status_code)
        messages.success(request, f"Invitation sent to {invitation.email} (as {role}).")
        return redirect("portal:team")


class InvitationRevokeView(PortalView, View):
    write_roles = MANAGER_ROLES
    http_method_names = ["post"]

    def post(self, request, public_id: str):
        invitation = invitation_get_for_org(organization=self.organization, public_id=public_id)
        try:
            invitation_revoke(actor=self.membership, invitation=invitation)
        except ApplicationError as exc:
            show_error(request, exc)
        else:
            messages.success(request, f"The invitation to {invitation.email} was revoked.")
        return redirect("portal:team")


class MemberRoleView(_MemberView):
    write_roles = MANAGER_ROLES
    http_method_names = ["post"]

    def post(self, request, public_id: str):
        membership = self.get_member(public_id)
        form = MemberRoleForm(request.POST)
        if not form.is_valid():
            messages.error(request, f"Choose one of the roles: {', '.join(Role.values)}.")
            return redirect("portal:team")
        try:
            membership = member_change_role(
                actor=self.membership, membership=membership, role=form.cleaned_data["role"]
            )
        except ApplicationError as exc:
            show_error(request, exc)
        else:
            messages.success(request, f"{membership.user.get_username()} is now {membership.role}.")
        return redirect("portal:team")


class MemberRemoveView(_MemberView):
    """GET asks for confirmation; POST removes. Any member may leave; the service decides."""

    def get(self, request, public_id: str):
        membership = self.get_member(public_id)
        context = {"member": membership, "leaving": membership.pk == self.membership.pk}
        return render(request, "portal/team_remove.html", context)

    def post(self, request, public_id: str):
        membership = self.get_member(public_id)
        try:
            member_remove(actor=self.membership, membership=membership)
        except ApplicationError as exc:
            show_error(request, exc)
            return redirect("portal:team")
        if membership.pk == self.membership.pk:
            messages.success(request, f"You left {self.organization.name}.")
            return redirect("portal:dashboard")
        messages.success(request, f"{membership.user.get_username()} was removed.")
        return redirect("portal:team")
