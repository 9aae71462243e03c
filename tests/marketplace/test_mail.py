"""E-mail goes through the mail outbox (marketplace.mail): a row written with the change that
decided it, sent by a task after commit, swept again when its task is lost, tried again with
backoff while the mail server fails, and marked failed (for staff to send again) once its tries
ran out. Nothing is sent for a rolled-back change, and nothing is sent twice once marked."""

import base64
import json
import threading
import time
from datetime import timedelta
from smtplib import SMTPServerDisconnected

import pytest
from django.core import mail
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError

from config.celery import app as celery_app
from config.celery import task_enqueue
from marketplace import mail as mail_module
from marketplace.mail import (
    MAIL_CLAIM_LEASE,
    MAIL_MAX_ATTEMPTS,
    MAIL_SWEEP_AGE,
    mail_outbox_deliver,
    mail_outbox_send,
    mail_outbox_sweep,
    mail_send_on_commit,
    mail_task_on_commit,
)
from marketplace.models import MailMessage, MailStatus
from tests.provisioning_support import (  # noqa: F401 (broker_fixture is a fixture)
    broker_fixture,
    queue_purge,
    redis_test_client,
)
from tests.races import run_together

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


def _broker_down(*args, **kwargs):
    raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")


def _retry_due(message: MailMessage) -> None:
    """Bring the message's next try to now (its backoff or its lease has passed)."""
    MailMessage.objects.filter(pk=message.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )


def _queued_messages(queue: str) -> list[tuple[str, list]]:
    """The tasks waiting in `queue` on the real broker, as (name, args), oldest first."""
    raw = redis_test_client().lrange(queue, 0, -1)
    messages = [json.loads(item) for item in reversed(raw)]  # kombu pushes on the left
    return [(m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0]) for m in messages]


def test_nothing_is_queued_before_the_commit_or_for_a_rollback(
    mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        mail_send_on_commit(subject="Hello", body="Body", recipients=["a@example.com"])
        assert mailoutbox == []  # not before the commit
    assert len(callbacks) == 1
    (sent,) = mailoutbox
    assert (sent.subject, sent.body, sent.to) == ("Hello", "Body", ["a@example.com"])
    message = MailMessage.objects.get()
    assert (message.status, message.attempts, message.queued_at) == (MailStatus.SENT, 1, None)
    assert message.sent_at is not None

    class Boom(Exception):
        pass

    with pytest.raises(Boom), transaction.atomic():
        mail_send_on_commit(subject="Never", body="Body", recipients=["a@example.com"])
        raise Boom
    assert [m.subject for m in mailoutbox] == ["Hello"]
    assert MailMessage.objects.count() == 1  # the row went with the rollback


def test_no_recipients_queues_nothing(django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        mail_send_on_commit(subject="Hello", body="Body", recipients=[])
    assert callbacks == []
    assert not MailMessage.objects.exists()


def test_a_message_survives_a_redis_flush_between_commit_and_send(
    broker, monkeypatch, mailoutbox, django_capture_on_commit_callbacks
):
    """The send task goes to the real broker and is lost there (what a Redis restarted empty
    leaves of this test's queue: nothing; the shared Redis's other keys are left alone). The
    row is still pending: the sweeper queues it again once it is MAIL_SWEEP_AGE old, and it is
    sent once, however often its task is delivered afterwards."""
    monkeypatch.delattr(mail_outbox_send, "apply_async")  # the real send, not conftest's eager
    with django_capture_on_commit_callbacks(execute=True):
        mail_send_on_commit(subject="Kept", body="Body", recipients=["a@example.com"])
    message = MailMessage.objects.get()
    assert _queued_messages(broker) == [("marketplace.mail.mail_outbox_send", [message.pk])]

    queue_purge(broker)

    assert mail_outbox_sweep() == 0  # its task may still be on its way to a worker
    later = timezone.now() + MAIL_SWEEP_AGE + timedelta(seconds=1)
    assert mail_outbox_sweep(now=later) == 1
    ((name, args),) = _queued_messages(broker)
    assert (name, args) == ("marketplace.mail.mail_outbox_send", [message.pk])
    assert mail_outbox_sweep(now=later) == 0  # queued once per sweep age, not every sweep

    # A worker runs it; then the broker delivers it again (a redelivery, a second sweep).
    assert mail_outbox_send.apply(args).get() == MailStatus.SENT
    assert mail_outbox_send.apply(args).get() == MailStatus.SENT
    assert [m.subject for m in mailoutbox] == ["Kept"]
    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.SENT, 1)
    assert mail_outbox_sweep(now=later + MAIL_SWEEP_AGE * 2) == 0


def test_a_duplicate_delivery_sends_once(mailoutbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        mail_send_on_commit(subject="Once", body="Body", recipients=["a@example.com"])
    message = MailMessage.objects.get()

    assert mail_outbox_deliver(message_id=message.pk) == MailStatus.SENT
    _retry_due(message)  # even with its time come again
    assert mail_outbox_deliver(message_id=message.pk) == MailStatus.SENT
    assert mail_outbox_deliver(message_id=message.pk + 1000) == ""  # no such row
    assert [m.subject for m in mailoutbox] == ["Once"]
    message.refresh_from_db()
    assert message.attempts == 1


class SlowBackend:
    """A mail server that takes a moment to accept: deliveries at once overlap in it."""

    sent: list[str] = []
    lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        pass

    def send_messages(self, messages):
        time.sleep(0.3)
        with SlowBackend.lock:
            SlowBackend.sent.extend(m.subject for m in messages)
        return len(messages)


@pytest.mark.django_db(transaction=True)
def test_two_deliveries_at_once_send_it_once(settings):
    settings.EMAIL_BACKEND = f"{__name__}.SlowBackend"
    SlowBackend.sent = []
    message = MailMessage.objects.create(
        task="marketplace.mail.mail_send",
        args=["Raced", "Body", ["a@example.com"], None],
        next_attempt_at=timezone.now() - timedelta(seconds=1),
    )

    outcomes = run_together(*[lambda: mail_outbox_deliver(message_id=message.pk)] * 4)

    assert outcomes == ["ok"] * 4
    assert SlowBackend.sent == ["Raced"]
    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.SENT, 1)


def test_a_failing_mail_server_is_tried_again_with_backoff_until_it_accepts(
    flaky, mailoutbox, django_capture_on_commit_callbacks
):
    flaky.failures = 2
    with django_capture_on_commit_callbacks(execute=True):
        mail_send_on_commit(subject="Hi", body="Body", recipients=["a@example.com"])
    message = MailMessage.objects.get()
    message.refresh_from_db()
    assert (message.status, message.attempts, message.queued_at) == (MailStatus.PENDING, 1, None)
    assert "SMTPServerDisconnected" in message.last_error
    wait = message.next_attempt_at - timezone.now()
    assert timedelta(seconds=8) < wait <= timedelta(seconds=10)

    assert mail_outbox_deliver(message_id=message.pk) == ""  # not before its backoff
    assert mail_outbox_sweep() == 0
    assert flaky.attempts == 1

    _retry_due(message)
    assert mail_outbox_sweep() == 1  # queued (here: run at once) by the sweeper
    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.PENDING, 2)
    wait = message.next_attempt_at - timezone.now()
    assert timedelta(seconds=18) < wait <= timedelta(seconds=20)  # doubled

    _retry_due(message)
    assert mail_outbox_sweep() == 1
    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.SENT, 3)
    assert flaky.attempts == 3
    assert [m.subject for m in mailoutbox] == ["Hi"]


def _retries_run_out(message: MailMessage) -> None:
    for _ in range(MAIL_MAX_ATTEMPTS + 2):
        _retry_due(message)
        mail_outbox_sweep()


def test_a_mail_server_that_stays_down_leaves_a_failed_message_staff_can_send_again(
    flaky, mailoutbox, django_capture_on_commit_callbacks, caplog, admin_client
):
    flaky.failures = 1000
    with django_capture_on_commit_callbacks(execute=True):
        mail_send_on_commit(subject="Down", body="Body", recipients=["a@example.com"])
    message = MailMessage.objects.get()

    _retries_run_out(message)

    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.FAILED, MAIL_MAX_ATTEMPTS)
    assert message.last_error.startswith(f"attempt {MAIL_MAX_ATTEMPTS}: SMTPServerDisconnected")
    assert flaky.attempts == MAIL_MAX_ATTEMPTS
    assert mail.outbox == []
    (logged,) = [r for r in caplog.records if "failed after" in r.getMessage()]
    assert logged.levelname == "ERROR"
    assert mail_outbox_sweep(now=timezone.now() + timedelta(days=1)) == 0  # given up

    # Staff see it among the failed ones, and send it again once the server is back.
    page = admin_client.get("/admin/marketplace/mailmessage/?status__exact=failed")
    assert page.status_code == 200
    assert "Down → a@example.com" in page.content.decode()
    assert list(page.context["cl"].result_list) == [message]
    pending = admin_client.get("/admin/marketplace/mailmessage/?status__exact=pending")
    assert list(pending.context["cl"].result_list) == []

    flaky.failures = 0
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/marketplace/mailmessage/",
            {"action": "resend", "_selected_action": [message.pk]},
        )
    assert response.status_code == 302
    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.SENT, 1)
    assert [m.subject for m in mailoutbox] == ["Down"]


def test_sending_again_leaves_a_message_that_did_not_fail_as_it_is(
    admin_client, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        mail_send_on_commit(subject="Sent", body="Body", recipients=["a@example.com"])
    message = MailMessage.objects.get()

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/marketplace/mailmessage/",
            {"action": "resend", "_selected_action": [message.pk]},
            follow=True,
        )

    assert "1 not failed, left as they are" in response.content.decode()
    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.SENT, 1)
    assert [m.subject for m in mailoutbox] == ["Sent"]  # not twice


def test_staff_who_may_only_view_cannot_send_again(client, django_user_model):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_mailmessage"))
    client.force_login(viewer)
    message = MailMessage.objects.create(
        task="marketplace.mail.mail_send",
        args=["Failed", "Body", ["a@example.com"], None],
        next_attempt_at=timezone.now(),
        status=MailStatus.FAILED,
        attempts=MAIL_MAX_ATTEMPTS,
    )

    assert client.get("/admin/marketplace/mailmessage/").status_code == 200
    client.post(
        "/admin/marketplace/mailmessage/", {"action": "resend", "_selected_action": [message.pk]}
    )

    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.FAILED, MAIL_MAX_ATTEMPTS)


def test_a_sender_that_died_half_way_is_replaced_after_its_lease(mailoutbox):
    """Claimed (its attempt counted), then its worker died before recording anything: the
    sweeper leaves it alone while the lease runs, then queues it again."""
    message = MailMessage.objects.create(
        task="marketplace.mail.mail_send",
        args=["Again", "Body", ["a@example.com"], None],
        next_attempt_at=timezone.now() + MAIL_CLAIM_LEASE,
        attempts=1,
        queued_at=timezone.now() - MAIL_SWEEP_AGE * 2,
    )

    assert mail_outbox_sweep() == 0
    assert mail_outbox_deliver(message_id=message.pk) == ""  # nor does a duplicate delivery
    _retry_due(message)  # the lease lapsed
    assert mail_outbox_sweep() == 1
    message.refresh_from_db()
    assert (message.status, message.attempts) == (MailStatus.SENT, 2)
    assert [m.subject for m in mailoutbox] == ["Again"]


def test_a_message_whose_last_sender_died_is_marked_failed(mailoutbox):
    message = MailMessage.objects.create(
        task="marketplace.mail.mail_send",
        args=["Last", "Body", ["a@example.com"], None],
        next_attempt_at=timezone.now() - timedelta(seconds=1),
        attempts=MAIL_MAX_ATTEMPTS,
    )

    assert mail_outbox_sweep() == 0

    message.refresh_from_db()
    assert message.status == MailStatus.FAILED
    assert message.last_error == f"attempt {MAIL_MAX_ATTEMPTS} did not finish (its worker stopped)"
    assert mailoutbox == []


def test_with_the_broker_down_the_message_waits_for_the_sweeper(
    monkeypatch, mailoutbox, django_capture_on_commit_callbacks, caplog
):
    """Nothing is sent from the web process (no mail server wait inside the request): the row
    is committed, and the sweeper queues it once the broker is back."""
    monkeypatch.setattr(mail_module, "task_enqueue", _broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        mail_send_on_commit(subject="Still", body="Body", recipients=["a@example.com"])
    assert mailoutbox == []
    message = MailMessage.objects.get()
    assert message.status == MailStatus.PENDING
    assert any("the mail sweeper will" in m for m in caplog.messages)

    monkeypatch.setattr(mail_module, "task_enqueue", task_enqueue)  # the broker is back
    assert mail_outbox_sweep(now=timezone.now() + MAIL_SWEEP_AGE) == 1
    assert [m.subject for m in mailoutbox] == ["Still"]


def test_a_message_built_from_ids_is_composed_by_the_task_it_names(
    monkeypatch, mailoutbox, django_capture_on_commit_callbacks
):
    built = []

    @celery_app.task(name="tests.mail.built_for")
    def built_for(record_id: int) -> int:
        built.append(record_id)
        if record_id == 0:  # its record is gone: nothing to send
            return 0
        return mail.send_mail(f"Built for {record_id}", "Body", None, ["a@example.com"])

    monkeypatch.setattr(mail_module, "task_enqueue", _broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        mail_task_on_commit("tests.mail.built_for", [7])
    message = MailMessage.objects.get()
    assert (message.task, message.args) == ("tests.mail.built_for", [7])
    assert mailoutbox == []

    assert mail_outbox_deliver(message_id=message.pk) == MailStatus.SENT
    assert built == [7]
    assert [m.subject for m in mailoutbox] == ["Built for 7"]
    message.refresh_from_db()
    assert message.last_error == ""

    with django_capture_on_commit_callbacks(execute=True):
        mail_task_on_commit("tests.mail.built_for", [0])
    gone = MailMessage.objects.get(args=[0])
    assert mail_outbox_deliver(message_id=gone.pk) == MailStatus.SENT  # done: nothing to send
    gone.refresh_from_db()
    assert gone.last_error == "nothing to send: its record is gone or no longer asks for it"
    assert built == [7, 0] and len(mailoutbox) == 1
