"""The marketplace's part of /api/v1/."""

from django.urls import path

from marketplace.apis import (
    api_keys,
    audit,
    catalogue,
    demand_response,
    events,
    grid,
    organization,
    quotes,
    resale,
    reservations,
    ssh_keys,
    webhooks,
)

urlpatterns = [
    path("gpu-models", catalogue.GpuModelListApi.as_view(), name="gpu-models"),
    path("sites", catalogue.SiteListApi.as_view(), name="sites"),
    path(
        "sites/<slug:slug>/availability",
        catalogue.SiteAvailabilityApi.as_view(),
        name="site-availability",
    ),
    path("availability", catalogue.AvailabilityApi.as_view(), name="availability"),
    path("grid/zones/<slug:code>/prices", grid.ZonePricesApi.as_view(), name="zone-prices"),
    path(
        "agent/grid/zones/<slug:code>/prices",
        grid.ZonePricesPushApi.as_view(),
        name="zone-prices-push",
    ),
    path(
        "grid/demand-response",
        demand_response.DemandResponseApi.as_view(),
        name="grid-demand-response",
    ),
    path("quotes", quotes.QuoteListApi.as_view(), name="quotes"),
    path("quotes/<str:quote_id>", quotes.QuoteDetailApi.as_view(), name="quote"),
    path("reservations", reservations.ReservationListApi.as_view(), name="reservations"),
    path(
        "reservations/<str:reservation_id>",
        reservations.ReservationDetailApi.as_view(),
        name="reservation",
    ),
    path(
        "reservations/<str:reservation_id>/cancellation-terms",
        reservations.CancellationTermsApi.as_view(),
        name="reservation-cancellation-terms",
    ),
    path(
        "reservations/<str:reservation_id>/extension-terms",
        reservations.ExtensionTermsApi.as_view(),
        name="reservation-extension-terms",
    ),
    path(
        "reservations/<str:reservation_id>/telemetry",
        reservations.ReservationTelemetryApi.as_view(),
        name="reservation-telemetry",
    ),
    path(
        "reservations/<str:reservation_id>/cancel",
        reservations.ReservationCancelApi.as_view(),
        name="reservation-cancel",
    ),
    path(
        "reservations/<str:reservation_id>/extend",
        reservations.ReservationExtendApi.as_view(),
        name="reservation-extend",
    ),
    path("resale/listings", resale.ListingListApi.as_view(), name="resale-listings"),
    path(
        "resale/listings/<str:listing_id>",
        resale.ListingDetailApi.as_view(),
        name="resale-listing",
    ),
    path(
        "resale/listings/<str:listing_id>/withdraw",
        resale.ListingWithdrawApi.as_view(),
        name="resale-listing-withdraw",
    ),
    path("resale/sales", resale.SaleListApi.as_view(), name="resale-sales"),
    path("api-keys", api_keys.ApiKeyListApi.as_view(), name="api-keys"),
    path("api-keys/<str:key_id>/revoke", api_keys.ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
    path("ssh-keys", ssh_keys.SshKeyListApi.as_view(), name="ssh-keys"),
    path("ssh-keys/<str:ssh_key_id>", ssh_keys.SshKeyDetailApi.as_view(), name="ssh-key"),
    path("organization", organization.OrganizationApi.as_view(), name="organization"),
    path("organization/members", organization.MemberListApi.as_view(), name="organization-members"),
    path(
        "organization/members/<str:member_id>",
        organization.MemberDetailApi.as_view(),
        name="organization-member",
    ),
    path(
        "organization/invitations",
        organization.InvitationListApi.as_view(),
        name="organization-invitations",
    ),
    path(
        "organization/invitations/<str:invitation_id>/revoke",
        organization.InvitationRevokeApi.as_view(),
        name="organization-invitation-revoke",
    ),
    path("events", events.EventListApi.as_view(), name="events"),
    path("events/<str:event_id>", events.EventDetailApi.as_view(), name="event"),
    path("webhook-endpoints", webhooks.WebhookEndpointListApi.as_view(), name="webhook-endpoints"),
    path(
        "webhook-endpoints/<str:endpoint_id>",
        webhooks.WebhookEndpointDetailApi.as_view(),
        name="webhook-endpoint",
    ),
    path(
        "webhook-endpoints/<str:endpoint_id>/rotate-secret",
        webhooks.WebhookEndpointRotateApi.as_view(),
        name="webhook-endpoint-rotate-secret",
    ),
    path(
        "webhook-endpoints/<str:endpoint_id>/deliveries",
        webhooks.WebhookDeliveryListApi.as_view(),
        name="webhook-deliveries",
    ),
    path(
        "webhook-deliveries/<str:delivery_id>/resend",
        webhooks.WebhookDeliveryResendApi.as_view(),
        name="webhook-delivery-resend",
    ),
    path("audit-log", audit.AuditLogApi.as_view(), name="audit-log"),
]
