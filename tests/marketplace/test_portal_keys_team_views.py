"""Portal API keys and team pages through Django's test client: roles, bad input, isolation.

The browser tests (tests/portal) drive the same pages end to end; these are the cheap cases.
"""

import pytest

from marketplace.models import ApiKey, Invitation, Membership, Role
from marketplace.services.api_keys import api_key_create
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


def signed_in(membership) -> HttpsClient:
    client = HttpsClient()
    client.force_login(membership.user)
    return client


def form_token(client: HttpsClient) -> str:
    """The one-time token the create-key form carries, as the browser would get it."""
    return client.get("/api-keys").context["form"].initial["once"]


@pytest.fixture
def owner():
    return MembershipFactory(organization=OrganizationFactory(name="Ada Labs"), role=Role.OWNER)


@pytest.fixture
def other_org_key():
    key, _ = api_key_create(
        organization=OrganizationFactory(name="Elsewhere"),
        name="theirs",
        scopes=["read"],
        created_by=None,
    )
    return key


# --- API keys -------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.MEMBER, Role.BILLING])
def test_roles_outside_owner_and_admin_can_neither_see_nor_create_keys(owner, role):
    key, _ = api_key_create(
        organization=owner.organization, name="ci", scopes=["read"], created_by=owner.user
    )
    client = signed_in(MembershipFactory(organization=owner.organization, role=role))

    listing = client.get("/api-keys")
    assert listing.status_code == 403
    assert key.prefix not in listing.content.decode()
    created = client.post("/api-keys", {"name": "mine", "scopes": ["read", "write"]})
    assert created.status_code == 403
    assert client.post(f"/api-keys/{key.public_id}/revoke").status_code == 403
    key.refresh_from_db()
    assert key.revoked_at is None
    assert list(ApiKey.objects.values_list("name", flat=True)) == ["ci"]


def test_an_admin_creates_a_key_and_the_answer_is_not_cacheable(owner):
    admin = MembershipFactory(organization=owner.organization, role=Role.ADMIN)
    client = signed_in(admin)
    response = client.post(
        "/api-keys", {"name": "  deploy bot ", "scopes": ["write"], "once": form_token(client)}
    )
    assert response.status_code == 200
    key = ApiKey.objects.get()
    assert (key.name, key.scopes, key.created_by) == ("deploy bot", ["write"], admin.user)
    assert response.context["secret"].startswith(key.prefix + "_")
    assert "no-store" in response["Cache-Control"]


def test_no_form_adds_an_account_directly_whatever_the_address(owner):
    """Members join by accepting an invitation: a direct add would tell the one adding whether
    an address has an account, and put people in without asking."""
    UserFactory(username="grace", email="grace@example.com")
    client = signed_in(owner)
    page = client.get("/team").content.decode()
    assert "Add member" not in page and 'action="/team/invitations"' in page
    for address in ("grace@example.com", "nobody@example.com"):
        refused = client.post("/team", {"user": address, "role": "member"})
        assert refused.status_code == 405
    assert list(Membership.objects.values_list("pk", flat=True)) == [owner.pk]


def test_an_admin_cannot_grant_or_touch_the_owner_role(owner):
    admin = MembershipFactory(organization=owner.organization, role=Role.ADMIN)
    client = signed_in(admin)
    invited = client.post(
        "/team/invitations", {"invite-email": "new@example.com", "invite-role": "owner"}
    )
    assert invited.status_code == 403
    assert "Only an owner can grant, change or remove the owner role." in invited.content.decode()
    demoted = client.post(f"/team/{owner.public_id}/role", {"role": "member"}, follow=True)
    assert "Only an owner can grant" in demoted.content.decode()
    owner.refresh_from_db()
    assert owner.role == Role.OWNER
    assert not Invitation.objects.exists()


def test_an_unknown_role_in_a_role_change_changes_nothing(owner):
    member = MembershipFactory(organization=owner.organization, role=Role.MEMBER)
    response = signed_in(owner).post(f"/team/{member.public_id}/role", {"role": "god"}, follow=True)
    assert "Choose one of the roles" in response.content.decode()
    member.refresh_from_db()
    assert member.role == Role.MEMBER


def test_another_organisations_membership_is_not_found_and_unchanged(owner):
    theirs = MembershipFactory(organization=OrganizationFactory(name="Elsewhere"), role=Role.ADMIN)
    client = signed_in(owner)
    assert client.post(f"/team/{theirs.public_id}/role", {"role": "member"}).status_code == 404
    assert client.get(f"/team/{theirs.public_id}/remove").status_code == 404
    assert client.post(f"/team/{theirs.public_id}/remove").status_code == 404
    theirs.refresh_from_db()
    assert theirs.role == Role.ADMIN


def test_signed_out_visitors_are_sent_to_sign_in():
    client = HttpsClient()
    for url in ("/api-keys", "/team", "/api-keys/1/revoke", "/team/1/remove"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login?next=")


def test_a_form_from_an_organisation_the_member_was_removed_from_acts_for_no_other(owner):
    """Ada acts for her lab in one tab and is removed from it meanwhile: the form she sends
    from it is refused (403, no key in her other organisation); her next page says she now
    acts for the other one."""
    ada = MembershipFactory(organization=owner.organization, role=Role.ADMIN)
    elsewhere = MembershipFactory(user=ada.user, organization=OrganizationFactory(name="Bo"))
    elsewhere.role = Role.OWNER
    elsewhere.save()
    client = signed_in(ada)
    once = form_token(client)  # never switched: the lab, her oldest membership
    signed_in(owner).post(f"/team/{ada.public_id}/remove")
    assert not Membership.objects.filter(pk=ada.pk).exists()

    refused = client.post("/api-keys", {"name": "ci", "scopes": ["read"], "once": once})

    assert refused.status_code == 403
    assert "no longer a member of the organisation this page was opened for" in (
        refused.content.decode()
    )
    assert not ApiKey.objects.filter(created_by=ada.user).exists()
    page = client.get("/api-keys")
    assert page.status_code == 200
    assert page.context["portal_organization"] == elsewhere.organization
    assert "now acting for Bo" in page.content.decode()
