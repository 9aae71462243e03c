"""E-mail to customers (invitations, funding notices, curtailment, disabled webhooks, sign-up,
password resets) goes through an outbox: the decision to send writes a MailMessage row in the
transaction that made it, and the message is sent by a Celery task once that commits. The web
request does not wait on the mail server, and nothing is lost when Redis, a worker or the mail
server fails half-way:

- the send task takes the row's id, claims the row (config.outbox: one sender at a time),
  sends, and marks it sent; a duplicate delivery finds it sent, or claimed, and sends nothing;
- a server that fails (SMTP or network errors) is tried again with backoff, 10 s doubling to
  5 min, MAIL_MAX_ATTEMPTS times in all; then the row is marked failed with the error, for staff
  to see and send again from the admin;
- mail_outbox_sweep (beat, every 15 s) queues the send task again for a row nobody has taken
  for MAIL_SWEEP_AGE (its task lost with a Redis that restarted empty, or never queued because
  the process died after the commit or the broker was down) and for a row whose retry is due.

With the broker down nothing is sent from the web process: the row waits for the sweeper,
which runs as soon as the broker is back.

A message that carries a secret (an invitation's or a password reset's link) is stored, and
handed to the broker, as the record's ids only: its task composes and sends it in the worker
(mail_task_on_commit).

A retry after a server accepted the message but the connection failed before it said so, or
after a worker died between sending and marking the row, can send it twice: e-mail is
delivered at least once, never silently dropped.
"""

import logging
from datetime import datetime, timedelta
from importlib import import_module
from smtplib import SMTPException

from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.db.models import Q
from django.db.models.functions import Now
from django.urls import reverse
from django.utils import timezone

from config.celery import BROKER_ERRORS, task_enqueue
from config.celery import app as celery_app
from config.outbox import outbox_backoff, outbox_claim
from marketplace.models import MailMessage, MailStatus

__all__ = [
    "MAIL_MAX_ATTEMPTS",
    "MAIL_RETRY_ERRORS",
    "MAIL_SWEEP_AGE",
    "mail_outbox_deliver",
    "mail_outbox_resend",
    "mail_outbox_send",
    "mail_outbox_sweep",
    "mail_send",
    "mail_send_on_commit",
    "mail_task_on_commit",
    "portal_link",
]

logger = logging.getLogger(__name__)

SEND_TASK = "marketplace.mail.mail_outbox_send"
PLAIN_MAIL_TASK = "marketplace.mail.mail_send"
MAIL_MAX_ATTEMPTS = 9
# What a send raises that another try may not: the mail server's refusals and network errors.
MAIL_RETRY_ERRORS = (SMTPException, OSError)
# A row claimed this long ago whose sender has not recorded the end is taken up again: far
# above an SMTP send (EMAIL_TIMEOUT for each connect and reply).
MAIL_CLAIM_LEASE = timedelta(minutes=5)
# A row queued this long ago and still not taken is queued again (its task was lost).
MAIL_SWEEP_AGE = timedelta(minutes=1)


def portal_link(view_name: str, **kwargs) -> str:
    """The portal page `view_name` as a link for an e-mail: on SITE_URL (a path under it
    included), never on the Host a request named."""
    return settings.SITE_URL.rstrip("/") + reverse(view_name, kwargs=kwargs or None)


@shared_task(name=PLAIN_MAIL_TASK)
def mail_send(subject: str, body: str, recipients: list[str], from_email: str | None = None) -> int:
    """Send one message to `recipients` (the outbox's composer of a plain notice)."""
    return send_mail(subject, body, from_email, recipients, fail_silently=False)


def mail_send_on_commit(
    *, subject: str, body: str, recipients: list[str], from_email: str | None = None
) -> None:
    """Record the message in the current transaction; it is sent once that commits (at once
    outside one). The body is stored: it must carry no secret (see mail_task_on_commit)."""
    if not recipients:
        return
    _outbox_add(PLAIN_MAIL_TASK, [subject, body, list(recipients), from_email])


def mail_task_on_commit(task_name: str, ids: list) -> None:
    """Record that `task_name` is to compose and send a message from `ids` (its arguments: ids,
    and nothing secret) in the current transaction; it runs in a worker once that commits."""
    _outbox_add(task_name, list(ids))


def _outbox_add(task: str, args: list) -> None:
    # The database's clock, which the claim reads (a web host's clock may run ahead of it).
    message = MailMessage.objects.create(
        task=task, args=args, next_attempt_at=Now(), queued_at=Now()
    )
    transaction.on_commit(lambda: _enqueue(message.pk), robust=True)


def _enqueue(message_id: int) -> None:
    try:
        task_enqueue(SEND_TASK, [message_id])
    except BROKER_ERRORS as exc:
        # The row is committed: the sweeper queues it once the broker answers again.
        logger.warning("could not queue e-mail %s (%s); the mail sweeper will", message_id, exc)


@shared_task(name=SEND_TASK)
def mail_outbox_send(message_id: int) -> str:
    return mail_outbox_deliver(message_id=message_id)


def _composer(task_name: str):
    # A task's name is its module and function: a process that has not imported the module
    # yet (a web process running tasks eagerly) finds it there.
    if task_name not in celery_app.tasks:
        import_module(task_name.rsplit(".", 1)[0])
    return celery_app.tasks[task_name]


def mail_outbox_deliver(*, message_id: int) -> str:
    """Send the message `message_id` if it is pending and due. Returns its status afterwards
    ("" when another sender has it, or its retry is not due yet).

    Claim → send → record: the claim is one autocommitted UPDATE; the mail server is called
    with no transaction open; the outcome is written only if no later claim took the row
    meanwhile (its lease lapsed), so a slow sender never undoes a newer one's record.
    """
    attempt = outbox_claim(
        MailMessage, message_id=message_id, lease=MAIL_CLAIM_LEASE, max_attempts=MAIL_MAX_ATTEMPTS
    )
    if attempt is None:
        current = MailMessage.objects.filter(pk=message_id).values_list("status", flat=True)
        status = current.first()
        return "" if status is None or status == MailStatus.PENDING else status
    message = MailMessage.objects.get(pk=message_id)
    ours = MailMessage.objects.filter(pk=message_id, status=MailStatus.PENDING, attempts=attempt)
    try:
        sent = _composer(message.task).run(*message.args)
    except MAIL_RETRY_ERRORS as exc:
        error = f"attempt {attempt}: {type(exc).__name__}: {exc}"[:2000]
        if attempt >= MAIL_MAX_ATTEMPTS:
            ours.update(status=MailStatus.FAILED, last_error=error, queued_at=None)
            logger.error("e-mail %s failed after %s attempts: %s", message_id, attempt, exc)
            return MailStatus.FAILED
        retry = outbox_backoff(attempt, first=timedelta(seconds=10), cap=timedelta(minutes=5))
        ours.update(last_error=error, next_attempt_at=timezone.now() + retry, queued_at=None)
        logger.warning("e-mail %s attempt %s failed: %s", message_id, attempt, exc)
        return MailStatus.PENDING
    # Sent, whoever holds the claim now: a later sender finds it so and sends nothing more.
    # A composer that sent nothing found its record gone (an invitation revoked meanwhile).
    note = "" if sent else "nothing to send: its record is gone or no longer asks for it"
    MailMessage.objects.filter(pk=message_id, status=MailStatus.PENDING).update(
        status=MailStatus.SENT, sent_at=timezone.now(), queued_at=None, last_error=note
    )
    return MailStatus.SENT


@shared_task(name="marketplace.mail.mail_outbox_sweep")
def mail_outbox_sweep_task() -> int:
    """Every 15 s: queue again what was lost or is due for a retry (mail_outbox_sweep)."""
    return mail_outbox_sweep()


def mail_outbox_sweep(*, now: datetime | None = None, limit: int = 500) -> int:
    """Queue the send task again for each pending message that is due and has no task in the
    broker (none queued, or queued MAIL_SWEEP_AGE ago and not taken); mark failed the ones
    whose last attempt never recorded its end. Returns how many were queued."""
    now = now or timezone.now()
    pending = MailMessage.objects.filter(status=MailStatus.PENDING, next_attempt_at__lte=now)
    # Its last sender died after claiming it (its lease lapsed) and no attempt is left.
    pending.filter(attempts__gte=MAIL_MAX_ATTEMPTS).update(
        status=MailStatus.FAILED,
        queued_at=None,
        last_error=f"attempt {MAIL_MAX_ATTEMPTS} did not finish (its worker stopped)",
    )
    lost = Q(queued_at__isnull=True) | Q(queued_at__lte=now - MAIL_SWEEP_AGE)
    with transaction.atomic():
        ids = list(
            pending.filter(lost, attempts__lt=MAIL_MAX_ATTEMPTS)
            .select_for_update(skip_locked=True)
            .order_by("next_attempt_at", "id")
            .values_list("id", flat=True)[:limit]
        )
        MailMessage.objects.filter(pk__in=ids).update(queued_at=now)
    for message_id in ids:
        _enqueue(message_id)
    return len(ids)


@transaction.atomic
def mail_outbox_resend(*, message_ids: list[int]) -> int:
    """Staff's "send again" for failed messages: each gets MAIL_MAX_ATTEMPTS new attempts and
    is queued after the commit. A message not failed is left as it is. Returns how many."""
    ids = list(
        MailMessage.objects.select_for_update()
        .filter(pk__in=message_ids, status=MailStatus.FAILED)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    MailMessage.objects.filter(pk__in=ids).update(
        status=MailStatus.PENDING, attempts=0, next_attempt_at=Now(), queued_at=Now()
    )
    for message_id in ids:
        transaction.on_commit(lambda pk=message_id: _enqueue(pk), robust=True)
    return len(ids)
