"""Portal invitation pages through Django's test client: the edge cases, cheaply.

The browser tests (tests/portal/test_portal_invitations.py) drive the whole flow.
"""

import pytest

from marketplace.models import Invitation, Membership, Organization, Role
from marketplace.services.organizations import invitation_create
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, OrganizationFactory
from tests.marketplace.signup_helpers import confirm_path, signup_post

pytestmark = pytest.mark.django_db

SIGNUP = {
    "username": "grace",
    "email": "grace@example.com",
    "organization": "Hopper Compute",
    "password1": "a-long-passphrase-1",
    "password2": "a-long-passphrase-1",
}


def signed_in(membership) -> HttpsClient:
    client = HttpsClient()
    client.force_login(membership.user)
    return client


@pytest.fixture
def owner():
    return MembershipFactory(organization=OrganizationFactory(name="Ada Labs"), role=Role.OWNER)


def test_signup_with_a_next_that_is_no_invitation_is_an_ordinary_mailed_signup(mailoutbox):
    wanted = {"evil": "https://evil.example/steal", "local": "/reservations"}
    for who, url in wanted.items():
        form = {**SIGNUP, "username": who, "email": f"{who}@example.com"}
        response = signup_post(HttpsClient(), f"/signup?next={url}", **form)
        assert response.status_code == 200
        assert f"We sent a link to <strong>{who}@example.com</strong>" in response.content.decode()
    assert len(mailoutbox) == 2 and not Organization.objects.exists()
    # Once the account is made, a next on this site is followed; another site's is not.
    for message, location in zip(mailoutbox, ["/dashboard", "/reservations"], strict=True):
        username = message.to[0].split("@")[0]
        response = HttpsClient().post(confirm_path(message), {"username": username})
        assert response.status_code == 302 and response["Location"] == location
    assert set(Organization.objects.values_list("name", flat=True)) == {"Hopper Compute"}
    assert Membership.objects.filter(role=Role.OWNER).count() == 2  # their own, no invitation


def test_signup_through_a_closed_invitation_is_an_ordinary_signup(owner, mailoutbox):
    invitation, token = invitation_create(actor=owner, email="grace@example.com", role=Role.ADMIN)
    Invitation.objects.filter(pk=invitation.pk).update(revoked_at=invitation.created_at)
    page = HttpsClient().get(f"/signup?next=/invitations/{token}")
    assert "organization" in page.context["form"].fields
    mailoutbox.clear()
    response = signup_post(HttpsClient(), f"/signup?next=/invitations/{token}", **SIGNUP)
    assert response.status_code == 200  # mailed the link, as any sign-up
    assert not Membership.objects.filter(user__username="grace").exists()
    HttpsClient().post(confirm_path(mailoutbox[0]), {"username": "grace"})
    membership = Membership.objects.get(user__username="grace")
    assert membership.organization.name == "Hopper Compute"
    assert membership.role == Role.OWNER


def test_a_member_accepting_is_told_and_the_invitation_stays_open(owner):
    invitation, token = invitation_create(actor=owner, email="bob@example.com", role=Role.ADMIN)
    bob = MembershipFactory(organization=owner.organization, role=Role.MEMBER)
    response = signed_in(bob).post(f"/invitations/{token}")
    assert response.status_code == 409
    assert "This user is already a member of the organisation." in response.content.decode()
    bob.refresh_from_db()
    assert bob.role == Role.MEMBER
    invitation.refresh_from_db()
    assert invitation.accepted_at is None


def test_accepting_signed_out_changes_nothing(owner):
    invitation, token = invitation_create(actor=owner, email="bob@example.com", role=Role.MEMBER)
    response = HttpsClient().post(f"/invitations/{token}")
    assert response.status_code == 302 and response["Location"] == f"/invitations/{token}"
    invitation.refresh_from_db()
    assert invitation.accepted_at is None
    assert HttpsClient().post("/invitations/unknown").status_code == 404


def test_the_invite_form_refuses_bad_input_duplicates_and_non_managers(owner):
    client = signed_in(owner)
    bad = client.post("/team/invitations", {"invite-email": "nope", "invite-role": "member"})
    assert bad.status_code == 400
    assert bad.context["invite_form"].errors == {"email": ["Enter a valid email address."]}
    body = {"invite-email": "grace@example.com", "invite-role": "member"}
    assert client.post("/team/invitations", body).status_code == 302
    again = client.post("/team/invitations", body)
    assert again.status_code == 409
    assert "This address already has an open invitation" in again.content.decode()

    member = MembershipFactory(organization=owner.organization, role=Role.MEMBER)
    other = {"invite-email": "x@example.com", "invite-role": "member"}
    assert signed_in(member).post("/team/invitations", other).status_code == 403
    assert "grace@example.com" not in signed_in(member).get("/team").content.decode()
    invitation = Invitation.objects.get()
    revoke = signed_in(member).post(f"/team/invitations/{invitation.public_id}/revoke")
    assert revoke.status_code == 403
    assert list(Invitation.objects.values_list("email", "revoked_at")) == [
        ("grace@example.com", None)
    ]


def test_another_organisations_invitation_cannot_be_revoked_from_the_team_page(owner):
    theirs, _ = invitation_create(
        actor=MembershipFactory(role=Role.OWNER), email="x@example.com", role=Role.MEMBER
    )
    response = signed_in(owner).post(f"/team/invitations/{theirs.public_id}/revoke")
    assert response.status_code == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None


def test_an_invitation_to_an_address_with_control_characters_is_refused(owner, mailoutbox):
    """As at sign-up (rules.email_address_plain): such an address would split the To header."""
    client = signed_in(owner)
    body = {"invite-email": '"grace\x1cX-Injected:yes"@example.com', "invite-role": "member"}

    response = client.post("/team/invitations", body)

    assert response.status_code == 400
    assert "An e-mail address cannot hold control or formatting characters." in (
        response.content.decode()
    )
    assert not Invitation.objects.exists() and mailoutbox == []


def test_the_invite_form_says_what_each_role_may_do(owner):
    page = signed_in(owner).get("/team").content.decode()

    assert (
        "Owner: everything, the owner role included. Admin: everything else (team, API keys, "
        "webhooks, audit log, billing, reservations). Member: finds GPUs, reserves, extends and "
        "cancels, adds SSH keys; reads billing. Billing: cards, top-ups and billing settings; "
        "sees reservations but does not book."
    ) in page
