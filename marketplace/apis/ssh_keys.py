"""GET/POST ssh-keys; GET/DELETE ssh-keys/{id}. Every member reads; reserving roles write."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response

from config.api.pagination import NewestFirstCursorPagination
from config.api.schema import errors
from config.api.serializers import Serializer
from config.api.views import ApiView, validated_input
from marketplace.models import SshKey
from marketplace.selectors.ssh_keys import ssh_key_get_for_org, ssh_key_list_for_org
from marketplace.services.ssh_keys import ssh_key_create, ssh_key_delete

TAGS = ["SSH keys"]


class SshKeyOutput(Serializer):
    id = serializers.CharField(source="public_id")
    name = serializers.CharField()
    public_key = serializers.CharField(help_text="Normalised: type, base64 body, comment.")
    fingerprint = serializers.CharField(help_text="SHA256:<base64>, as ssh-keygen -l prints it.")
    created_by = serializers.CharField(source="created_by.username", allow_null=True, default=None)
    created_at = serializers.DateTimeField()


class SshKeyCreateInput(Serializer):
    name = serializers.CharField(max_length=100, help_text="To recognise the key, e.g. “laptop”.")
    public_key = serializers.CharField(
        max_length=16384,
        help_text="One OpenSSH public key line: ssh-ed25519, ssh-rsa (2048 bits or more) or "
        "ecdsa-sha2-nistp256/384/521, e.g. the contents of ~/.ssh/id_ed25519.pub.",
    )


class SshKeyListApi(ApiView):
    pagination_class = NewestFirstCursorPagination

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            return SshKey.objects.none()
        return ssh_key_list_for_org(organization=self.organization)

    @extend_schema(
        tags=TAGS,
        operation_id="ssh_keys_list",
        summary="List the organisation's saved SSH public keys",
        responses={200: SshKeyOutput(many=True), **errors(400, 403, 404)},
    )
    def get(self, request):
        return self.paginated_response(self.get_queryset(), SshKeyOutput)

    @extend_schema(
        tags=TAGS,
        operation_id="ssh_keys_create",
        summary="Save an SSH public key, to add to reservations by id (ssh_key_ids)",
        request=SshKeyCreateInput,
        responses={201: SshKeyOutput, **errors(400, 403, 404, 409, 415, 422)},
    )
    def post(self, request):
        data = validated_input(SshKeyCreateInput, request.data)
        key = ssh_key_create(
            organization=self.organization,
            user=self.org_context.user,
            name=data["name"],
            public_key=data["public_key"],
        )
        return Response(SshKeyOutput(key).data, status=status.HTTP_201_CREATED)


class SshKeyDetailApi(ApiView):
    def ssh_key(self) -> SshKey:
        return ssh_key_get_for_org(
            organization=self.organization, public_id=self.kwargs["ssh_key_id"]
        )

    @extend_schema(
        tags=TAGS,
        operation_id="ssh_keys_retrieve",
        summary="Retrieve a saved SSH public key",
        responses={200: SshKeyOutput, **errors(403, 404)},
    )
    def get(self, request, ssh_key_id: str):
        return Response(SshKeyOutput(self.ssh_key()).data)

    @extend_schema(
        tags=TAGS,
        operation_id="ssh_keys_destroy",
        summary="Delete a saved SSH public key (reservations that carry it keep it)",
        request=None,
        responses={204: OpenApiResponse(description="Deleted."), **errors(403, 404)},
    )
    def delete(self, request, ssh_key_id: str):
        ssh_key_delete(ssh_key=self.ssh_key())
        return Response(status=status.HTTP_204_NO_CONTENT)
