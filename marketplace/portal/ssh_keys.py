"""Portal: the organisation's saved SSH public keys, offered when reserving.

Every member sees them, as in the API; the roles that reserve (RESERVING_ROLES) add and
delete them. Deleting a key leaves the reservations that carry it as they are.
"""

from django.contrib import messages
from django.shortcuts import redirect, render
from django.views import View

from config.errors import ApplicationError
from marketplace.models import SshKey
from marketplace.portal.forms import SshKeyCreateForm
from marketplace.portal.mixins import PortalView
from marketplace.selectors.ssh_keys import ssh_key_get_for_org, ssh_key_list_for_org
from marketplace.services.organizations import RESERVING_ROLES
from marketplace.services.ssh_keys import ssh_key_create, ssh_key_delete


class _SshKeyView(PortalView, View):
    write_roles = RESERVING_ROLES

    def get_ssh_key(self, public_id: str) -> SshKey:
        # Another organisation's key is not found: a 404 (PortalView).
        return ssh_key_get_for_org(organization=self.organization, public_id=public_id)


class SshKeysView(_SshKeyView):
    template_name = "portal/ssh_keys.html"

    def get(self, request):
        return self.render_page(request, SshKeyCreateForm())

    def post(self, request):
        form = SshKeyCreateForm(request.POST)
        if not form.is_valid():
            return self.render_page(request, form, status=400)
        try:
            key = ssh_key_create(
                organization=self.organization,
                user=request.user,
                name=form.cleaned_data["name"],
                public_key=form.cleaned_data["public_key"],
            )
        except ApplicationError as exc:
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
            return self.render_page(request, form, status=exc.status_code)
        messages.success(request, f"Saved {key.name} ({key.fingerprint}).")
        return redirect("portal:ssh-keys")

    def render_page(self, request, form, *, status=200):
        context = {
            "form": form,
            "ssh_keys": ssh_key_list_for_org(organization=self.organization),
            "can_change": self.membership.role in RESERVING_ROLES,
        }
        return render(request, self.template_name, context, status=status)


class SshKeyDeleteView(_SshKeyView):
    """GET asks for confirmation; POST deletes."""

    def get(self, request, public_id: str):
        return render(
            request, "portal/ssh_keys_delete.html", {"ssh_key": self.get_ssh_key(public_id)}
        )

    def post(self, request, public_id: str):
        key = self.get_ssh_key(public_id)
        ssh_key_delete(ssh_key=key)
        messages.success(request, f"Deleted {key.name} ({key.fingerprint}).")
        return redirect("portal:ssh-keys")
