"""Reads of an organisation's webhook endpoints and their deliveries (API, portal, admin)."""

from collections.abc import Collection

from django.db.models import Prefetch, QuerySet

from config.errors import NotFound
from marketplace.models import Organization, WebhookAttempt, WebhookDelivery, WebhookEndpoint

__all__ = [
    "webhook_endpoint_list_for_org",
    "webhook_endpoint_get_for_org",
    "webhook_delivery_list_for_endpoint",
    "webhook_delivery_get_for_org",
]


def webhook_endpoint_list_for_org(*, organization: Organization) -> QuerySet[WebhookEndpoint]:
    return WebhookEndpoint.objects.filter(organization=organization).order_by("-created_at", "-id")


def webhook_endpoint_get_for_org(*, organization: Organization, public_id: str) -> WebhookEndpoint:
    endpoint = (
        webhook_endpoint_list_for_org(organization=organization).filter(public_id=public_id).first()
    )
    if endpoint is None:
        raise NotFound(
            f"No webhook endpoint {public_id!r} in this organisation.",
            code="webhook_endpoint_not_found",
        )
    return endpoint


def _with_attempts(queryset: QuerySet[WebhookDelivery]) -> QuerySet[WebhookDelivery]:
    return queryset.select_related("event", "endpoint").prefetch_related(
        Prefetch("attempt_set", queryset=WebhookAttempt.objects.order_by("at", "id"))
    )


def _visible(
    deliveries: QuerySet[WebhookDelivery], hidden_types: Collection[str]
) -> QuerySet[WebhookDelivery]:
    """`hidden_types`: the event types the caller may not see (as selectors.events has it)."""
    return deliveries.exclude(event__type__in=hidden_types) if hidden_types else deliveries


def webhook_delivery_list_for_endpoint(
    *, endpoint: WebhookEndpoint, hidden_types: Collection[str] = ()
) -> QuerySet[WebhookDelivery]:
    deliveries = WebhookDelivery.objects.filter(endpoint=endpoint)
    return _with_attempts(_visible(deliveries, hidden_types))


def webhook_delivery_get_for_org(
    *, organization: Organization, public_id: str, hidden_types: Collection[str] = ()
) -> WebhookDelivery:
    deliveries = WebhookDelivery.objects.filter(endpoint__organization=organization)
    delivery = (
        _with_attempts(_visible(deliveries, hidden_types)).filter(public_id=public_id).first()
    )
    if delivery is None:
        raise NotFound(
            f"No webhook delivery {public_id!r} in this organisation.",
            code="webhook_delivery_not_found",
        )
    return delivery
