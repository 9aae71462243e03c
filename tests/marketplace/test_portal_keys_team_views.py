"""Portal API keys and team pages through Django's test client: roles, bad input, isolation.

The browser tests (tests/portal) drive the same pages end to end; these are the cheap cases.
"""

import pytest

from marketplace.models import ApiKey, Membership, Role
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


@pytest.mark.parametrize(
    "data, field, message",
    [
        ({"name": "ci"}, "scopes", "Choose at least one scope."),
        ({"name": "ci", "scopes": ["admin"]}, "scopes", "Select a valid choice."),
        ({"name": "   ", "scopes": ["read"]}, "name", "This field is required."),
        ({"name": "x" * 121, "scopes": ["read"]}, "name", "at most 120 characters"),
    ],
)
def test_bad_key_input_is_a_form_error_and_writes_nothing(owner, data, field, message):
    client = signed_in(owner)
    response = client.post("/api-keys", {**data, "once": form_token(client)})
    assert response.status_code == 400
    assert message in " ".join(response.context["form"].errors[field])
    assert "secret" not in response.context
    assert not ApiKey.objects.exists()


def test_a_resent_or_tokenless_create_form_creates_nothing_more(owner):
    client = signed_in(owner)
    data = {"name": "ci", "scopes": ["read"], "once": form_token(client)}
    assert client.post("/api-keys", data).status_code == 200
    again = client.post("/api-keys", data)
    assert again.status_code == 409
    assert "secret" not in again.context
    assert "This form was already sent" in again.content.decode()
    tokenless = client.post("/api-keys", {"name": "sneaky", "scopes": ["read"]})
    assert tokenless.status_code == 409
    assert list(ApiKey.objects.values_list("name", flat=True)) == ["ci"]


def test_another_organisations_key_is_not_found_and_stays_active(owner, other_org_key):
    client = signed_in(owner)
    assert client.get(f"/api-keys/{other_org_key.public_id}/revoke").status_code == 404
    assert client.post(f"/api-keys/{other_org_key.public_id}/revoke").status_code == 404
    other_org_key.refresh_from_db()
    assert other_org_key.revoked_at is None
    assert other_org_key.prefix not in client.get("/api-keys").content.decode()


def test_revoking_twice_keeps_the_first_revocation_time(owner):
    key, _ = api_key_create(
        organization=owner.organization, name="ci", scopes=["read"], created_by=None
    )
    client = signed_in(owner)
    assert client.post(f"/api-keys/{key.public_id}/revoke").status_code == 302
    key.refresh_from_db()
    first = key.revoked_at
    assert first is not None
    again = client.post(f"/api-keys/{key.public_id}/revoke", follow=True)
    assert "ci (" in again.content.decode() and "was already revoked" in again.content.decode()
    key.refresh_from_db()
    assert key.revoked_at == first


# --- Team -----------------------------------------------------------------------------------


def test_every_role_sees_the_team_but_only_managers_get_the_forms(owner):
    billing = MembershipFactory(organization=owner.organization, role=Role.BILLING)
    page = signed_in(billing).get("/team")
    assert page.status_code == 200
    assert [m.pk for m in page.context["members"]] == [owner.pk, billing.pk]
    assert page.context["can_manage"] is False
    assert 'action="/team"' not in page.content.decode()
    assert signed_in(owner).get("/team").context["can_manage"] is True


@pytest.mark.parametrize("role", [Role.MEMBER, Role.BILLING])
def test_a_non_manager_cannot_add_or_change_roles(owner, role):
    actor = MembershipFactory(organization=owner.organization, role=role)
    UserFactory(username="newcomer", email="new@example.com")
    client = signed_in(actor)
    assert client.post("/team", {"user": "new@example.com", "role": "member"}).status_code == 403
    assert client.post(f"/team/{owner.public_id}/role", {"role": "member"}).status_code == 403
    assert not Membership.objects.filter(user__username="newcomer").exists()
    owner.refresh_from_db()
    assert owner.role == Role.OWNER


def test_a_non_manager_cannot_remove_someone_else_but_may_leave(owner):
    member = MembershipFactory(organization=owner.organization, role=Role.MEMBER)
    client = signed_in(member)
    refused = client.post(f"/team/{owner.public_id}/remove", follow=True)
    assert "Only owners and admins can manage members." in refused.content.decode()
    assert Membership.objects.filter(pk=owner.pk).exists()

    left = client.post(f"/team/{member.public_id}/remove")
    assert left.status_code == 302 and left["Location"] == "/dashboard"
    assert not Membership.objects.filter(pk=member.pk).exists()


@pytest.mark.parametrize(
    "data, field, message",
    [
        ({"user": "nobody@example.com", "role": "member"}, "user", "No single Switchyard user"),
        ({"user": "newcomer", "role": "emperor"}, "role", "Select a valid choice."),
        ({"user": "", "role": "member"}, "user", "This field is required."),
    ],
)
def test_bad_member_input_is_a_form_error_and_adds_nobody(owner, data, field, message):
    UserFactory(username="newcomer", email="new@example.com")
    response = signed_in(owner).post("/team", data)
    assert response.status_code == 400
    assert message in " ".join(response.context["form"].errors[field])
    assert list(Membership.objects.values_list("pk", flat=True)) == [owner.pk]


def test_a_user_is_found_by_username_or_by_email_in_any_case(owner):
    UserFactory(username="grace", email="Grace@Example.com")
    UserFactory(username="linus", email="linus@example.com")
    client = signed_in(owner)
    assert client.post("/team", {"user": "grace@example.COM", "role": "billing"}).status_code == 302
    assert client.post("/team", {"user": "linus", "role": "admin"}).status_code == 302
    roles = dict(
        Membership.objects.filter(organization=owner.organization).values_list(
            "user__username", "role"
        )
    )
    assert roles == {owner.user.username: "owner", "grace": "billing", "linus": "admin"}


def test_adding_an_existing_member_shows_the_service_message(owner):
    member = MembershipFactory(organization=owner.organization, role=Role.MEMBER)
    response = signed_in(owner).post("/team", {"user": member.user.username, "role": "admin"})
    assert response.status_code == 409
    assert "This user is already a member of the organisation." in response.content.decode()
    member.refresh_from_db()
    assert member.role == Role.MEMBER


def test_an_admin_cannot_grant_or_touch_the_owner_role(owner):
    admin = MembershipFactory(organization=owner.organization, role=Role.ADMIN)
    UserFactory(username="newcomer")
    client = signed_in(admin)
    added = client.post("/team", {"user": "newcomer", "role": "owner"})
    assert added.status_code == 403
    assert "Only an owner can grant, change or remove the owner role." in added.content.decode()
    demoted = client.post(f"/team/{owner.public_id}/role", {"role": "member"}, follow=True)
    assert "Only an owner can grant" in demoted.content.decode()
    owner.refresh_from_db()
    assert owner.role == Role.OWNER
    assert not Membership.objects.filter(user__username="newcomer").exists()


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
