"""Organisation members (role rules, the last owner) and API key management through the API."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import threading

import pytest
from django.db import connection

from config.errors import ApplicationError
from marketplace.models import ApiKey, AuditEntry, Invitation, Membership, Organization, Role
from marketplace.services.organizations import invitation_accept, organization_create
from tests.clients import HttpsAPIClient
from tests.factories import MembershipFactory, UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    org,
    owner,
    owner_client,
    session_client,
)

pytestmark = pytest.mark.django_db

MEMBERS = "/api/v1/organization/members"


def member_url(membership) -> str:
    return f"{MEMBERS}/{membership.public_id}"


def test_organization_create_makes_the_creator_owner_with_a_unique_slug():
    user = UserFactory()
    first = organization_create(name="Acme AI", owner=user)
    second = organization_create(name="Acme AI", owner=user)
    assert first.slug == "acme-ai"
    assert second.slug.startswith("acme-ai-") and second.slug != first.slug
    assert first.public_id.startswith("org_")
    assert Membership.objects.get(organization=first).role == Role.OWNER


def test_an_owner_invites_lists_changes_and_removes_members(owner_client, org):
    newcomer = UserFactory(email="ada@example.com")
    invited = owner_client.post(
        "/api/v1/organization/invitations", {"email": "ADA@example.com"}, format="json"
    ).json()
    invitation_accept(token=invited["token"], user=newcomer)
    listed = owner_client.get(MEMBERS).json()["results"]
    created = listed[0]
    assert created["user"] == {"username": newcomer.username, "email": "ada@example.com"}
    assert created["role"] == "member"
    listed = owner_client.get(MEMBERS).json()["results"]
    assert [m["id"] for m in listed] == [created["id"], listed[1]["id"]]
    changed = owner_client.patch(f"{MEMBERS}/{created['id']}", {"role": "billing"}, format="json")
    assert changed.json()["role"] == "billing"
    assert owner_client.delete(f"{MEMBERS}/{created['id']}").status_code == 204
    assert not Membership.objects.filter(user=newcomer).exists()


def test_a_removed_members_api_keys_stop_working_with_their_access(owner_client, org):
    # Offboarding: a key made by someone who is gone must not keep acting for the organisation.
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    made = session_client(admin).post(
        "/api/v1/api-keys", {"name": "ci"}, format="json"
    ).json()  # fmt: skip
    kept = owner_client.post("/api/v1/api-keys", {"name": "owner's"}, format="json").json()
    leaver_key = HttpsAPIClient(HTTP_AUTHORIZATION=f"Bearer {made['secret']}")
    assert leaver_key.get("/api/v1/sites").status_code == 200

    assert owner_client.delete(member_url(admin)).status_code == 204

    assert_error(leaver_key.get("/api/v1/sites"), 401, "api_key_revoked")
    assert ApiKey.objects.get(public_id=made["id"]).revoked_at is not None
    assert ApiKey.objects.get(public_id=kept["id"]).revoked_at is None
    owners_key = HttpsAPIClient(HTTP_AUTHORIZATION=f"Bearer {kept['secret']}")
    assert owners_key.get("/api/v1/sites").status_code == 200


def test_a_demoted_maker_keeps_only_the_keys_and_invitations_their_role_could_make(
    owner_client, org, owner
):
    """A key or an invitation never outlives its maker's access: demoted from owner to admin,
    their billing keys and owner invitations go; from admin to member, all of them."""
    maker = MembershipFactory(organization=org, role=Role.OWNER)
    client = session_client(maker)
    plain = client.post("/api/v1/api-keys", {"name": "ci"}, format="json").json()
    billing = client.post(
        "/api/v1/api-keys", {"name": "pay", "scopes": ["read", "billing"]}, format="json"
    ).json()
    as_owner = client.post(
        "/api/v1/organization/invitations", {"email": "o@x.example", "role": "owner"},
        format="json",
    ).json()  # fmt: skip
    as_member = client.post(
        "/api/v1/organization/invitations", {"email": "m@x.example"}, format="json"
    ).json()

    def live():
        keys = set(ApiKey.objects.filter(revoked_at=None).values_list("public_id", flat=True))
        sent = set(Invitation.objects.filter(revoked_at=None).values_list("public_id", flat=True))
        return keys, sent

    owner_client.patch(member_url(maker), {"role": "admin"}, format="json")
    assert live() == ({plain["id"]}, {as_member["id"]})
    billing_key = HttpsAPIClient(HTTP_AUTHORIZATION=f"Bearer {billing['secret']}")
    assert_error(billing_key.get("/api/v1/billing/balance"), 401, "api_key_revoked")

    owner_client.patch(member_url(maker), {"role": "member"}, format="json")
    assert live() == (set(), set())
    assert AuditEntry.objects.filter(action="invitation.revoke", object_id=as_owner["id"]).exists()


def test_a_removed_members_open_invitations_are_revoked(owner_client, org):
    """A removed admin cannot come back through a link they sent before."""
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    sent = session_client(admin).post(
        "/api/v1/organization/invitations", {"email": "alt@x.example", "role": "admin"},
        format="json",
    ).json()  # fmt: skip
    assert owner_client.delete(member_url(admin)).status_code == 204
    with pytest.raises(ApplicationError):
        invitation_accept(token=sent["token"], user=UserFactory())
    assert Invitation.objects.get(public_id=sent["id"]).revoked_at is not None


def test_the_last_owner_can_be_neither_removed_nor_demoted(owner_client, owner):
    assert_error(owner_client.delete(member_url(owner)), 409, "last_owner")
    assert_error(
        owner_client.patch(member_url(owner), {"role": "admin"}, format="json"), 409, "last_owner"
    )
    owner.refresh_from_db()
    assert owner.role == Role.OWNER
    # With a second owner, the first may step down.
    MembershipFactory(organization=owner.organization, role=Role.OWNER)
    assert (
        owner_client.patch(member_url(owner), {"role": "admin"}, format="json").status_code == 200
    )


def test_an_admin_manages_members_but_not_owners(org, owner):
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    member = MembershipFactory(organization=org, role=Role.MEMBER)
    client = session_client(admin)
    assert client.patch(member_url(member), {"role": "billing"}, format="json").status_code == 200
    assert_error(
        client.patch(member_url(member), {"role": "owner"}, format="json"), 403, "insufficient_role"
    )
    assert_error(client.delete(member_url(owner)), 403, "insufficient_role")
    response = client.post(
        "/api/v1/organization/invitations", {"email": "new@x.example", "role": "owner"},
        format="json",
    )  # fmt: skip
    assert_error(response, 403, "insufficient_role")
    assert list(Membership.objects.filter(organization=org).values_list("role", flat=True).order_by("pk")) == [
        "owner", "admin", "billing"
    ]  # fmt: skip


@pytest.mark.parametrize("role", [Role.MEMBER, Role.BILLING])
def test_members_and_billing_cannot_manage_members_or_keys(org, owner, role):
    someone = MembershipFactory(organization=org, role=role)
    client = session_client(someone)
    assert client.get(MEMBERS).status_code == 200  # everyone sees who is in
    assert_error(
        client.patch(member_url(owner), {"role": "member"}, format="json"), 403, "insufficient_role"
    )
    assert_error(client.get("/api/v1/api-keys"), 403, "insufficient_role")
    assert_error(client.post("/api/v1/api-keys", {"name": "x"}, format="json"), 403)
    assert ApiKey.objects.count() == 0
    # Anyone may leave.
    assert client.delete(member_url(someone)).status_code == 204


def test_api_keys_are_created_listed_and_revoked(owner_client, org, owner):
    response = owner_client.post(
        "/api/v1/api-keys", {"name": "ci", "scopes": ["read"]}, format="json"
    )
    assert response.status_code == 201, response.content
    created = response.json()
    secret = created.pop("secret")
    assert secret.startswith(created["prefix"] + "_")
    assert created["scopes"] == ["read"]
    assert created["created_by"] == owner.user.username
    assert created["last_used_at"] is None and created["revoked_at"] is None

    listed = owner_client.get("/api/v1/api-keys").json()["results"]
    assert listed == [created]
    assert "secret" not in listed[0]

    revoked = owner_client.post(f"/api/v1/api-keys/{created['id']}/revoke", {}, format="json")
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    again = owner_client.post(f"/api/v1/api-keys/{created['id']}/revoke", {}, format="json")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert owner_client.get("/api/v1/api-keys?revoked=false").json()["results"] == []
    assert len(owner_client.get("/api/v1/api-keys?revoked=true").json()["results"]) == 1
    assert len(owner_client.get("/api/v1/api-keys?revoked=1").json()["results"]) == 1
    assert len(owner_client.get("/api/v1/api-keys?revoked=").json()["results"]) == 1  # no filter
    # A value that is neither: refused, not read as "no filter" (every key listed).
    assert_error(owner_client.get("/api/v1/api-keys?revoked=bogus"), 400, "invalid")


def test_organisations_are_separate_for_members_too(owner_client):
    other = MembershipFactory(role=Role.OWNER)
    assert_error(owner_client.delete(member_url(other)), 404, "member_not_found")
    assert Organization.objects.count() == 2
    assert Membership.objects.filter(pk=other.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_two_owners_demoting_each_other_at_once_leave_one_owner(org):
    """Real connections racing: the owner-row locks let exactly one demotion through."""
    first = MembershipFactory(organization=org, role=Role.OWNER)
    second = MembershipFactory(organization=org, role=Role.OWNER)
    clients = {"first": session_client(first), "second": session_client(second)}
    targets = {"first": second, "second": first}
    start = threading.Barrier(2)
    statuses = {}

    def demote(name):
        try:
            start.wait(timeout=10)
            response = clients[name].patch(
                member_url(targets[name]), {"role": "admin"}, format="json"
            )
            statuses[name] = response.status_code
        finally:
            connection.close()

    threads = [threading.Thread(target=demote, args=(n,)) for n in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(statuses.values()) in ([200, 403], [200, 409])
    assert Membership.objects.filter(organization=org, role=Role.OWNER).count() == 1


def test_members_and_keys_have_random_public_ids_and_the_old_ones_work_for_now(
    owner_client, org, owner
):
    other = MembershipFactory(organization=org, role=Role.MEMBER)
    created = owner_client.post("/api/v1/api-keys", {"name": "ci"}, format="json").json()
    key = ApiKey.objects.get(organization=org)

    listed = {m["id"] for m in owner_client.get(MEMBERS).json()["results"]}
    assert listed == {owner.public_id, other.public_id}
    for public_id, prefix, pk in (
        (other.public_id, "mem_", other.pk),
        (key.public_id, "key_", key.pk),
    ):
        # Opaque: a random body, nothing to do with the row's primary key.
        assert public_id.startswith(prefix) and len(public_id) == len(prefix) + 20
        assert public_id != f"{prefix}{pk}"
    assert created["id"] == key.public_id
    assert owner.public_id != other.public_id

    # Until the next release, the id a client kept from before (prefix and primary key).
    legacy = owner_client.patch(f"{MEMBERS}/mem_{other.pk}", {"role": "billing"}, format="json")
    assert legacy.status_code == 200 and legacy.json()["id"] == other.public_id
    revoked = owner_client.post(f"/api/v1/api-keys/key_{key.pk}/revoke")
    assert revoked.status_code == 200 and revoked.json()["id"] == key.public_id
    # Neither form reaches another organisation's rows.
    stranger = MembershipFactory(role=Role.MEMBER)
    for path in (f"{MEMBERS}/{stranger.public_id}", f"{MEMBERS}/mem_{stranger.pk}"):
        assert_error(owner_client.patch(path, {"role": "billing"}, format="json"), 404)
    stranger.refresh_from_db()
    assert stranger.role == Role.MEMBER


def test_a_removed_members_saved_ssh_keys_are_forgotten_and_a_demoted_ones_kept(owner_client, org):
    """The keys a member saved were offered, ticked, for every new booking after they were
    removed: their public key went onto the organisation's new machines."""
    from marketplace.models import SshKey
    from marketplace.services.ssh_keys import ssh_key_create
    from tests.provisioning_support import ssh_key

    leaver = MembershipFactory(organization=org, role=Role.ADMIN)
    demoted = MembershipFactory(organization=org, role=Role.ADMIN)
    gone = ssh_key_create(organization=org, user=leaver.user, name="laptop",
                          public_key=ssh_key(body=bytes(range(1, 33))))  # fmt: skip
    kept = ssh_key_create(organization=org, user=demoted.user, name="desk",
                          public_key=ssh_key(body=bytes(range(2, 34))))  # fmt: skip

    assert (
        owner_client.patch(member_url(demoted), {"role": "member"}, format="json").status_code
        == 200
    )
    assert owner_client.delete(member_url(leaver)).status_code == 204

    assert list(SshKey.objects.values_list("public_id", flat=True)) == [kept.public_id]
    audit = AuditEntry.objects.get(action="ssh_key.delete", object_id=gone.public_id)
    assert audit.changes == {
        "before": {"name": "laptop", "fingerprint": gone.fingerprint},
        "reason": "the member who saved it no longer belongs to the organisation",
    }
    listed = owner_client.get("/api/v1/ssh-keys").json()
    assert [k["id"] for k in listed["results"]] == [kept.public_id]
