"""The team page in the browser: change a role, remove; the services' rules. Members join by
invitation (test_portal_invitations.py)."""

import re

from playwright.sync_api import expect

from marketplace.models import Membership, Role
from marketplace.services.organizations import organization_create
from tests.clients import HttpsClient

LAST_OWNER = (
    "An organisation must keep at least one owner with an active account; make another member "
    "owner first."
)


def sign_in_as(page, live_server, user) -> None:
    client = HttpsClient()
    client.force_login(user)
    page.context.clear_cookies()
    page.context.add_cookies(
        [{"name": "sessionid", "value": client.cookies["sessionid"].value, "url": live_server.url}]
    )


def post_from_page(page, path: str, form: dict | None = None):
    """A form POST the page itself did not offer, with the page's CSRF token (and its Origin,
    which a browser sends and Django checks on HTTPS)."""
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    headers = {"X-CSRFToken": csrf, "Origin": page.base}
    return page.request.post(page.base + path, form=form or {}, headers=headers, max_redirects=0)


def test_an_owner_changes_a_members_role_and_removes_them(signed_in, django_user_model):
    page, _, organization = signed_in
    grace = django_user_model.objects.create_user(
        username="grace", email="grace@example.com", password="x-long-pass-1"
    )
    membership = Membership.objects.create(organization=organization, user=grace, role="billing")
    page.goto(page.base + "/team")
    # Nothing on the page adds an account directly: people join by accepting an invitation.
    expect(page.get_by_role("button", name="Add member")).to_have_count(0)
    expect(page.get_by_role("button", name="Send invitation")).to_be_visible()
    row = page.get_by_role("row").filter(has_text="grace@example.com")
    expect(row).to_contain_text(re.compile(r"\d{4}-\d{2}-\d{2}"))
    expect(page.get_by_label("Role for grace")).to_have_value("billing")

    page.get_by_label("Role for grace").select_option("admin")
    page.get_by_role("button", name="Change role of grace").click()
    expect(page.locator(".messages")).to_have_text("grace is now admin.")
    expect(page.get_by_label("Role for grace")).to_have_value("admin")
    membership.refresh_from_db()
    assert membership.role == Role.ADMIN

    page.get_by_role("link", name="Remove grace").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Remove grace?")
    assert Membership.objects.filter(pk=membership.pk).exists()  # asking is not removing
    page.get_by_role("button", name="Remove member").click()
    expect(page).to_have_url(re.compile(r"/team$"))
    expect(page.locator(".messages")).to_have_text("grace was removed.")
    expect(page.get_by_role("row").filter(has_text="grace@example.com")).to_have_count(0)
    assert not Membership.objects.filter(pk=membership.pk).exists()


def test_the_last_owner_is_neither_demoted_nor_removed_and_is_told_why(signed_in):
    page, user, organization = signed_in
    owner = Membership.objects.get(organization=organization, user=user)
    page.goto(page.base + "/team")
    page.get_by_label("Role for ada").select_option("admin")
    page.get_by_role("button", name="Change role of ada").click()

    expect(page.locator(".messages li.error")).to_have_text(LAST_OWNER)
    expect(page.get_by_label("Role for ada")).to_have_value("owner")
    owner.refresh_from_db()
    assert owner.role == Role.OWNER

    page.get_by_role("link", name="Leave…").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Leave Ada Labs?")
    page.get_by_role("button", name="Leave").click()
    expect(page).to_have_url(re.compile(r"/team$"))
    expect(page.locator(".messages li.error")).to_have_text(LAST_OWNER)
    owner.refresh_from_db()
    assert owner.role == Role.OWNER


def test_a_member_sees_the_team_read_only(signed_in, live_server, django_user_model):
    page, _, organization = signed_in
    bob = django_user_model.objects.create_user(username="bob", password="x-long-pass-1")
    Membership.objects.create(organization=organization, user=bob, role=Role.MEMBER)
    sign_in_as(page, live_server, bob)

    page.goto(page.base + "/team")
    expect(page.get_by_role("row").filter(has_text="ada")).to_contain_text("owner")
    expect(page.get_by_role("row").filter(has_text="bob (you)")).to_contain_text("member")
    expect(page.get_by_role("button", name="Send invitation")).to_have_count(0)
    expect(page.locator("select")).to_have_count(0)
    expect(page.get_by_role("link", name="Remove ada")).to_have_count(0)
    expect(page.get_by_text("Your role (member) can see the team")).to_be_visible()
    refused = post_from_page(
        page, "/team/invitations", {"invite-email": "bob@x.example", "invite-role": "owner"}
    )
    assert refused.status == 403
    assert "Your role (member) cannot do this" in refused.text()  # not a CSRF failure
    assert Membership.objects.get(user=bob).role == Role.MEMBER


def test_another_organisations_membership_cannot_be_changed_or_removed(
    signed_in, django_user_model
):
    page, user, organization = signed_in
    eve = django_user_model.objects.create_user(username="eve", password="x-long-pass-1")
    theirs = Membership.objects.get(organization=organization_create(name="Eve Corp", owner=eve))
    grace = django_user_model.objects.create_user(username="grace", password="x-long-pass-1")
    ours = Membership.objects.create(organization=organization, user=grace, role=Role.MEMBER)
    page.goto(page.base + "/team")
    assert "eve" not in page.locator("table").inner_text()

    assert post_from_page(page, f"/team/{theirs.public_id}/role", {"role": "member"}).status == 404
    assert post_from_page(page, f"/team/{theirs.public_id}/remove").status == 404
    theirs.refresh_from_db()
    assert theirs.role == Role.OWNER
    # The same requests for our own member work: the 404s above are isolation, not CSRF.
    assert post_from_page(page, f"/team/{ours.public_id}/role", {"role": "billing"}).status == 302
    ours.refresh_from_db()
    assert ours.role == Role.BILLING
    assert post_from_page(page, f"/team/{ours.public_id}/remove").status == 302
    assert not Membership.objects.filter(pk=ours.pk).exists()
