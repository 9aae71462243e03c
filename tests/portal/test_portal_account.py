"""Sign up, sign in, sign out, organisations: in the browser."""

import re

from playwright.sync_api import expect

from marketplace.models import Membership, Organization, Role


def test_sign_up_creates_the_user_and_their_organisation_through_the_mailed_link(
    portal, mailoutbox
):
    portal.goto(portal.base + "/")
    expect(portal).to_have_url(re.compile(r"/login$"))
    portal.get_by_role("link", name="Create an account").click()
    portal.get_by_label("Username").fill("grace")
    portal.get_by_label("Email").fill("grace@example.com")
    portal.get_by_label("Organisation name").fill("Hopper Compute")
    portal.get_by_label("Password", exact=True).fill("a-long-passphrase-1")
    portal.get_by_label("Password confirmation").fill("a-long-passphrase-1")
    portal.get_by_role("button", name="Create account").click()

    expect(portal.get_by_role("heading", level=1)).to_have_text("Check your e-mail")
    expect(portal.get_by_text("We sent a link to grace@example.com")).to_be_visible()
    assert not Organization.objects.filter(name="Hopper Compute").exists()
    (message,) = mailoutbox
    assert message.to == ["grace@example.com"]
    path = re.search(r"https?://[^/\s]+(/signup/confirm/\S+)", message.body).group(1)
    portal.goto(portal.base + path)
    expect(portal.get_by_role("heading", level=1)).to_have_text("Finish signing up")
    expect(portal.get_by_label("Username")).to_have_value("grace")
    assert not Organization.objects.filter(name="Hopper Compute").exists()  # a GET makes none
    portal.get_by_role("button", name="Create account").click()

    expect(portal).to_have_url(re.compile(r"/dashboard$"))
    expect(portal.get_by_role("heading", level=1)).to_have_text("Hopper Compute")
    membership = Membership.objects.get(user__username="grace")
    assert membership.role == Role.OWNER
    assert membership.organization.name == "Hopper Compute"

    portal.goto(portal.base + path)  # the link works once
    expect(portal.get_by_role("heading", level=1)).to_have_text("This sign-up link cannot be used")


def test_sign_up_with_an_address_that_has_an_account_answers_alike_and_mails_a_notice(
    portal, django_user_model, mailoutbox
):
    django_user_model.objects.create_user(username="ada", email="ada@example.com")
    portal.goto(portal.base + "/signup")
    portal.get_by_label("Username").fill("grace")
    portal.get_by_label("Email").fill("ada@example.com")
    portal.get_by_label("Organisation name").fill("Hopper Compute")
    portal.get_by_label("Password", exact=True).fill("a-long-passphrase-1")
    portal.get_by_label("Password confirmation").fill("a-long-passphrase-1")
    portal.get_by_role("button", name="Create account").click()

    expect(portal.get_by_role("heading", level=1)).to_have_text("Check your e-mail")
    expect(portal.get_by_text("We sent a link to ada@example.com")).to_be_visible()
    (message,) = mailoutbox
    assert message.to == ["ada@example.com"]
    assert "/signup/confirm/" not in message.body
    assert not django_user_model.objects.filter(username="grace").exists()


def test_sign_up_with_mismatched_passwords_writes_nothing(portal):
    portal.goto(portal.base + "/signup")
    portal.get_by_label("Username").fill("grace")
    portal.get_by_label("Email").fill("grace@example.com")
    portal.get_by_label("Organisation name").fill("Hopper Compute")
    portal.get_by_label("Password", exact=True).fill("a-long-passphrase-1")
    portal.get_by_label("Password confirmation").fill("another-passphrase-2")
    portal.get_by_role("button", name="Create account").click()

    expect(portal.get_by_text("The two password fields didn’t match.")).to_be_visible()
    assert not Organization.objects.filter(name="Hopper Compute").exists()


def test_sign_in_wrong_password_then_right_and_sign_out(portal, django_user_model):
    from marketplace.services.organizations import organization_create

    user = django_user_model.objects.create_user(username="ada", password="a-long-passphrase-1")
    organization_create(name="Ada Labs", owner=user)
    portal.goto(portal.base + "/dashboard")
    expect(portal).to_have_url(re.compile(r"/login\?next=/dashboard$"))
    portal.get_by_label("Username").fill("ada")
    portal.get_by_label("Password").fill("wrong-password")
    portal.get_by_role("button", name="Sign in").click()
    expect(portal.get_by_text("Please enter a correct username and password")).to_be_visible()

    portal.get_by_label("Password").fill("a-long-passphrase-1")
    portal.get_by_role("button", name="Sign in").click()
    expect(portal).to_have_url(re.compile(r"/dashboard$"))
    expect(portal.get_by_role("heading", level=1)).to_have_text("Ada Labs")

    portal.get_by_role("button", name="Sign out").click()
    expect(portal).to_have_url(re.compile(r"/login$"))
    portal.goto(portal.base + "/dashboard")
    expect(portal).to_have_url(re.compile(r"/login\?next=/dashboard$"))


def test_a_member_of_two_organisations_switches_between_them(signed_in):
    page, user, first = signed_in
    from marketplace.services.organizations import organization_create

    organization_create(name="Second Lab", owner=user)
    page.goto(page.base + "/dashboard")
    expect(page.get_by_role("heading", level=1)).to_have_text("Ada Labs")
    page.get_by_label("Act for").select_option(label="Second Lab (Owner)")
    page.get_by_role("button", name="Switch").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Second Lab")


def test_a_forgotten_password_is_reset_through_the_emailed_link_once(
    portal, django_user_model, mailoutbox, settings
):
    user = django_user_model.objects.create_user(
        username="ada", email="ada@example.com", password="the-old-passphrase-1"
    )
    portal.goto(portal.base + "/login")
    portal.get_by_role("link", name="Forgot your password?").click()
    portal.get_by_label("Email").fill("ADA@example.com")  # any case
    portal.get_by_role("button", name="Send the link").click()
    expect(portal.get_by_role("heading", level=1)).to_have_text("Check your e-mail")

    (message,) = mailoutbox
    assert message.to == ["ada@example.com"]
    assert message.subject == "Reset your Switchyard password"
    # A link on SITE_URL (never on the Host the request named); the browser reaches the live
    # server at its own address.
    path = re.search(r"https?://[^/\s]+(/password-reset/\S+)", message.body).group(1)
    assert f"{settings.SITE_URL.rstrip('/')}{path}" in message.body
    link = portal.base + path
    portal.goto(link)
    portal.get_by_label("New password", exact=True).fill("a-brand-new-passphrase-2")
    portal.get_by_label("New password confirmation").fill("a-brand-new-passphrase-2")
    portal.get_by_role("button", name="Set the password").click()
    expect(portal.get_by_role("status")).to_contain_text("Your new password is set")
    user.refresh_from_db()
    assert user.check_password("a-brand-new-passphrase-2")

    portal.goto(link)  # the link works once
    expect(portal.get_by_role("heading", level=1)).to_have_text("This link no longer works")


def test_an_unknown_address_gets_the_same_answer_and_no_email(portal, mailoutbox):
    portal.goto(portal.base + "/password-reset")
    portal.get_by_label("Email").fill("nobody@example.com")
    portal.get_by_role("button", name="Send the link").click()
    expect(portal.get_by_role("heading", level=1)).to_have_text("Check your e-mail")
    assert mailoutbox == []


def test_a_signed_in_user_changes_their_password(signed_in):
    page, user, _ = signed_in
    page.goto(page.base + "/dashboard")
    page.get_by_role("link", name="ada").click()
    page.get_by_label("Old password").fill("wrong")
    page.get_by_label("New password", exact=True).fill("another-passphrase-3")
    page.get_by_label("New password confirmation").fill("another-passphrase-3")
    page.get_by_role("button", name="Change password").click()
    expect(page.locator(".field.invalid")).to_contain_text("old password was entered incorrectly")
    user.refresh_from_db()
    assert user.check_password("a-long-passphrase-1")

    page.get_by_label("Old password").fill("a-long-passphrase-1")
    page.get_by_label("New password", exact=True).fill("another-passphrase-3")
    page.get_by_label("New password confirmation").fill("another-passphrase-3")
    page.get_by_role("button", name="Change password").click()
    expect(page.get_by_role("status")).to_contain_text("Your password has been changed")
    user.refresh_from_db()
    assert user.check_password("another-passphrase-3")


def test_sign_in_attempts_are_limited_per_account_and_address(portal, django_user_model, settings):
    settings.PORTAL_SIGN_IN_RATE = "3/hour"
    django_user_model.objects.create_user(username="ada", password="a-long-passphrase-1")
    portal.goto(portal.base + "/login")
    for _ in range(3):
        portal.get_by_label("Username").fill("ada")
        portal.get_by_label("Password").fill("wrong-password")
        portal.get_by_role("button", name="Sign in").click()
        expect(portal.get_by_text("Please enter a correct username and password")).to_be_visible()

    # The fourth attempt is refused before the password is checked, even the right one.
    portal.get_by_label("Username").fill("ADA")  # the same account, whatever the case
    portal.get_by_label("Password").fill("a-long-passphrase-1")
    portal.get_by_role("button", name="Sign in").click()
    expect(portal.get_by_text("Too many sign-in attempts. Try again in")).to_be_visible()
    expect(portal).to_have_url(re.compile(r"/login$"))
