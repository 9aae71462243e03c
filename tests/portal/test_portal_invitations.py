"""Invitations by e-mail in the browser: send from the team page, accept through the link."""

import re
from datetime import timedelta

from django.utils import timezone
from playwright.sync_api import expect

from marketplace.models import Invitation, Membership, Organization, Role
from marketplace.services.organizations import invitation_create, organization_create

PASSWORD = "a-long-passphrase-1"


def test_an_owner_invites_and_the_invitee_signs_up_through_the_link_into_that_organisation(
    signed_in, live_server, settings, mailoutbox
):
    settings.SITE_URL = live_server.url
    page, ada, organization = signed_in
    page.goto(page.base + "/team")
    expect(page.get_by_text("No open invitations.")).to_be_visible()
    page.get_by_label("E-mail address").fill("Grace@Example.com")
    page.get_by_label("Invite as").select_option("admin")
    page.get_by_role("button", name="Send invitation").click()

    expect(page.locator(".messages")).to_have_text(
        "Invitation sent to grace@example.com (as admin)."
    )
    row = page.get_by_role("row").filter(has_text="grace@example.com")
    expect(row).to_contain_text("admin")
    expect(row).to_contain_text("ada")
    (message,) = mailoutbox
    assert message.to == ["grace@example.com"]
    link = re.search(r"https?://\S+/invitations/\S+", message.body).group(0)
    assert link.startswith(live_server.url)

    page.context.clear_cookies()  # the invitee is somebody else, signed out
    page.goto(link)
    expect(page.get_by_role("heading", level=1)).to_have_text("Join Ada Labs")
    expect(
        page.get_by_text("ada invited you to join Ada Labs on Switchyard as admin.")
    ).to_be_visible()
    page.get_by_role("link", name="create an account to accept").click()
    expect(page).to_have_url(re.compile(r"/signup\?next=/invitations/[\w-]+$"))
    expect(page.get_by_text("You will join Ada Labs as admin, invited by ada.")).to_be_visible()
    expect(page.get_by_label("Organisation name")).to_have_count(0)
    expect(page.get_by_label("Email")).to_have_value("grace@example.com")
    page.get_by_label("Username").fill("grace")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Password confirmation").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()

    # As any sign-up (the page says nothing of whether the address has an account): the
    # account is made through the link mailed to the address.
    expect(page.get_by_role("heading", level=1)).to_have_text("Check your e-mail")
    assert not Membership.objects.filter(user__username="grace").exists()
    signup_mail = mailoutbox[-1]
    assert signup_mail.to == ["grace@example.com"]
    assert 'to join the organisation "Ada Labs" as admin' in signup_mail.body
    page.goto(re.search(r"https?://\S+/signup/confirm/\S+", signup_mail.body).group(0))
    expect(page.get_by_text("you will join Ada Labs as admin.")).to_be_visible()
    page.get_by_role("button", name="Create account").click()

    expect(page).to_have_url(re.compile(r"/dashboard$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Ada Labs")
    expect(page.locator(".messages")).to_have_text("Welcome to Switchyard. You joined Ada Labs.")
    (membership,) = Membership.objects.filter(user__username="grace")
    assert (membership.organization, membership.role) == (organization, Role.ADMIN)
    assert list(Organization.objects.all()) == [organization]  # no organisation of her own
    invitation = Invitation.objects.get()
    assert invitation.accepted_at is not None
    assert invitation.accepted_by == membership.user

    page.goto(link)  # the link works once
    expect(page.get_by_role("alert")).to_have_text("This invitation has already been used.")


def test_an_existing_user_signs_in_through_the_link_and_accepts(portal, django_user_model):
    ada = django_user_model.objects.create_user(username="ada", password=PASSWORD)
    organization = organization_create(name="Ada Labs", owner=ada)
    _, token = invitation_create(
        actor=Membership.objects.get(user=ada), email="bob@work.example", role=Role.MEMBER
    )
    # Bob's account has another address and an organisation of his own: the link is the proof.
    bob = django_user_model.objects.create_user(
        username="bob", email="bob@home.example", password=PASSWORD
    )
    organization_create(name="Bob Co", owner=bob)

    portal.goto(f"{portal.base}/invitations/{token}")
    portal.get_by_role("link", name="Sign in to accept").click()
    expect(portal).to_have_url(re.compile(rf"/login\?next=/invitations/{token}$"))
    portal.get_by_label("Username").fill("bob")
    portal.get_by_label("Password").fill(PASSWORD)
    portal.get_by_role("button", name="Sign in").click()

    expect(portal).to_have_url(re.compile(rf"/invitations/{token}$"))
    expect(portal.get_by_text("You are signed in as bob")).to_be_visible()
    assert not Membership.objects.filter(user=bob, organization=organization).exists()
    portal.get_by_role("button", name="Join Ada Labs").click()

    expect(portal).to_have_url(re.compile(r"/dashboard$"))
    expect(portal.locator(".messages")).to_have_text("You joined Ada Labs as member.")
    # The session now acts for the organisation just joined, not Bob Co.
    expect(portal.get_by_role("heading", level=1)).to_have_text("Ada Labs")
    assert Membership.objects.get(user=bob, organization=organization).role == Role.MEMBER


def test_a_revoked_link_says_so_and_lets_nobody_in(signed_in, live_server, django_user_model):
    page, ada, organization = signed_in
    invitation, token = invitation_create(
        actor=Membership.objects.get(user=ada), email="eve@example.com", role=Role.ADMIN
    )
    page.goto(page.base + "/team")
    page.get_by_role("button", name="Revoke the invitation to eve@example.com").click()
    expect(page.locator(".messages")).to_have_text("The invitation to eve@example.com was revoked.")
    expect(page.get_by_text("No open invitations.")).to_be_visible()
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None

    page.context.clear_cookies()
    response = page.goto(f"{page.base}/invitations/{token}")
    assert response.status == 409
    expect(page.get_by_role("heading", level=1)).to_have_text("This invitation cannot be accepted")
    expect(page.get_by_role("alert")).to_have_text("This invitation was revoked.")
    expect(page.get_by_role("link", name="Sign in to accept")).to_have_count(0)
    assert Membership.objects.filter(organization=organization).count() == 1


def test_an_expired_link_says_so_and_an_unknown_one_is_not_found(portal, django_user_model):
    ada = django_user_model.objects.create_user(username="ada", password=PASSWORD)
    organization_create(name="Ada Labs", owner=ada)
    invitation, token = invitation_create(
        actor=Membership.objects.get(user=ada), email="eve@example.com", role=Role.MEMBER
    )
    Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now() - timedelta(1))

    response = portal.goto(f"{portal.base}/invitations/{token}")
    assert response.status == 409
    expect(portal.get_by_role("alert")).to_have_text(
        "This invitation has expired; ask for a new one."
    )
    assert portal.goto(f"{portal.base}/invitations/not-a-token").status == 404
