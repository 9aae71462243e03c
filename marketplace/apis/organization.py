"""GET organization; GET organization/members; PATCH/DELETE organization/members/{id};
GET/POST organization/invitations; POST organization/invitations/{id}/revoke."""

import django_filters
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.views import FILTERED, ApiView, validated_input
from marketplace.models import Invitation, Membership, Role
from marketplace.selectors.organizations import (
    invitation_get_for_org,
    invitation_list_for_org,
    member_get_for_org,
    member_list_for_org,
)
from marketplace.serializers import MemberOutput
from marketplace.services.organizations import (
    MANAGER_ROLES,
    invitation_create,
    invitation_revoke,
    member_change_role,
    member_remove,
)

TAGS = ["Organization"]


class OrganizationOutput(Serializer):
    id = serializers.CharField(source="organization.public_id")
    name = serializers.CharField(source="organization.name")
    slug = serializers.CharField(source="organization.slug")
    created_at = serializers.DateTimeField(source="organization.created_at")
    suspended_at = serializers.DateTimeField(
        source="organization.suspended_at",
        allow_null=True,
        help_text="When Switchyard staff suspended it (null: not suspended). While suspended its "
        "API keys are refused and its members may read but change nothing (403 "
        "organization_suspended).",
    )
    suspension_reason = serializers.CharField(
        source="organization.suspension_reason",
        help_text="Why, as staff wrote it (empty when not suspended).",
    )
    role = serializers.SerializerMethodField(
        help_text="Your role; null when an API key is calling."
    )

    def get_role(self, org_context) -> str | None:
        return org_context.membership.role if org_context.membership else None


class OrganizationApi(ApiView):
    @extend_schema(
        tags=TAGS,
        operation_id="organization_retrieve",
        summary="The organisation you are acting for",
        responses={200: OrganizationOutput, **errors(403, 404)},
    )
    def get(self, request):
        return Response(OrganizationOutput(self.org_context).data)


class MemberFilter(django_filters.FilterSet):
    role = django_filters.ChoiceFilter(choices=Role.choices)

    class Meta:
        model = Membership
        fields = ["role"]


class MemberListApi(ApiView):
    """Every member may see who else is in. Members join only by accepting an invitation
    (organization/invitations): adding an account by its e-mail would tell whoever tried
    whether that address has an account, and put people in organisations without asking."""

    pagination_class = NewestFirstCursorPagination
    filter_backends = FILTERED
    filterset_class = MemberFilter

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Membership.objects.none()
        return member_list_for_org(organization=self.organization)

    @extend_schema(
        tags=TAGS,
        operation_id="organization_members_list",
        summary="List members",
        responses={200: MemberOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        return self.paginated_response(self.filter_queryset(self.get_queryset()), MemberOutput)


class MemberUpdateInput(Serializer):
    role = serializers.ChoiceField(choices=Role.choices)


class MemberDetailApi(ApiView):
    write_roles = frozenset(Role.values)
    keys_may_write = False

    @extend_schema(
        tags=TAGS,
        operation_id="organization_members_update",
        summary="Change a member's role (the last owner cannot be demoted)",
        request=MemberUpdateInput,
        responses={200: MemberOutput, **errors(400, 403, 404, 409, 415)},
    )
    def patch(self, request, member_id: str):
        membership = member_get_for_org(organization=self.organization, public_id=member_id)
        data = validated_input(MemberUpdateInput, request.data)
        membership = member_change_role(
            actor=self.org_context.membership, membership=membership, role=data["role"]
        )
        return Response(MemberOutput(membership).data)

    @extend_schema(
        tags=TAGS,
        operation_id="organization_members_destroy",
        summary="Remove a member, or leave (the last owner cannot)",
        request=None,
        responses={204: OpenApiResponse(description="Removed."), **errors(403, 404, 409)},
    )
    def delete(self, request, member_id: str):
        membership = member_get_for_org(organization=self.organization, public_id=member_id)
        member_remove(actor=self.org_context.membership, membership=membership)
        return Response(status=status.HTTP_204_NO_CONTENT)


class InvitationOutput(Serializer):
    id = serializers.CharField(source="public_id")
    email = serializers.EmailField()
    role = serializers.ChoiceField(choices=Role.choices)
    invited_by = serializers.CharField(source="invited_by.username", allow_null=True, default=None)
    created_at = serializers.DateTimeField()
    expires_at = serializers.DateTimeField(help_text="After this the link no longer works.")
    accepted_at = serializers.DateTimeField(allow_null=True)
    revoked_at = serializers.DateTimeField(allow_null=True)


class InvitationCreatedOutput(InvitationOutput):
    token = serializers.CharField(
        allow_null=True,
        help_text="The secret in the e-mailed link (SITE_URL/invitations/<token>). Shown once; "
        "null in an idempotent replay, because tokens are never stored.",
    )


class InvitationCreateInput(Serializer):
    email = serializers.EmailField(help_text="Who to invite; they need no account yet.")
    role = serializers.ChoiceField(choices=Role.choices, default=Role.MEMBER)


class _InvitationManagement(ApiView):
    read_roles = MANAGER_ROLES
    write_roles = MANAGER_ROLES
    keys_may_write = False
    keys_allowed = False


class InvitationListApi(_InvitationManagement):
    pagination_class = NewestFirstCursorPagination
    idempotency_redacted_fields = ("token",)

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return Invitation.objects.none()
        return invitation_list_for_org(organization=self.organization)

    @extend_schema(
        tags=TAGS,
        operation_id="organization_invitations_list",
        summary="List open invitations (neither accepted nor revoked)",
        responses={200: InvitationOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        return self.paginated_response(self.get_queryset(), InvitationOutput)

    @extend_schema(
        tags=TAGS,
        operation_id="organization_invitations_create",
        summary="Invite by e-mail (owners and admins; only owners invite owners); the response "
        "carries the link's token, once",
        request=InvitationCreateInput,
        responses={201: InvitationCreatedOutput, **errors(400, 403, 404, 409, 415, 422)},
    )
    def post(self, request):
        data = validated_input(InvitationCreateInput, request.data)
        invitation, token = invitation_create(
            actor=self.org_context.membership, email=data["email"], role=data["role"]
        )
        invitation.token = token
        return Response(InvitationCreatedOutput(invitation).data, status=status.HTTP_201_CREATED)


class InvitationRevokeApi(_InvitationManagement):
    @extend_schema(
        tags=TAGS,
        operation_id="organization_invitations_revoke",
        summary="Revoke an invitation; its link stops working (revoking twice is harmless)",
        request=None,
        responses={200: InvitationOutput, **errors(403, 404, 409, 422)},
    )
    def post(self, request, invitation_id: str):
        invitation = invitation_get_for_org(organization=self.organization, public_id=invitation_id)
        invitation = invitation_revoke(actor=self.org_context.membership, invitation=invitation)
        return Response(InvitationOutput(invitation).data)
