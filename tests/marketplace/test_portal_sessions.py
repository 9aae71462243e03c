"""Signed-in sessions from outside: no copy kept by a browser, an idle timeout and a lifetime,
new keys on signing in, every session ended by a password change or reset and by "Sign out
everywhere", and sign-in refusing forged forms and other sites' ?next=."""

import time

import pytest
from django.contrib.auth.tokens import default_token_generator
from django.contrib.messages import get_messages
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from marketplace.models import Role, UserSession
from marketplace.sessions import SEEN_AT, SIGNED_IN_AT, SessionStore
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, UserFactory
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401

pytestmark = pytest.mark.django_db
PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a new and longer passphrase 7"


@pytest.fixture
def member():
    return MembershipFactory(role=Role.OWNER)


def signed_in(user) -> HttpsClient:
    client = HttpsClient()
    client.force_login(user)
    return client


def no_store(response) -> bool:
    return "no-store" in {part.strip() for part in response.get("Cache-Control", "").split(",")}


def session_set(client, **values) -> None:
    session = client.session
    for name, value in values.items():
        session[name] = value
    session.save()


def said(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def sessions_of(user) -> set[str]:
    return set(UserSession.objects.filter(user=user).values_list("session_key", flat=True))


# --- no-store ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/dashboard", "/api-keys", "/webhooks", "/team", "/billing/", "/account/password"]
)
def test_every_signed_in_page_is_sent_no_store(member, path):
    response = signed_in(member.user).get(path)

    assert response.status_code == 200
    assert no_store(response)
    assert "private" in response["Cache-Control"]


def test_the_admin_is_no_store_for_staff_too():
    staff = UserFactory(username="staff1", is_staff=True, is_superuser=True)
    response = signed_in(staff).get("/admin/marketplace/organization/")

    assert response.status_code == 200
    assert no_store(response)


def test_a_signed_out_public_page_stays_cacheable(member):
    response = HttpsClient().get("/static/portal/portal.css")
    assert not no_store(response)


# --- idle timeout and lifetime ----------------------------------------------------------------


def test_a_session_idle_past_the_timeout_is_signed_out_and_told_why(member, settings):
    client = signed_in(member.user)
    idle = settings.SESSION_IDLE_TIMEOUT.total_seconds()
    session_set(client, **{SEEN_AT: time.time() - idle - 1})
    key = client.session.session_key

    response = client.get("/dashboard")

    assert response.status_code == 302
    assert response["Location"].startswith("/login?next=/dashboard")
    assert said(response) == [
        "You were signed out after 1 h 00 min without activity. Sign in again."
    ]
    assert not UserSession.objects.filter(session_key=key).exists()
    assert client.get("/billing/").status_code == 302  # still signed out


def test_a_page_within_the_idle_timeout_keeps_the_session_and_counts_as_activity(member, settings):
    client = signed_in(member.user)
    idle = settings.SESSION_IDLE_TIMEOUT.total_seconds()
    session_set(client, **{SEEN_AT: time.time() - idle + 30})

    assert client.get("/dashboard").status_code == 200

    assert time.time() - client.session[SEEN_AT] < 5


def test_the_live_figures_an_open_page_polls_for_are_not_activity(member, settings):
    client = signed_in(member.user)
    idle = settings.SESSION_IDLE_TIMEOUT.total_seconds()
    seen = time.time() - idle + 30
    session_set(client, **{SEEN_AT: seen})

    assert client.get("/reservations/live").status_code == 200

    assert client.session[SEEN_AT] == seen
    session_set(client, **{SEEN_AT: seen - 60})
    assert client.get("/reservations/live").status_code == 302  # the poll itself is timed out


def test_a_session_past_its_lifetime_is_signed_out_however_busy(member, settings):
    client = signed_in(member.user)
    lifetime = settings.SESSION_LIFETIME.total_seconds()
    session_set(client, **{SIGNED_IN_AT: time.time() - lifetime - 1, SEEN_AT: time.time()})

    response = client.get("/dashboard")

    assert response.status_code == 302
    assert said(response) == [
        "You were signed out: a session lasts at most 12 h 00 min. Sign in again."
    ]


def test_the_session_cookie_lasts_the_sessions_lifetime_not_two_weeks(member, settings):
    assert settings.SESSION_COOKIE_AGE == settings.SESSION_LIFETIME.total_seconds() == 12 * 3600
    response = HttpsClient().post(
        "/login", {"username": member.user.username, "password": PASSWORD}
    )

    assert response.status_code == 302
    assert response.cookies["sessionid"]["max-age"] == 12 * 3600


# --- signing in -------------------------------------------------------------------------------


def test_signing_in_gives_a_new_session_key_and_drops_the_one_before(member):
    planted = SessionStore()
    planted["portal_organization"] = "org_planted"
    planted.create()
    client = HttpsClient()
    client.cookies["sessionid"] = planted.session_key

    response = client.post("/login", {"username": member.user.username, "password": PASSWORD})

    assert response.status_code == 302
    assert response.cookies["sessionid"].value != planted.session_key
    assert not UserSession.objects.filter(session_key=planted.session_key).exists()
    assert sessions_of(member.user) == {response.cookies["sessionid"].value}


def test_a_sign_in_form_without_its_csrf_token_is_refused(member):
    client = HttpsClient(enforce_csrf_checks=True)
    client.get("/login")

    response = client.post("/login", {"username": member.user.username, "password": PASSWORD})

    assert response.status_code == 403
    assert sessions_of(member.user) == set()


@pytest.mark.parametrize(
    "next_url",
    [
        "https://evil.example/",
        "//evil.example/",
        "/\\evil.example/",
        "https:evil.example",
        "http://testserver/dashboard",  # this host, but not over https
    ],
)
def test_sign_in_never_sends_to_another_site(member, next_url):
    response = HttpsClient().post(
        "/login", {"username": member.user.username, "password": PASSWORD, "next": next_url}
    )

    assert response.status_code == 302
    assert response["Location"] == "/dashboard"


def test_sign_in_follows_a_next_on_this_site(member):
    response = HttpsClient().post(
        "/login", {"username": member.user.username, "password": PASSWORD, "next": "/team"}
    )
    assert response["Location"] == "/team"


# --- ending every session ---------------------------------------------------------------------


def test_a_password_change_signs_out_the_other_sessions_and_says_so(member):
    here, elsewhere = signed_in(member.user), signed_in(member.user)
    bystander = signed_in(UserFactory())

    response = here.post(
        "/account/password",
        {"old_password": PASSWORD, "new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD},
    )

    assert response.status_code == 302
    assert said(response) == [
        "Your password has been changed. The other session signed in to your account was "
        "signed out."
    ]
    assert here.get("/dashboard").status_code == 200
    assert elsewhere.get("/dashboard").status_code == 302
    assert sessions_of(member.user) == {here.session.session_key}
    assert bystander.get("/organizations/new").status_code == 200


def test_a_password_reset_signs_out_every_session_and_its_link_works_once(member):
    elsewhere = signed_in(member.user)
    uid = urlsafe_base64_encode(force_bytes(member.user.pk))
    link = f"/password-reset/{uid}/{default_token_generator.make_token(member.user)}"
    visitor = HttpsClient()
    form = visitor.get(link)
    assert form.status_code == 302  # to the form, the token kept in the visitor's session

    response = visitor.post(
        form["Location"], {"new_password1": NEW_PASSWORD, "new_password2": NEW_PASSWORD}
    )

    assert response.status_code == 302
    assert said(response) == [
        "Your new password is set. The session signed in to your account was signed out. "
        "Sign in with it."
    ]
    assert elsewhere.get("/dashboard").status_code == 302
    assert sessions_of(member.user) == set()
    # Used: the same link is refused, and the new password stands.
    again = HttpsClient().get(link, follow=True)
    assert again.context["validlink"] is False
    member.user.refresh_from_db()
    assert member.user.check_password(NEW_PASSWORD)


def test_a_password_reset_link_expires(member, settings):
    settings.PASSWORD_RESET_TIMEOUT = 3600
    generator = default_token_generator
    old = generator._make_token_with_timestamp(
        member.user, generator._num_seconds(generator._now()) - 3601, generator.secret
    )
    uid = urlsafe_base64_encode(force_bytes(member.user.pk))

    response = HttpsClient().get(f"/password-reset/{uid}/{old}", follow=True)

    assert response.context["validlink"] is False


def test_sign_out_everywhere_ends_every_session_of_the_account_only(member):
    here, elsewhere = signed_in(member.user), signed_in(member.user)
    other = UserFactory()
    bystander = signed_in(other)

    response = here.post("/account/sign-out-everywhere")

    assert response.status_code == 302
    assert response["Location"] == "/login"
    assert said(response) == [
        "You were signed out everywhere. All 2 sessions signed in to your account were signed out."
    ]
    assert sessions_of(member.user) == set()
    assert here.get("/dashboard").status_code == 302
    assert elsewhere.get("/dashboard").status_code == 302
    assert sessions_of(other) == {bystander.session.session_key}


def test_sign_out_everywhere_is_a_post_with_its_csrf_token(member):
    client = HttpsClient(enforce_csrf_checks=True)
    client.force_login(member.user)

    assert client.get("/account/sign-out-everywhere").status_code == 405
    assert client.post("/account/sign-out-everywhere").status_code == 403
    assert len(sessions_of(member.user)) == 1


# --- framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    # The last: the input guard's 400 page, answered before the rest of the middleware runs.
    ["/login", "/dashboard", "/admin/login/", "/api/v1/sites", "/nope", "/login?x=%00"],
)
def test_no_page_can_be_framed(member, path):
    response = signed_in(member.user).get(path)

    assert response["X-Frame-Options"] == "DENY"
