"""Password-reset requests are limited (per e-mail address named, per client address), so
nobody can make Switchyard mail a person again and again; an IPv6 client is counted by its /64
for sign-ins and resets; an IPv4 client seen through a dual-stack socket is one client."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from ipaddress import ip_network

import pytest
from django.test import RequestFactory, TestCase

from config.client_ip import client_ip
from tests.clients import HttpsClient
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_rate_limits")]

PASSWORD_RESETS_PER_EMAIL = 3  # an hour (marketplace.portal.login)
TOO_MANY_RESETS = "Too many password reset requests"
TOO_MANY_SIGN_INS = "Too many sign-in attempts"


@pytest.fixture
def ada(django_user_model):
    return django_user_model.objects.create_user(
        username="ada", email="ada@example.com", password="a-long-passphrase-1"
    )


def _reset(email: str, address: str):
    # The reset mail is queued when the request's transaction commits: run that here.
    with TestCase.captureOnCommitCallbacks(execute=True):
        return HttpsClient().post("/password-reset", {"email": email}, REMOTE_ADDR=address)


def test_one_address_is_mailed_a_reset_link_only_so_often_whoever_asks(ada, mailoutbox):
    for n in range(PASSWORD_RESETS_PER_EMAIL):
        response = _reset("ADA@example.com", f"203.0.113.{n}")
        assert response.status_code == 302  # "check your e-mail"
    assert len(mailoutbox) == PASSWORD_RESETS_PER_EMAIL

    response = _reset("ada@example.com", "198.51.100.9")  # another client, same victim
    assert response.status_code == 200
    assert TOO_MANY_RESETS in response.content.decode()
    assert len(mailoutbox) == PASSWORD_RESETS_PER_EMAIL  # nothing more was sent


def test_the_refusal_is_the_same_for_an_address_without_an_account(ada, mailoutbox):
    for n in range(PASSWORD_RESETS_PER_EMAIL):
        assert _reset("nobody@example.com", f"203.0.113.{n}").status_code == 302
    response = _reset("nobody@example.com", "198.51.100.9")
    assert TOO_MANY_RESETS in response.content.decode()
    assert mailoutbox == []


def test_one_client_cannot_request_resets_for_address_after_address(ada, settings, mailoutbox):
    settings.PORTAL_SIGN_IN_RATE = "2/hour"
    assert _reset("a@example.com", "203.0.113.5").status_code == 302
    assert _reset("b@example.com", "203.0.113.5").status_code == 302
    response = _reset("ada@example.com", "203.0.113.5")
    assert TOO_MANY_RESETS in response.content.decode()
    assert mailoutbox == []
    assert _reset("ada@example.com", "198.51.100.9").status_code == 302  # someone else
    assert len(mailoutbox) == 1


def test_sign_ins_from_one_ipv6_block_share_one_budget(ada, settings):
    """Without it, one host with a /64 (every IPv6 subscriber) tries passwords without end."""
    settings.PORTAL_SIGN_IN_RATE = "2/hour"

    def sign_in(address: str) -> str:
        return (
            HttpsClient()
            .post("/login", {"username": "ada", "password": "wrong"}, REMOTE_ADDR=address)
            .content.decode()
        )

    assert TOO_MANY_SIGN_INS not in sign_in("2001:db8:1:2::1")
    assert TOO_MANY_SIGN_INS not in sign_in("2001:db8:1:2::2")
    assert TOO_MANY_SIGN_INS in sign_in("2001:db8:1:2:ffff::3")
    assert TOO_MANY_SIGN_INS not in sign_in("2001:db8:1:3::1")  # another /64


def test_an_ipv4_peer_on_a_dual_stack_socket_is_its_ipv4_address(settings):
    settings.TRUSTED_PROXIES = 0
    request = RequestFactory().get("/", REMOTE_ADDR="::ffff:203.0.113.7")
    assert client_ip(request) == "203.0.113.7"


def test_a_trusted_ipv4_proxy_is_recognised_through_a_dual_stack_socket(settings):
    """Else the proxy is taken for the client and everyone behind it shares one limit."""
    settings.TRUSTED_PROXIES = (ip_network("10.0.0.0/8"),)
    request = RequestFactory().get(
        "/", REMOTE_ADDR="::ffff:10.0.0.1", HTTP_X_FORWARDED_FOR="::ffff:203.0.113.7"
    )
    assert client_ip(request) == "203.0.113.7"


def _sign_up(n: int, address: str, email: str | None = None):
    with TestCase.captureOnCommitCallbacks(execute=True):  # the mail, queued on commit
        return _sign_up_post(n, address, email)


def _sign_up_post(n: int, address: str, email: str | None):
    return HttpsClient().post(
        "/signup",
        {
            "username": f"user{n}",
            "email": email or f"user{n}@example.com",
            "password1": "a-long-passphrase-1",
            "password2": "a-long-passphrase-1",
            "organization": f"Lab {n}",
        },
        REMOTE_ADDR=address,
    )


def test_sign_up_attempts_are_limited_per_address(ada, settings, django_user_model, mailoutbox):
    """Sign-up answers alike whether or not an e-mail address has an account, but each attempt
    mails someone: one client must not make Switchyard mail a whole list."""
    from marketplace.models import PendingSignup

    settings.PORTAL_SIGN_IN_RATE = "1/hour"  # five sign-ups an hour from one address
    for n in range(1, 5):
        assert _sign_up(n, "203.0.113.5").status_code == 200
    taken = _sign_up(5, "203.0.113.5", email="ada@example.com")
    assert taken.status_code == 200
    assert "We sent a link to <strong>ada@example.com</strong>" in taken.content.decode()

    refused = _sign_up(6, "203.0.113.5", email="ada@example.com")
    assert refused.status_code == 429
    page = refused.content.decode()
    assert "Too many sign-up attempts" in page
    assert "We sent a link" not in page  # not even checked

    assert _sign_up(7, "198.51.100.9").status_code == 200  # another client
    assert set(PendingSignup.objects.values_list("username", flat=True)) == {
        "user1",
        "user2",
        "user3",
        "user4",
        "user7",
    }
    assert len(mailoutbox) == 6  # five links and one notice to ada; none for the refused
    assert [m.to for m in mailoutbox].count(["ada@example.com"]) == 1
    assert list(django_user_model.objects.values_list("username", flat=True)) == ["ada"]


def test_the_reset_link_is_built_by_the_worker_on_site_url(ada, settings, monkeypatch, mailoutbox):
    """The request records the account's id only (the token never sits in the mail outbox
    or the broker, which carries the outbox row's id; the request does no mail work, whether
    or not the address has an account); the link is on SITE_URL, not on the Host the request
    came to."""
    from config.celery import app as celery_app
    from marketplace.models import MailMessage

    settings.SITE_URL = "https://switchyard.example.com"
    task = celery_app.tasks["marketplace.mail.mail_outbox_send"]
    queued = []
    send = task.apply_async

    def record(args=None, kwargs=None, **options):
        queued.append(list(args or []))
        return send(args, kwargs, **options)

    monkeypatch.setattr(task, "apply_async", record)

    with TestCase.captureOnCommitCallbacks(execute=True):
        HttpsClient().post("/password-reset", {"email": "ada@example.com"})

    message = MailMessage.objects.get()
    assert queued == [[message.pk]]
    assert (message.task, message.args) == ("marketplace.tasks.password_reset_mail_send", [ada.pk])
    (sent,) = mailoutbox
    assert "https://switchyard.example.com/password-reset/" in sent.body
    assert sent.body.split("/password-reset/")[1].split()[0] not in repr(message.args)
    assert "testserver" not in sent.body


def test_the_reset_link_keeps_a_path_under_site_url_and_states_its_lifetime(
    ada, settings, mailoutbox
):
    settings.SITE_URL = "https://example.com/switchyard/"
    settings.PASSWORD_RESET_TIMEOUT = 15 * 60

    with TestCase.captureOnCommitCallbacks(execute=True):
        HttpsClient().post("/password-reset", {"email": "ada@example.com"})

    (sent,) = mailoutbox
    assert "https://example.com/switchyard/password-reset/" in sent.body
    assert "works once, for 15 min." in sent.body


def test_the_admin_sign_in_is_limited_like_the_portals(django_user_model, settings):
    """/admin/login/ checks the same passwords (staff's, the most valuable): without the
    portal's limit, it let anyone try staff passwords without end."""
    settings.PORTAL_SIGN_IN_RATE = "2/hour"
    django_user_model.objects.create_user(
        username="grace", password="a-long-passphrase-1", is_staff=True
    )

    def sign_in(password: str):
        return HttpsClient().post(
            "/admin/login/",
            {"username": "grace", "password": password, "next": "/admin/"},
            REMOTE_ADDR="203.0.113.7",
        )

    assert TOO_MANY_SIGN_INS not in sign_in("wrong-1").content.decode()
    assert TOO_MANY_SIGN_INS not in sign_in("wrong-2").content.decode()
    refused = sign_in("a-long-passphrase-1")  # the right password, past the limit

    assert refused.status_code == 200
    assert TOO_MANY_SIGN_INS in refused.content.decode()
    assert "_auth_user_id" not in refused.wsgi_request.session
    # Attempts on the portal's form and the admin's count against one budget.
    portal = HttpsClient().post(
        "/login", {"username": "grace", "password": "wrong"}, REMOTE_ADDR="203.0.113.7"
    )
    assert TOO_MANY_SIGN_INS in portal.content.decode()
    # Another client is not refused, and a non-staff account still gets the admin's refusal.
    other = HttpsClient().post(
        "/admin/login/",
        {"username": "grace", "password": "a-long-passphrase-1", "next": "/admin/"},
        REMOTE_ADDR="198.51.100.9",
    )
    assert other.status_code == 302 and other["Location"] == "/admin/"
    django_user_model.objects.create_user(username="ada", password="a-long-passphrase-1")
    customer = HttpsClient().post(
        "/admin/login/",
        {"username": "ada", "password": "a-long-passphrase-1", "next": "/admin/"},
        REMOTE_ADDR="198.51.100.10",
    )
    assert customer.status_code == 200
    assert "for a staff account" in customer.content.decode()
