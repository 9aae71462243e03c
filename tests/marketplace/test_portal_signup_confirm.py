"""Sign-up answers the same whether or not the e-mail address has an account: the account is
created only through a link mailed to the address (/signup/confirm/<token>), which a GET
never uses up; an address with an account is mailed a notice and nothing is created."""

import threading
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import TestCase
from django.utils import timezone

from config.errors import ApplicationError
from marketplace.models import Membership, Organization, PendingSignup, Role
from marketplace.services.organizations import invitation_create, signup_confirm
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401
from tests.marketplace.signup_helpers import (
    CONFIRM_LINK,
    PASSWORD,
    confirm_path,
    signup_form,
    signup_post,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_rate_limits")]
User = get_user_model()


def _nothing_created():
    return (
        not User.objects.filter(username="grace").exists()
        and not Organization.objects.filter(name="Hopper Compute").exists()
    )


def test_the_answer_is_the_same_for_an_address_with_an_account_and_one_without(mailoutbox):
    UserFactory(username="ada", email="Ada@Example.com")

    taken = signup_post(HttpsClient(), **signup_form(email="ada@example.com"))
    new = signup_post(HttpsClient(), **signup_form(email="bob@example.com"))

    assert taken.status_code == new.status_code == 200
    body = taken.content.decode().replace("ada@example.com", "ADDRESS")
    assert body == new.content.decode().replace("bob@example.com", "ADDRESS")
    assert "We sent a link to <strong>ADDRESS</strong> to finish signing up" in body
    assert "valid for 24 hours" in body
    assert "An account with this e-mail address exists" not in body
    # Mail: a notice to the account's address (no link), the link to the new one.
    notice, link = mailoutbox
    assert notice.to == ["Ada@Example.com"] and link.to == ["bob@example.com"]
    assert notice.subject == "Someone tried to sign up to Switchyard with your address"
    assert 'already has the account "ada"' in notice.body
    assert "/password-reset" in notice.body and not CONFIRM_LINK.search(notice.body)
    assert link.subject == "Finish signing up to Switchyard"
    assert CONFIRM_LINK.search(link.body)
    # Nothing for the address with an account; no account for either yet.
    assert list(PendingSignup.objects.values_list("email", flat=True)) == ["bob@example.com"]
    assert not User.objects.filter(username="grace").exists()
    assert not Organization.objects.filter(name="Hopper Compute").exists()


def test_the_worker_builds_the_link_from_the_id_on_site_url(settings, monkeypatch, mailoutbox):
    """Only the pending sign-up's id goes through the broker: not the token, not the
    password's hash; the database keeps only the token's hash."""
    from config.celery import app as celery_app

    settings.SITE_URL = "https://example.com/switchyard/"
    settings.SIGNUP_CONFIRM_HOURS = 2
    task = celery_app.tasks["marketplace.tasks.signup_mail_send"]
    queued, send = [], task.apply_async

    def record(args=None, kwargs=None, **options):
        queued.append((list(args or []), kwargs or {}))
        return send(args, kwargs, **options)

    monkeypatch.setattr(task, "apply_async", record)

    response = signup_post(HttpsClient(), **signup_form())

    assert "valid for 2 hours" in response.content.decode()
    pending = PendingSignup.objects.get()
    assert queued == [([pending.pk], {})]
    (sent,) = mailoutbox
    assert "https://example.com/switchyard/signup/confirm/" in sent.body
    assert "works once, for 2 hours" in sent.body
    token = confirm_path(sent).rsplit("/", 1)[1]
    assert token not in pending.token_hash and len(pending.token_hash) == 64
    assert pending.password.startswith("md5$") and PASSWORD not in pending.password
    assert timedelta(hours=2) - (pending.expires_at - pending.created_at) < timedelta(seconds=5)


def test_the_mailed_link_creates_the_account_and_organisation_and_signs_in(mailoutbox):
    client = HttpsClient()
    signup_post(client, **signup_form())
    path = confirm_path(mailoutbox[0])

    page = client.get(path)
    assert page.status_code == 200
    html = page.content.decode()
    assert "Finish signing up" in html and "Create account" in html
    assert "grace@example.com" in html and "Hopper Compute" in html
    assert client.get(path).status_code == 200  # a scanner's second look: still nothing made
    assert _nothing_created()
    assert PendingSignup.objects.get().used_at is None

    response = client.post(path, {"username": "grace"})

    assert response.status_code == 302 and response["Location"] == "/dashboard"
    user = User.objects.get(username="grace")
    assert user.email == "grace@example.com" and user.check_password(PASSWORD)
    (membership,) = Membership.objects.filter(user=user)
    assert (membership.organization.name, membership.role) == ("Hopper Compute", Role.OWNER)
    dashboard = client.get("/dashboard")
    assert dashboard.status_code == 200 and "Hopper Compute" in dashboard.content.decode()
    pending = PendingSignup.objects.get()
    assert pending.used_at is not None and pending.password == ""


def test_a_link_sent_twice_creates_one_account_and_then_says_it_was_used(mailoutbox):
    client = HttpsClient()
    signup_post(client, **signup_form())
    path = confirm_path(mailoutbox[0])

    assert client.post(path, {"username": "grace"}).status_code == 302
    again = HttpsClient().post(path, {"username": "grace2"})

    assert again.status_code == 410
    assert "This sign-up link was already used: sign in." in again.content.decode()
    assert User.objects.filter(email="grace@example.com").count() == 1
    assert Organization.objects.filter(name="Hopper Compute").count() == 1
    assert HttpsClient().get(path).status_code == 410


@pytest.mark.parametrize(
    ("case", "status", "says"),
    [
        ("unknown", 404, "This sign-up link is not valid"),
        ("expired", 410, "This sign-up link has expired: sign up again."),
    ],
)
def test_an_unknown_or_expired_link_says_so_and_creates_nothing(case, status, says, mailoutbox):
    signup_post(HttpsClient(), **signup_form())
    path = confirm_path(mailoutbox[0])
    if case == "unknown":
        path = path[:-4] + ("0000" if not path.endswith("0000") else "1111")
    else:
        PendingSignup.objects.update(expires_at=timezone.now() - timedelta(seconds=1))

    for response in (HttpsClient().get(path), HttpsClient().post(path, {"username": "grace"})):
        assert response.status_code == status
        assert says in response.content.decode()
    assert _nothing_created()
    assert HttpsClient().get("/signup/confirm/not-a-token").status_code == 404


def test_a_user_name_taken_meanwhile_is_asked_for_again_on_the_link_page(mailoutbox):
    client = HttpsClient()
    signup_post(client, **signup_form())
    path = confirm_path(mailoutbox[0])
    UserFactory(username="Grace", email="other@example.com")  # any case counts

    taken = client.post(path, {"username": "grace"})

    assert taken.status_code == 400
    assert taken.context["form"].errors == {
        "username": ["A user with that username already exists: choose another."]
    }
    assert not User.objects.filter(email="grace@example.com").exists()
    assert PendingSignup.objects.get().used_at is None
    bad = client.post(path, {"username": "gr\u00e4ce"})  # the sign-up form's rules hold here
    assert bad.status_code == 400 and "username" in bad.context["form"].errors

    response = client.post(path, {"username": "grace.h"})

    assert response.status_code == 302
    assert User.objects.get(email="grace@example.com").username == "grace.h"


def test_an_address_that_got_an_account_meanwhile_gets_no_second_one(mailoutbox):
    signup_post(HttpsClient(), **signup_form())
    signup_post(HttpsClient(), **signup_form(username="grace2"))
    first, second = (confirm_path(m) for m in mailoutbox)

    assert HttpsClient().post(first, {"username": "grace"}).status_code == 302
    response = HttpsClient().post(second, {"username": "grace2"})

    assert response.status_code == 409
    assert "An account with this e-mail address exists now" in response.content.decode()
    assert list(User.objects.values_list("username", flat=True)) == ["grace"]


def test_invalid_form_input_mails_nothing_and_records_nothing(mailoutbox):
    response = signup_post(HttpsClient(), **signup_form(password2="another-passphrase-2"))
    assert response.status_code == 400
    assert "didn’t match" in response.content.decode()
    bad_name = signup_post(HttpsClient(), **signup_form(organization="Evil\u202eCorp"))
    assert bad_name.status_code == 400
    assert "control or formatting characters" in bad_name.content.decode()
    assert mailoutbox == [] and not PendingSignup.objects.exists()


def test_signing_up_through_an_open_invitation_creates_the_account_at_once(mailoutbox):
    owner = MembershipFactory(organization=OrganizationFactory(name="Ada Labs"), role=Role.OWNER)
    invitation, token = invitation_create(actor=owner, email="grace@example.com", role=Role.ADMIN)
    mailoutbox.clear()

    response = signup_post(HttpsClient(), f"/signup?next=/invitations/{token}", **signup_form())

    assert response.status_code == 302 and response["Location"] == "/dashboard"
    membership = Membership.objects.get(user__username="grace")
    assert (membership.organization, membership.role) == (owner.organization, Role.ADMIN)
    assert mailoutbox == [] and not PendingSignup.objects.exists()
    # Through an invitation the address is checked: the account is made at once.
    other, other_token = invitation_create(actor=owner, email="x@example.com", role=Role.MEMBER)
    taken = signup_post(
        HttpsClient(),
        f"/signup?next=/invitations/{other_token}",
        **signup_form(username="grace2"),
    )
    assert taken.status_code == 400
    assert "An account with this e-mail address exists" in taken.content.decode()


def test_sign_up_attempts_stay_limited_per_client(settings, mailoutbox):
    settings.PORTAL_SIGN_IN_RATE = "1/hour"  # five sign-ups an hour from one address
    for n in range(5):
        response = signup_post(
            HttpsClient(), **signup_form(username=f"u{n}", email=f"u{n}@example.com")
        )
        assert response.status_code == 200

    refused = signup_post(HttpsClient(), **signup_form(username="u5", email="u5@example.com"))

    assert refused.status_code == 429
    assert "Too many sign-up attempts" in refused.content.decode()
    assert PendingSignup.objects.count() == len(mailoutbox) == 5


@pytest.mark.parametrize("has_account", [False, True], ids=["new address", "has an account"])
def test_sign_up_mails_to_one_address_are_capped_whoever_asks(has_account, mailoutbox):
    """Requests from many clients cannot fill one inbox; the cap answers the same whether the
    address has an account or not."""
    if has_account:
        UserFactory(email="grace@example.com")
    for n in range(3):
        client = HttpsClient(REMOTE_ADDR=f"198.51.100.{n + 1}")
        assert signup_post(client, **signup_form(username=f"g{n}")).status_code == 200
    assert len(mailoutbox) == 3

    refused = signup_post(HttpsClient(REMOTE_ADDR="203.0.113.9"), **signup_form(username="g9"))

    assert refused.status_code == 429
    assert "Too many sign-up requests for this e-mail address" in refused.content.decode()
    assert len(mailoutbox) == 3
    # Another address is its own.
    other = signup_post(HttpsClient(), **signup_form(username="ada", email="ada@example.com"))
    assert other.status_code == 200 and len(mailoutbox) == 4


@pytest.mark.django_db(transaction=True)
def test_links_confirmed_at_once_make_one_account():
    """Two links for one address and the same link twice, sent at the same moment from four
    threads: the pending rows of the address are locked, so one account results."""
    from django.contrib.auth.hashers import make_password

    from marketplace.services.organizations import invitation_token_hash, signup_token

    tokens = []
    for n in range(2):
        pending = PendingSignup(
            email="grace@example.com", username=f"grace{n}", organization_name="Hopper Compute",
            password=make_password(PASSWORD), expires_at=timezone.now() + timedelta(hours=1),
        )  # fmt: skip
        tokens.append(signup_token(pending.public_id))
        pending.token_hash = invitation_token_hash(tokens[-1])
        pending.save()
    barrier = threading.Barrier(4)
    outcomes = []

    def confirm(token: str, username: str) -> None:
        try:
            barrier.wait()
            signup_confirm(token=token, username=username)
            outcomes.append("created")
        except ApplicationError as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=confirm, args=(tokens[n % 2], f"user{n}")) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(outcomes).count("created") == 1, outcomes
    assert set(outcomes) - {"created"} <= {"signup_used", "signup_email_taken"}
    assert User.objects.filter(email="grace@example.com").count() == 1
    assert Organization.objects.filter(name="Hopper Compute").count() == 1


def test_confirming_outside_a_request_is_one_transaction(mailoutbox):
    """A failure half-way (the organisation's name refused) leaves no account behind."""
    signup_post(HttpsClient(), **signup_form())
    token = confirm_path(mailoutbox[0]).rsplit("/", 1)[1]
    PendingSignup.objects.update(organization_name="   ")

    with pytest.raises(ApplicationError):
        with TestCase.captureOnCommitCallbacks(execute=True):
            signup_confirm(token=token, username="grace")

    assert not User.objects.filter(username="grace").exists()
    assert PendingSignup.objects.get().used_at is None
