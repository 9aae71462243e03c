"""Which organisation a request acts for, and who is acting.

- API key: the key's organisation, always. An Sy-Organization header naming another
  organisation gets 404, as any other organisation's object would.
- Session (portal user): the organisation named by the `Sy-Organization: org_…` header, or,
  without it, the user's first membership (oldest first).
"""

from dataclasses import dataclass

from rest_framework.request import Request

from config.errors import NotFound, PermissionDenied
from marketplace.auth import ApiKeyUser
from marketplace.models import ApiKey, Membership, Organization

__all__ = ["ORGANIZATION_HEADER", "OrgContext", "org_context_resolve"]

ORGANIZATION_HEADER = "Sy-Organization"


@dataclass(frozen=True)
class OrgContext:
    organization: Organization
    membership: Membership | None  # None when a key acts
    api_key: ApiKey | None  # None when a user acts

    @property
    def principal(self) -> str:
        """A stable name for the caller, used to scope idempotency keys and rate limits."""
        return f"key:{self.api_key.pk}" if self.api_key else f"user:{self.membership.user_id}"

    @property
    def actor_label(self) -> str:
        """How transitions and audit records name the caller."""
        if self.api_key:
            return f"api_key:{self.api_key.prefix}"
        return f"user:{self.membership.user.get_username()}"

    @property
    def user(self):
        return self.membership.user if self.membership else None


def org_context_resolve(request: Request) -> OrgContext:
    wanted = request.headers.get(ORGANIZATION_HEADER, "").strip()
    if isinstance(request.user, ApiKeyUser):
        key = request.user.api_key
        if wanted and wanted != key.organization.public_id:
            raise _unknown_org(wanted)
        return OrgContext(organization=key.organization, membership=None, api_key=key)

    memberships = Membership.objects.select_related("organization", "user").filter(
        user=request.user
    )
    if wanted:
        membership = memberships.filter(organization__public_id=wanted).first()
        if membership is None:
            raise _unknown_org(wanted)
    else:
        membership = memberships.order_by("created_at", "pk").first()
        if membership is None:
            raise PermissionDenied(
                "You are not a member of any organisation.", code="no_organization"
            )
    return OrgContext(organization=membership.organization, membership=membership, api_key=None)


def _unknown_org(public_id: str) -> NotFound:
    return NotFound(
        f"No organisation {public_id!r} among yours.",
        code="organization_not_found",
        field=ORGANIZATION_HEADER,
    )
