"""An account's e-mail address changes only once the new address confirms it (the account
page, /account/email), through a link that works once and expires."""

import re

import pytest
from django.contrib.auth import get_user_model
from django.core import signing

from marketplace.models import Role
from marketplace.services import accounts
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, UserFactory
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401

pytestmark = pytest.mark.django_db
PASSWORD = "correct horse battery staple"


@pytest.fixture
def member():
    return MembershipFactory(role=Role.OWNER, user__email="ada@example.com")


def signed_in(user) -> HttpsClient:
    client = HttpsClient()
    client.force_login(user)
    return client


def ask(client, capture, email: str, password: str = PASSWORD):
    with capture(execute=True):
        return client.post("/account/email", {"email-email": email, "email-password": password})


def link_in(message) -> str:
    return re.search(r"https?://[^/\s]+(/account/email/\S+)", message.body).group(1)


def email_of(user) -> str:
    return get_user_model().objects.get(pk=user.pk).email


def test_the_address_changes_only_once_the_new_one_confirms_it(
    member, settings, mailoutbox, django_capture_on_commit_callbacks
):
    settings.SITE_URL = "https://switchyard.example.com"
    client = signed_in(member.user)

    response = ask(client, django_capture_on_commit_callbacks, "ada@new.example")

    assert response.status_code == 302
    assert email_of(member.user) == "ada@example.com"
    confirm, notice = sorted(mailoutbox, key=lambda m: m.to != ["ada@new.example"])
    assert confirm.to == ["ada@new.example"]
    assert confirm.subject == "Switchyard: confirm your new e-mail address"
    assert "https://switchyard.example.com/account/email/" in confirm.body
    # Signed, not encrypted: the link names the current address by a digest only, so a
    # mistyped new address does not learn it.
    token = link_in(confirm).rsplit("/", 1)[1]
    assert "ada@example.com" not in confirm.body + str(signing.loads(token, salt=accounts._SALT))
    # The address it had is told, with where to change the password.
    assert notice.to == ["ada@example.com"]
    assert "ada@new.example" in notice.body
    assert "https://switchyard.example.com/account/password" in notice.body
    link = link_in(confirm)
    # Opening the link (as a mail scanner does) changes nothing.
    page = HttpsClient().get(link)
    assert page.status_code == 200 and "ada@new.example" in page.content.decode()
    assert email_of(member.user) == "ada@example.com"

    done = client.post(link)

    assert (done.status_code, done["Location"]) == (302, "/dashboard")
    assert email_of(member.user) == "ada@new.example"
    # It works once.
    again = HttpsClient().post(link)
    assert again.status_code == 410
    assert email_of(member.user) == "ada@new.example"


def test_a_change_needs_the_current_password(
    member, mailoutbox, django_capture_on_commit_callbacks
):
    response = ask(
        signed_in(member.user), django_capture_on_commit_callbacks, "x@new.example", "wrong"
    )

    assert response.status_code == 400
    assert "That is not your current password." in response.content.decode()
    assert mailoutbox == []
    assert email_of(member.user) == "ada@example.com"


def test_an_address_another_account_has_is_refused_at_confirmation_only(
    member, mailoutbox, django_capture_on_commit_callbacks
):
    UserFactory(username="bob", email="Bob@Example.com")
    # The request answers as for any address: it does not tell who has an account.
    assert (
        ask(
            signed_in(member.user), django_capture_on_commit_callbacks, "bob@example.com"
        ).status_code
        == 302
    )
    (confirm,) = [m for m in mailoutbox if m.to == ["bob@example.com"]]

    response = HttpsClient().post(link_in(confirm))

    assert response.status_code == 409
    assert "Another account uses this e-mail address" in response.content.decode()
    assert email_of(member.user) == "ada@example.com"


def test_an_expired_or_altered_link_is_refused(member, settings, monkeypatch):
    settings.SIGNUP_CONFIRM_HOURS = 24
    now = signing.time.time()
    monkeypatch.setattr(signing.time, "time", lambda: now - 24 * 3600 - 1)
    was = accounts._digest(member.user)
    old = signing.dumps(
        {"user": member.user.pk, "email": "x@new.example", "was": was}, salt=accounts._SALT
    )
    monkeypatch.undo()

    assert HttpsClient().post(f"/account/email/{old}").status_code == 410
    assert HttpsClient().post(f"/account/email/{old[:-2]}xx").status_code == 404
    assert email_of(member.user) == "ada@example.com"
