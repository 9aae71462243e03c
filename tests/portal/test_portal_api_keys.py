"""API keys in the browser: the secret shown once, used against the API, revoked, refused."""

import re

import requests
from playwright.sync_api import expect

from marketplace.models import ApiKey, Membership, Role
from marketplace.services.api_keys import api_key_create
from marketplace.services.organizations import organization_create
from tests.clients import HttpsClient

API = "/api/v1/gpu-models"


def call_api(live_server, secret: str) -> requests.Response:
    return requests.get(
        live_server.url + API, headers={"Authorization": f"Bearer {secret}"}, timeout=10
    )


def sign_in_as(page, live_server, user) -> None:
    client = HttpsClient()
    client.force_login(user)
    page.context.clear_cookies()
    page.context.add_cookies(
        [{"name": "sessionid", "value": client.cookies["sessionid"].value, "url": live_server.url}]
    )


def post_from_page(page, path: str):
    """A form POST the page itself did not offer, with the page's CSRF token (and its Origin,
    which a browser sends and Django checks on HTTPS)."""
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    headers = {"X-CSRFToken": csrf, "Origin": page.base}
    return page.request.post(page.base + path, headers=headers, max_redirects=0)


def create_key(page, name: str, *, write: bool = False) -> str:
    page.goto(page.base + "/api-keys")
    page.get_by_label("Name").fill(name)
    if write:
        page.get_by_label("Write").check()
    page.get_by_role("button", name="Create key").click()
    return page.locator("#new-key-secret").inner_text()


def test_a_new_key_is_shown_once_works_against_the_api_and_a_reload_creates_nothing(
    signed_in, live_server
):
    page, user, organization = signed_in
    secret = create_key(page, "CI runner", write=True)

    key = ApiKey.objects.get()
    assert (key.name, key.scopes, key.created_by, key.organization) == (
        "CI runner",
        ["read", "write"],
        user,
        organization,
    )
    assert re.fullmatch(re.escape(key.prefix) + r"_[A-Za-z0-9]{40}", secret)
    expect(page.get_by_text("Copy it now: it is shown only this once.")).to_be_visible()
    expect(page.locator("pre")).to_contain_text(f"Authorization: Bearer {secret}")

    response = call_api(live_server, secret)
    assert response.status_code == 200, response.text
    key.refresh_from_db()
    assert key.last_used_at is not None

    # A reload re-sends the form: no second key, and no secret on the page.
    page.reload()
    expect(page.get_by_text("This form was already sent")).to_be_visible()
    expect(page.locator("#new-key-secret")).to_have_count(0)
    assert secret not in page.content()
    assert ApiKey.objects.count() == 1

    page.goto(page.base + "/api-keys")
    row = page.get_by_role("row").filter(has_text="CI runner")
    expect(row).to_contain_text(key.prefix + "…")
    expect(row).to_contain_text("read, write")
    expect(row).to_contain_text("ada")
    expect(row).to_contain_text("active")
    assert secret not in page.content()


def test_revoking_asks_first_then_the_api_refuses_the_key_with_401(signed_in, live_server):
    page, _, _ = signed_in
    secret = create_key(page, "old laptop")
    assert call_api(live_server, secret).status_code == 200

    page.goto(page.base + "/api-keys")
    page.get_by_role("link", name="Revoke old laptop").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Revoke old laptop?")
    assert ApiKey.objects.get().revoked_at is None  # asking is not revoking
    page.get_by_role("button", name="Revoke key").click()

    expect(page).to_have_url(re.compile(r"/api-keys$"))
    expect(page.locator(".messages")).to_contain_text("is revoked; it no longer works.")
    expect(page.get_by_role("row").filter(has_text="old laptop")).to_contain_text("revoked")
    expect(page.get_by_role("link", name="Revoke old laptop")).to_have_count(0)
    assert ApiKey.objects.get().revoked_at is not None
    refused = call_api(live_server, secret)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "api_key_revoked"


def test_a_key_with_no_scope_is_refused_and_nothing_is_written(signed_in):
    page, _, _ = signed_in
    page.goto(page.base + "/api-keys")
    page.get_by_label("Name").fill("scopeless")
    page.get_by_label("Read").uncheck()
    page.get_by_role("button", name="Create key").click()

    expect(page.get_by_text("Choose at least one scope.")).to_be_visible()
    expect(page.locator("#new-key-secret")).to_have_count(0)
    expect(page.get_by_label("Name")).to_have_value("scopeless")
    assert not ApiKey.objects.exists()


def test_a_member_can_neither_see_nor_create_keys(signed_in, live_server, django_user_model):
    page, owner, organization = signed_in
    existing, _ = api_key_create(
        organization=organization, name="prod", scopes=["read"], created_by=owner
    )
    member = django_user_model.objects.create_user(username="bob", password="x-long-pass-1")
    Membership.objects.create(organization=organization, user=member, role=Role.MEMBER)
    sign_in_as(page, live_server, member)

    response = page.goto(page.base + "/api-keys")
    assert response.status == 403
    expect(page.get_by_role("heading", level=1)).to_have_text("Not allowed")
    expect(page.get_by_text("Your role (member) cannot do this")).to_be_visible()
    expect(page.get_by_role("button", name="Create key")).to_have_count(0)
    assert existing.prefix not in page.content()

    page.goto(page.base + "/dashboard")  # a page that sets the CSRF cookie for this member
    refused = post_from_page(page, f"/api-keys/{existing.public_id}/revoke")
    assert refused.status == 403
    assert "Your role (member) cannot do this" in refused.text()  # not a CSRF failure
    existing.refresh_from_db()
    assert existing.revoked_at is None
    assert ApiKey.objects.count() == 1


def test_another_organisations_key_cannot_be_revoked(signed_in, django_user_model):
    page, _, organization = signed_in
    stranger = django_user_model.objects.create_user(username="eve", password="x-long-pass-1")
    theirs, _ = api_key_create(
        organization=organization_create(name="Eve Corp", owner=stranger),
        name="theirs",
        scopes=["read"],
        created_by=stranger,
    )
    ours, _ = api_key_create(
        organization=organization, name="ours", scopes=["read"], created_by=None
    )
    page.goto(page.base + "/api-keys")
    expect(page.get_by_role("row").filter(has_text="ours")).to_have_count(1)
    assert theirs.prefix not in page.content()

    assert post_from_page(page, f"/api-keys/{theirs.public_id}/revoke").status == 404
    assert page.goto(page.base + f"/api-keys/{theirs.public_id}/revoke").status == 404
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    # The same request for our own key does revoke it: the 404 above is isolation, not CSRF.
    assert post_from_page(page, f"/api-keys/{ours.public_id}/revoke").status == 302
    ours.refresh_from_db()
    assert ours.revoked_at is not None
