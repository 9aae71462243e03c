"""Portal: the organisation's API keys, for owners and admins (the API's MANAGER_ROLES).

A new key's secret appears once, in the page that answers the POST: it is not stored anywhere,
not put in the session or a message, and that page must not be cached. Reloading that page
re-sends the form; a one-time token in the form (kept in the session) makes the second send
create nothing and show no secret.
"""

import secrets

from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.cache import add_never_cache_headers
from django.views import View

from config.errors import ApplicationError
from marketplace.models import ApiKey, Role
from marketplace.portal.forms import ApiKeyCreateForm
from marketplace.portal.mixins import PortalView
from marketplace.selectors.organizations import api_key_get_for_org, api_key_list_for_org
from marketplace.services.api_keys import api_key_create, api_key_revoke
from marketplace.services.organizations import MANAGER_ROLES

_FORM_TOKENS = "portal_api_key_form_tokens"
_OPEN_FORMS = 10  # tokens kept per session: a few tabs with the form open


def _form_token_issue(request) -> str:
    token = secrets.token_urlsafe(16)
    request.session[_FORM_TOKENS] = [
        *request.session.get(_FORM_TOKENS, [])[1 - _OPEN_FORMS :],
        token,
    ]
    return token


def _form_token_spend(request, token: str) -> bool:
    """True once per issued token. Guards against a reload, not an attacker (who has a session)."""
    tokens = request.session.get(_FORM_TOKENS, [])
    if not token or token not in tokens:
        return False
    request.session[_FORM_TOKENS] = [t for t in tokens if t != token]
    return True


class _KeyManagement(PortalView, View):
    read_roles = MANAGER_ROLES
    write_roles = MANAGER_ROLES

    def get_key(self, public_id: str) -> ApiKey:
        # Another organisation's key is not found: a 404 (PortalView).
        return api_key_get_for_org(organization=self.organization, public_id=public_id)


class KeysView(_KeyManagement):
    template_name = "portal/api_keys.html"

    def get(self, request):
        return self.render_page(request, self.new_form(request))

    def post(self, request):
        form = ApiKeyCreateForm(
            request.POST, can_grant_billing=self._is_owner(), can_grant_grid=request.user.is_staff
        )
        if not form.is_valid():
            return self.render_page(request, form, status=400)
        if not _form_token_spend(request, form.cleaned_data["once"]):
            messages.warning(
                request,
                "This form was already sent (the page was reloaded?), so no key was created "
                "now. A secret is shown only once: if you did not copy it, revoke that key "
                "and create another.",
            )
            return self.render_page(request, self.new_form(request), status=409)
        try:
            key, secret = api_key_create(
                organization=self.organization,
                name=form.cleaned_data["name"],
                scopes=form.cleaned_data["scopes"],
                created_by=request.user,
            )
        except ApplicationError as exc:
            form.data = form.data.copy()
            form.data["once"] = _form_token_issue(request)  # nothing was created: send again
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
            return self.render_page(request, form, status=exc.status_code)
        response = self.render_page(request, self.new_form(request), created=key, secret=secret)
        add_never_cache_headers(response)
        return response

    def new_form(self, request) -> ApiKeyCreateForm:
        return ApiKeyCreateForm(
            initial={"once": _form_token_issue(request)},
            can_grant_billing=self._is_owner(),
            can_grant_grid=request.user.is_staff,
        )

    def _is_owner(self) -> bool:
        return self.membership.role == Role.OWNER

    def render_page(self, request, form, *, status=200, **extra):
        context = {
            "form": form,
            "keys": api_key_list_for_org(organization=self.organization),
            "api_example_url": request.build_absolute_uri(reverse("gpu-models")),
            **extra,
        }
        return render(request, self.template_name, context, status=status)


class KeyRevokeView(_KeyManagement):
    """GET asks for confirmation; POST revokes (revoking twice is harmless, as in the API)."""

    def get(self, request, public_id: str):
        return render(request, "portal/api_keys_revoke.html", {"key": self.get_key(public_id)})

    def post(self, request, public_id: str):
        key = self.get_key(public_id)
        if key.revoked_at is not None:
            messages.info(request, f"{key.name} ({key.prefix}…) was already revoked.")
        else:
            key = api_key_revoke(api_key=key)
            messages.success(request, f"{key.name} ({key.prefix}…) is revoked; it no longer works.")
        return redirect("portal:api-keys")
