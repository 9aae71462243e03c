"""The marketplace's part of /api/v1/."""

from django.urls import path

from marketplace.apis import api_keys, organization

urlpatterns = [
    path("organization", organization.OrganizationApi.as_view(), name="organization"),
    path(
        "organization/members",
        organization.MemberListApi.as_view(),
        name="organization-members",
    ),
    path(
        "organization/members/<str:member_id>",
        organization.MemberDetailApi.as_view(),
        name="organization-member",
    ),
    path("api-keys", api_keys.ApiKeyListApi.as_view(), name="api-keys"),
    path("api-keys/<str:key_id>/revoke", api_keys.ApiKeyRevokeApi.as_view(), name="api-key-revoke"),
]
