"""Portal: the organisation's webhook endpoints (owners and admins), as in the API.

A signing secret is shown once, on the page that answers its creation or rotation, and never
stored in a message or the session.
"""

from django.contrib import messages
from django.http import Http404
from django.shortcuts import redirect, render
from django.utils.cache import add_never_cache_headers
from django.views import View

from config.errors import ApplicationError
from config.once import once_or_refused
from marketplace.models import DeliveryStatus
from marketplace.portal.forms import WebhookEndpointForm
from marketplace.portal.mixins import PortalView, show_error
from marketplace.selectors.webhooks import (
    webhook_delivery_get_for_org,
    webhook_delivery_list_for_endpoint,
    webhook_endpoint_get_for_org,
    webhook_endpoint_list_for_org,
)
from marketplace.services.organizations import MANAGER_ROLES
from marketplace.services.webhooks import (
    webhook_delivery_resend,
    webhook_endpoint_create,
    webhook_endpoint_delete,
    webhook_endpoint_rotate_secret,
    webhook_endpoint_update,
)

DELIVERIES_SHOWN = 50


class _WebhookView(PortalView, View):
    read_roles = MANAGER_ROLES
    write_roles = MANAGER_ROLES


class WebhooksView(_WebhookView):
    def get(self, request):
        return self.render_page(request, WebhookEndpointForm())

    def post(self, request):
        form = WebhookEndpointForm(request.POST)
        if not form.is_valid():
            return self.render_page(request, form, status=400)
        try:
            created = once_or_refused(
                request,
                self.organization,
                form.cleaned_data["once"],
                lambda: webhook_endpoint_create(
                    organization=self.organization,
                    url=form.cleaned_data["url"],
                    event_types=form.cleaned_data["event_types"],
                    description=form.cleaned_data["description"],
                    created_by=request.user,
                ),
            )
        except ApplicationError as exc:
            form.add_error(exc.field if exc.field in form.fields else None, exc.message)
            return self.render_page(request, form, status=exc.status_code)
        if created is None:
            messages.warning(
                request,
                "This form was already sent (the page was reloaded?), so no second endpoint "
                "was added. A signing secret is shown only once: rotate it on the endpoint's "
                "page if you did not copy it.",
            )
            return self.render_page(request, WebhookEndpointForm(), status=409)
        endpoint, secret = created
        return render_endpoint(request, self.organization, endpoint, new_secret=secret)

    def render_page(self, request, form, *, status=200):
        context = {
            "form": form,
            "endpoints": webhook_endpoint_list_for_org(organization=self.organization),
        }
        return render(request, "portal/webhooks.html", context, status=status)


def render_endpoint(request, organization, endpoint, *, new_secret=None, status=200):
    deliveries = webhook_delivery_list_for_endpoint(endpoint=endpoint).order_by(
        "-created_at", "-id"
    )[:DELIVERIES_SHOWN]
    context = {"endpoint": endpoint, "deliveries": deliveries, "new_secret": new_secret}
    response = render(request, "portal/webhook.html", context, status=status)
    if new_secret is not None:
        add_never_cache_headers(response)  # the secret is in it: never kept by a cache
    return response


class WebhookView(_WebhookView):
    """GET shows an endpoint and its latest deliveries; POST takes action=enable, disable,
    rotate, delete (asked first on WebhookDeleteView's page) or resend (with delivery=whd_…)."""

    def get(self, request, public_id: str):
        endpoint = webhook_endpoint_get_for_org(organization=self.organization, public_id=public_id)
        return render_endpoint(request, self.organization, endpoint)

    def post(self, request, public_id: str):
        endpoint = webhook_endpoint_get_for_org(organization=self.organization, public_id=public_id)
        action = request.POST.get("action", "")
        if action in ("enable", "disable"):
            webhook_endpoint_update(endpoint=endpoint, enabled=action == "enable")
            messages.success(request, f"Endpoint {action}d.")
        elif action == "rotate":
            try:
                endpoint, secret = webhook_endpoint_rotate_secret(
                    endpoint=endpoint, expire_previous=bool(request.POST.get("expire_previous"))
                )
            except ApplicationError as exc:
                show_error(request, exc)
                return render_endpoint(request, self.organization, endpoint, status=exc.status_code)
            return render_endpoint(request, self.organization, endpoint, new_secret=secret)
        elif action == "delete":
            webhook_endpoint_delete(endpoint=endpoint)
            messages.success(request, f"Deleted the endpoint {endpoint.url}.")
            return redirect("portal:webhooks")
        elif action == "resend":
            delivery = webhook_delivery_get_for_org(
                organization=self.organization, public_id=request.POST.get("delivery", "")
            )
            if delivery.endpoint_id != endpoint.pk:  # a delivery of this endpoint's page only
                raise Http404("No such delivery of this endpoint.")
            try:
                webhook_delivery_resend(delivery=delivery)
            except ApplicationError as exc:
                show_error(request, exc)
                return render_endpoint(request, self.organization, endpoint, status=exc.status_code)
            messages.success(request, f"{delivery.event.type} ({delivery.event.public_id}) queued.")
        else:
            messages.error(request, "Unknown action.")
            return render_endpoint(request, self.organization, endpoint, status=400)
        return redirect("portal:webhook", public_id=endpoint.public_id)


class WebhookDeleteView(_WebhookView):
    """GET asks for confirmation, saying what is lost; its form posts action=delete to the
    endpoint's page (WebhookView)."""

    def get(self, request, public_id: str):
        endpoint = webhook_endpoint_get_for_org(organization=self.organization, public_id=public_id)
        pending = (
            webhook_delivery_list_for_endpoint(endpoint=endpoint)
            .filter(status=DeliveryStatus.PENDING)
            .count()
        )
        return render(
            request, "portal/webhook_delete.html", {"endpoint": endpoint, "pending": pending}
        )
