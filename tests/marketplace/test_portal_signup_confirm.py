"""Sign-up answers the same whether or not the e-mail address has an account: the account is
created only through a link mailed to the address (/signup/confirm/<token>), which a GET
never uses up; an address with an account is mailed a notice and nothing is created."""

import threading
from datetime import timedelta
from urllib.parse import quote

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import TestCase
from django.utils import timezone
from django.utils.html import escape

from config.errors import ApplicationError
from marketplace.models import Invitation, Membership, Organization, PendingSignup, Role
from marketplace.services.organizations import (
    invitation_create,
    organization_suspend,
    organization_unsuspend,
    signup_confirm,
    signup_request,
)
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
    """Only the pending sign-up's id goes into the mail outbox (the broker carries the outbox
    row's id): not the token, not the password's hash; the database keeps only the token's
    hash."""
    from config.celery import app as celery_app
    from marketplace.models import MailMessage

    settings.SITE_URL = "https://example.com/switchyard/"
    settings.SIGNUP_CONFIRM_HOURS = 2
    task = celery_app.tasks["marketplace.mail.mail_outbox_send"]
    queued, send = [], task.apply_async

    def record(args=None, kwargs=None, **options):
        queued.append((list(args or []), kwargs or {}))
        return send(args, kwargs, **options)

    monkeypatch.setattr(task, "apply_async", record)

    response = signup_post(HttpsClient(), **signup_form())

    assert "valid for 2 hours" in response.content.decode()
    pending = PendingSignup.objects.get()
    message = MailMessage.objects.get()
    assert queued == [([message.pk], {})]
    assert (message.task, message.args) == ("marketplace.tasks.signup_mail_send", [pending.pk])
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


def test_the_sign_up_form_states_the_user_name_rule_it_keeps(mailoutbox):
    # Django's help said "Letters, digits and @/./+/-/_", which reads as any script's letters;
    # "grаce" (a Cyrillic "а") is refused, so the help says a-z, as the link page does.
    page = HttpsClient().get("/signup").content.decode()
    assert "Letters a-z, digits and @ . + - _ only (150 at most)." in page
    assert "Letters, digits and @/./+/-/_" not in page
    refused = signup_post(HttpsClient(), **signup_form(username="gr\u0430ce"))
    assert refused.status_code == 400
    assert "Use only letters a-z, digits and @ . + - _ in a user name." in refused.content.decode()
    assert mailoutbox == [] and not PendingSignup.objects.exists()


def _invitation(email="grace@example.com", role=Role.ADMIN):
    owner = MembershipFactory(organization=OrganizationFactory(name="Ada Labs"), role=Role.OWNER)
    invitation, token = invitation_create(actor=owner, email=email, role=role)
    return owner, invitation, token


def test_signing_up_through_an_invitation_says_nothing_of_the_address(mailoutbox):
    """The invitation's token proves nothing of the address typed (and its inviter has it
    too, from the API): the page answers as an ordinary sign-up does, with an account or
    without, and the account is made through the link mailed to the address."""
    owner, invitation, token = _invitation()
    UserFactory(username="ada", email="Ada@Example.com")
    mailoutbox.clear()
    path = f"/signup?next=/invitations/{token}"
    form = signup_form()
    del form["organization"]  # the page has no such field: they join the inviting one

    taken = signup_post(HttpsClient(), path, **{**form, "email": "ada@example.com"})
    new = signup_post(HttpsClient(), path, **form)

    assert taken.status_code == new.status_code == 200
    body = taken.content.decode().replace("ada@example.com", "ADDRESS")
    assert body == new.content.decode().replace("grace@example.com", "ADDRESS")
    assert "We sent a link to <strong>ADDRESS</strong> to finish signing up" in body
    assert "An account with this e-mail address exists" not in body
    notice, link = mailoutbox
    assert notice.to == ["Ada@Example.com"] and not CONFIRM_LINK.search(notice.body)
    assert 'already has the account "ada"' in notice.body
    assert "sign in there to accept it" in notice.body
    assert link.to == ["grace@example.com"]
    assert 'as "grace", to join the organisation "Ada Labs" as admin.' in link.body
    assert list(PendingSignup.objects.values_list("email", "invitation", "next_url")) == [
        ("grace@example.com", invitation.pk, "")  # the invitation's token is not kept
    ]
    assert not User.objects.filter(username="grace").exists()
    invitation.refresh_from_db()
    assert invitation.accepted_at is None

    client = HttpsClient()
    page = client.get(confirm_path(link))
    assert "you will join <strong>Ada Labs</strong> as <strong>admin</strong>" in (
        page.content.decode()
    )
    response = client.post(confirm_path(link), {"username": "grace"})

    assert response.status_code == 302 and response["Location"] == "/dashboard"
    membership = Membership.objects.get(user__username="grace")
    assert (membership.organization, membership.role) == (owner.organization, Role.ADMIN)
    assert list(Organization.objects.all()) == [owner.organization]  # none of her own
    invitation.refresh_from_db()
    assert invitation.accepted_by == membership.user
    dashboard = client.get("/dashboard", follow=True).content.decode()
    assert "You joined Ada Labs." in dashboard


def test_an_existing_user_told_by_mail_accepts_the_invitation_after_signing_in(mailoutbox):
    owner, invitation, token = _invitation(email="ada@example.com", role=Role.MEMBER)
    ada = UserFactory(username="ada", email="ada@example.com")
    form = {**signup_form(username="ada2", email="ada@example.com")}
    del form["organization"]

    signup_post(HttpsClient(), f"/signup?next=/invitations/{token}", **form)

    assert mailoutbox[-1].subject == "Someone tried to sign up to Switchyard with your address"
    assert not PendingSignup.objects.exists() and not User.objects.filter(username="ada2")
    client = HttpsClient()
    client.force_login(ada)  # as the notice says: sign in, and open the invitation's link
    response = client.post(f"/invitations/{token}")
    assert response.status_code == 302
    assert Membership.objects.get(user=ada).organization == owner.organization


def test_an_invitation_closed_before_the_link_is_confirmed_leaves_the_account_alone(
    mailoutbox,
):
    owner, invitation, token = _invitation()
    form = signup_form()
    del form["organization"]
    signup_post(HttpsClient(), f"/signup?next=/invitations/{token}", **form)
    Invitation.objects.filter(pk=invitation.pk).update(revoked_at=timezone.now())
    client = HttpsClient()

    response = client.post(confirm_path(mailoutbox[-1]), {"username": "grace"})

    assert response.status_code == 302 and response["Location"] == "/organizations/new"
    grace = User.objects.get(username="grace")
    assert not Membership.objects.filter(user=grace).exists()
    assert list(Organization.objects.all()) == [owner.organization]
    invitation.refresh_from_db()
    assert invitation.accepted_at is None
    page = client.get("/organizations/new").content.decode()
    assert "The invitation cannot be accepted now (revoked, used or expired" in page


def test_an_invitation_to_an_organisation_suspended_meanwhile_waits_for_the_lift(mailoutbox):
    owner, invitation, token = _invitation()
    form = signup_form()
    del form["organization"]
    signup_post(HttpsClient(), f"/signup?next=/invitations/{token}", **form)
    link = confirm_path(mailoutbox[-1])
    organization = owner.organization
    organization_suspend(organization=organization, reason="Unpaid.", actor_label="staff:ops")
    client = HttpsClient()

    response = client.post(link, {"username": "grace"})

    assert response.status_code == 302 and response["Location"] == "/organizations/new"
    grace = User.objects.get(username="grace")  # the account stands, in no organisation
    assert not Membership.objects.filter(user=grace).exists()
    invitation.refresh_from_db()
    assert (invitation.accepted_at, invitation.revoked_at) == (None, None)
    page = client.get("/organizations/new").content.decode()
    assert "or its organisation is suspended): open its link again later" in page
    organization_unsuspend(organization=organization, actor_label="staff:ops")
    assert client.post(f"/invitations/{token}").status_code == 302
    assert Membership.objects.get(user=grace).organization == organization


def test_next_given_to_the_sign_up_page_is_followed_once_the_account_is_made(mailoutbox):
    wanted = "/reservations?tier=reserved"
    client = HttpsClient()
    page = client.get(f"/signup?next={quote(wanted)}").content.decode()
    assert f'name="next" value="{escape(wanted)}"' in page
    signup_post(client, f"/signup?next={quote(wanted)}", **signup_form())
    assert PendingSignup.objects.get().next_url == wanted

    response = client.post(confirm_path(mailoutbox[0]), {"username": "grace"})

    assert response.status_code == 302 and response["Location"] == wanted
    assert User.objects.filter(username="grace").exists()


def test_next_sent_with_the_form_is_kept_too(mailoutbox):
    signup_post(HttpsClient(), "/signup", **signup_form(next="/reservations"))
    response = HttpsClient().post(confirm_path(mailoutbox[0]), {"username": "grace"})
    assert response["Location"] == "/reservations"


@pytest.mark.parametrize(
    "wanted",
    [
        "//evil.example/steal",
        "https://evil.example/steal",
        "/\\evil.example/steal",
        "javascript:alert(1)",
        "http://testserver:80/reservations",  # this host (as the test client names it), not https
        "/" + "x" * 2000,
    ],
    ids=["scheme-relative", "other host", "backslashes", "javascript", "downgrade", "too long"],
)
def test_a_next_off_this_site_is_ignored(wanted, mailoutbox):
    client = HttpsClient()
    page = client.get(f"/signup?next={quote(wanted)}").content.decode()
    assert 'name="next"' not in page

    response = signup_post(client, f"/signup?next={quote(wanted)}", **signup_form())

    assert response.status_code == 200
    assert PendingSignup.objects.get().next_url == ""
    confirmed = client.post(confirm_path(mailoutbox[0]), {"username": "grace"})
    assert confirmed.status_code == 302 and confirmed["Location"] == "/dashboard"


def test_a_stored_next_is_checked_again_when_followed(mailoutbox):
    signup_post(HttpsClient(), "/signup?next=/reservations", **signup_form())
    PendingSignup.objects.update(next_url="//evil.example/steal")

    response = HttpsClient().post(confirm_path(mailoutbox[0]), {"username": "grace"})

    assert response.status_code == 302 and response["Location"] == "/dashboard"


@pytest.mark.parametrize(
    "email",
    [
        '"grace\x1cX-Injected:yes"@example.com',
        '"grace\x1c\x1c<b>hi</b>"@example.com',
        '"grace\x01"@example.com',
    ],
    ids=["file-separator header", "blank line", "control"],
)
def test_an_address_with_control_characters_is_refused_and_nothing_mailed(email, mailoutbox):
    """Django's address validator lets a quoted local part hold control characters, some of
    which Python's e-mail package takes for line breaks: in the To header they would split
    it. Refused with the form's other errors, whichever sign-up it is."""
    _, _, token = _invitation(email="x@example.com")
    mailoutbox.clear()
    invited = signup_form(email=email)
    del invited["organization"]

    attempts = [
        ("/signup", signup_form(email=email)),
        (f"/signup?next=/invitations/{token}", invited),
    ]

    for path, form in attempts:
        response = signup_post(HttpsClient(), path, **form)
        assert response.status_code == 400
        assert response.context["form"].errors == {
            "email": ["An e-mail address cannot hold control or formatting characters."]
        }
    assert mailoutbox == [] and not PendingSignup.objects.exists()
    with pytest.raises(ApplicationError) as refused:
        signup_request(
            email=email, username="grace", organization_name="Hopper Compute", password=PASSWORD
        )
    assert (refused.value.code, refused.value.field) == ("invalid_characters", "email")
    assert not PendingSignup.objects.exists()


def test_the_services_refuse_such_an_address_whoever_calls_them(mailoutbox):
    owner, _, _ = _invitation(email="x@example.com")
    for email in ("grace@example\u2028.com", '"grace\x1d"@example.com'):
        with pytest.raises(ApplicationError) as refused:
            with TestCase.captureOnCommitCallbacks(execute=True):
                signup_request(
                    email=email, username="grace", organization_name="Hopper", password=PASSWORD
                )
        assert refused.value.code == "invalid_characters"
        with pytest.raises(ApplicationError) as refused:
            invitation_create(actor=owner, email=email, role=Role.MEMBER)
        assert (refused.value.code, refused.value.field) == ("invalid_characters", "email")
    assert not PendingSignup.objects.exists() and Invitation.objects.count() == 1


def test_what_was_typed_reaches_only_the_plain_text_body_of_the_mail(mailoutbox):
    """The sign-up mail is plain text with a fixed subject: markup typed in a name is shown
    as typed, no HTML part carries it, and no typed text reaches a header but the address."""
    name = '<a href="https://evil.example">Pay here</a> & "Co"'
    signup_post(HttpsClient(), **signup_form(username="grace+x@y", organization=name))

    (mail,) = mailoutbox
    assert mail.subject == "Finish signing up to Switchyard"
    assert mail.to == ["grace@example.com"] and not mail.cc and not mail.bcc
    assert getattr(mail, "alternatives", []) == [] and mail.content_subtype == "plain"
    assert f'as "grace+x@y", for the organisation "{name}".' in mail.body
    message = mail.message()
    assert message.get_content_type() == "text/plain" and not message.is_multipart()
    headers = dict(message.items())
    assert set(headers) == {
        "Content-Type", "MIME-Version", "Content-Transfer-Encoding", "Subject", "From", "To",
        "Date", "Message-ID",
    }  # fmt: skip
    assert headers["To"] == "grace@example.com"


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
