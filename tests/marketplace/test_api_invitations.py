"""Invitations through the API: who may invite and revoke, the token shown once, replays."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from marketplace.models import IdempotencyRecord, Invitation, Membership, Role
from marketplace.services.organizations import invitation_create
from tests.factories import MembershipFactory, UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    key_client,
    org,
    owner,
    owner_client,
    session_client,
)

pytestmark = pytest.mark.django_db

INVITATIONS = "/api/v1/organization/invitations"


def test_an_owner_invites_lists_and_revokes(
    owner_client, owner, mailoutbox, settings, django_capture_on_commit_callbacks
):
    settings.SITE_URL = "https://sy.example"
    with django_capture_on_commit_callbacks(execute=True):
        response = owner_client.post(
            INVITATIONS, {"email": "Grace@Example.com", "role": "admin"}, format="json"
        )
    assert response.status_code == 201, response.content
    created = response.json()
    token = created.pop("token")
    assert created["id"].startswith("inv_")
    assert (created["email"], created["role"]) == ("grace@example.com", "admin")
    assert created["invited_by"] == owner.user.username
    assert created["accepted_at"] is None and created["revoked_at"] is None
    assert [m.to for m in mailoutbox] == [["grace@example.com"]]
    assert f"https://sy.example/invitations/{token}" in mailoutbox[0].body

    listed = owner_client.get(INVITATIONS).json()["results"]
    assert listed == [created]  # no token in the list

    revoked = owner_client.post(f"{INVITATIONS}/{created['id']}/revoke", {}, format="json")
    assert revoked.status_code == 200, revoked.content
    assert revoked.json()["revoked_at"] is not None
    assert "token" not in revoked.json()
    assert owner_client.get(INVITATIONS).json()["results"] == []


def test_an_admin_invites_but_not_as_owner(org, owner):
    client = session_client(MembershipFactory(organization=org, role=Role.ADMIN))
    refused = client.post(INVITATIONS, {"email": "x@example.com", "role": "owner"}, format="json")
    assert_error(refused, 403, "insufficient_role")
    assert Invitation.objects.count() == 0
    ok = client.post(INVITATIONS, {"email": "x@example.com", "role": "admin"}, format="json")
    assert ok.status_code == 201


@pytest.mark.parametrize("role", [Role.MEMBER, Role.BILLING])
def test_members_and_billing_neither_see_nor_send_invitations(org, owner, role):
    invitation_create(actor=owner, email="x@example.com", role=Role.MEMBER)
    invitation = Invitation.objects.get()
    client = session_client(MembershipFactory(organization=org, role=role))
    assert_error(client.get(INVITATIONS), 403, "insufficient_role")
    assert_error(
        client.post(INVITATIONS, {"email": "y@example.com"}, format="json"),
        403,
        "insufficient_role",
    )
    assert_error(
        client.post(f"{INVITATIONS}/{invitation.public_id}/revoke", {}, format="json"),
        403,
        "insufficient_role",
    )
    assert list(Invitation.objects.values_list("email", "revoked_at")) == [("x@example.com", None)]


def test_an_api_key_cannot_invite_anyone(org, owner):
    client = key_client(org)
    refused = client.post(INVITATIONS, {"email": "x@example.com"}, format="json")
    assert_error(refused, 403, "session_required")
    assert Invitation.objects.count() == 0


def test_duplicates_and_members_are_conflicts(owner_client, owner):
    body = {"email": "grace@example.com"}
    assert owner_client.post(INVITATIONS, body, format="json").status_code == 201
    assert_error(owner_client.post(INVITATIONS, body, format="json"), 409, "invitation_exists")
    assert_error(
        owner_client.post(INVITATIONS, {"email": owner.user.email}, format="json"),
        409,
        "already_member",
        "email",
    )
    assert Invitation.objects.count() == 1


def test_members_join_only_by_invitation_and_the_answer_never_tells_who_has_an_account(
    owner_client, owner
):
    UserFactory(email="bob@example.com")
    answers = []
    for address in ("bob@example.com", "nobody@example.com"):
        added = owner_client.post("/api/v1/organization/members", {"email": address}, format="json")
        assert_error(added, 405)
        invited = owner_client.post(INVITATIONS, {"email": address}, format="json")
        assert invited.status_code == 201, invited.content
        answers.append(invited.json())
    # The same answer but for the address, ids, times and token: nothing tells which address
    # has an account.
    varying = {"id", "email", "created_at", "expires_at", "token"}
    same = [{k: v for k, v in a.items() if k not in varying} for a in answers]
    assert set(answers[0]) == set(answers[1]) and same[0] == same[1]
    assert Membership.objects.filter(organization=owner.organization).count() == 1


def test_a_replay_with_the_same_idempotency_key_never_shows_the_token_again(
    owner_client, mailoutbox, django_capture_on_commit_callbacks
):
    body = {"email": "grace@example.com", "role": "member"}
    with django_capture_on_commit_callbacks(execute=True):
        first = owner_client.post(INVITATIONS, body, format="json", HTTP_IDEMPOTENCY_KEY="inv-1")
        replay = owner_client.post(INVITATIONS, body, format="json", HTTP_IDEMPOTENCY_KEY="inv-1")
    assert first.status_code == replay.status_code == 201
    token = first.json()["token"]
    assert token
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json() == {**first.json(), "token": None}
    assert token not in str(IdempotencyRecord.objects.get().response_body)
    assert Invitation.objects.count() == 1
    assert len(mailoutbox) == 1  # the replay sent nothing


def test_another_organisations_invitations_are_neither_listed_nor_revoked(owner_client, owner):
    other_owner = MembershipFactory(role=Role.OWNER)
    theirs, _ = invitation_create(actor=other_owner, email="x@example.com", role=Role.MEMBER)
    assert owner_client.get(INVITATIONS).json()["results"] == []
    response = owner_client.post(f"{INVITATIONS}/{theirs.public_id}/revoke", {}, format="json")
    assert_error(response, 404, "invitation_not_found")
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


def test_an_organisation_cannot_mail_an_address_again_and_again(owner_client, settings):
    settings.INVITATIONS_PER_ADDRESS_PER_DAY = 2
    for _ in range(2):
        sent = owner_client.post(INVITATIONS, {"email": "eve@example.com"}, format="json").json()
        owner_client.post(f"{INVITATIONS}/{sent['id']}/revoke")
    refused = owner_client.post(INVITATIONS, {"email": "eve@example.com"}, format="json")
    assert_error(refused, 409, "invitation_limit", "email")
    assert Invitation.objects.filter(email="eve@example.com").count() == 2
    # Another address is still fine, up to the organisation's daily cap.
    settings.INVITATIONS_PER_DAY = 3
    assert (
        owner_client.post(INVITATIONS, {"email": "bob@x.example"}, format="json").status_code == 201
    )
    over = owner_client.post(INVITATIONS, {"email": "carol@x.example"}, format="json")
    assert_error(over, 409, "invitation_limit")
