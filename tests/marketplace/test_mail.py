"""E-mail goes through a Celery task after commit: nothing is sent for a rolled-back change, a
mail server that fails is retried, a broker that is down does not lose the message."""

from smtplib import SMTPServerDisconnected

import pytest
from django.core import mail
from django.db import transaction
from kombu.exceptions import OperationalError

from marketplace import mail as mail_module
from marketplace.mail import MAIL_MAX_RETRIES, mail_send, mail_send_on_commit, mail_task_on_commit

pytestmark = pytest.mark.django_db


class FlakyBackend:
    """A mail backend whose server drops the connection `failures` times, then accepts."""

    failures = 0
    attempts = 0

    def __init__(self, *args, **kwargs):
        pass

    def send_messages(self, messages):
        FlakyBackend.attempts += 1
        if FlakyBackend.attempts <= FlakyBackend.failures:
            raise SMTPServerDisconnected("connection unexpectedly closed")
        mail.outbox.extend(messages)
        return len(messages)


@pytest.fixture
def flaky(settings):
    settings.EMAIL_BACKEND = f"{__name__}.FlakyBackend"
    FlakyBackend.attempts = 0
    return FlakyBackend


def test_nothing_is_queued_before_the_commit_or_for_a_rollback(
    mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        mail_send_on_commit(subject="Hello", body="Body", recipients=["a@example.com"])
        assert mailoutbox == []  # not before the commit
    assert len(callbacks) == 1
    (sent,) = mailoutbox
    assert (sent.subject, sent.body, sent.to) == ("Hello", "Body", ["a@example.com"])

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        mail_send_on_commit(subject="Never", body="Body", recipients=["a@example.com"])
        raise Boom
    assert [m.subject for m in mailoutbox] == ["Hello"]


def test_no_recipients_queues_nothing(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        mail_send_on_commit(subject="Hello", body="Body", recipients=[])
    assert callbacks == []


def test_a_mail_server_that_drops_the_connection_is_retried_until_it_accepts(flaky):
    flaky.failures = 2
    result = mail_send.apply(args=["Hi", "Body", ["a@example.com"]])
    assert result.successful()
    assert flaky.attempts == 3
    assert [m.subject for m in mail.outbox] == ["Hi"]


def test_a_mail_server_that_stays_down_is_given_up_after_the_retries(flaky):
    flaky.failures = 1000
    result = mail_send.apply(args=["Hi", "Body", ["a@example.com"]])
    assert result.failed()
    assert isinstance(result.result, SMTPServerDisconnected)
    assert flaky.attempts == MAIL_MAX_RETRIES + 1
    assert mail.outbox == []


def test_with_the_broker_down_the_message_is_sent_from_this_process(
    monkeypatch, mailoutbox, django_capture_on_commit_callbacks, caplog
):
    def broker_down(*args):
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(mail_module.mail_send, "delay", broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        mail_send_on_commit(subject="Still", body="Body", recipients=["a@example.com"])
    assert [m.subject for m in mailoutbox] == ["Still"]
    assert any("could not queue an e-mail" in m for m in caplog.messages)


def test_with_the_broker_down_a_message_built_from_ids_is_sent_from_this_process(
    monkeypatch, mailoutbox, django_capture_on_commit_callbacks, caplog
):
    def broker_down(*args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(mail_module, "task_enqueue", broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        mail_task_on_commit(
            "marketplace.tasks.invitation_mail_send",
            [7],
            inline=lambda: mail_send(f"Built for {7}", "Body", ["a@example.com"]),
        )
    assert [m.subject for m in mailoutbox] == ["Built for 7"]
    assert any("could not queue an e-mail" in m for m in caplog.messages)


def test_with_the_broker_and_the_mail_server_down_the_request_tries_once_and_logs_it(
    flaky, monkeypatch, django_capture_on_commit_callbacks, caplog
):
    """Not the task's nine tries back to back inside the request (its backoff does not apply
    there): one, then an error log naming the message, and the request goes on."""

    def broker_down(*args):
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    flaky.failures = 1000
    monkeypatch.setattr(mail_module.mail_send, "delay", broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        mail_send_on_commit(subject="Lost?", body="Body", recipients=["a@example.com"])
    assert flaky.attempts == 1
    assert mail.outbox == []
    (logged,) = [r for r in caplog.records if "from this process either" in r.getMessage()]
    assert logged.levelname == "ERROR" and "'Lost?' to ['a@example.com']" in logged.getMessage()
