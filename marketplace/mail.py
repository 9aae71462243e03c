"""E-mail to customers (invitations, funding notices, curtailment, disabled webhooks) is sent by
a Celery task, after the transaction that decided it commits: the web request does not wait on
the mail server, and a server that is down or refuses for a while is retried with backoff
(SMTP errors and network errors, up to MAIL_MAX_RETRIES times, 10 s doubling to 5 min). If the
broker itself cannot be reached, the message is sent from this process instead of being lost.

A message that carries a secret (an invitation's link) is not handed to the broker, where it
would sit in Redis and in its logs: its task takes the record's id and the worker composes and
sends it (mail_task_on_commit).

A retry after a server accepted the message but the connection failed before it said so can
send it twice; e-mail is delivered at least once, never silently dropped.
"""

import logging
from collections.abc import Callable
from smtplib import SMTPException

from celery import shared_task
from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.urls import reverse

from config.celery import BROKER_ERRORS, task_enqueue

__all__ = [
    "MAIL_MAX_RETRIES",
    "MAIL_RETRY",
    "mail_send",
    "mail_send_on_commit",
    "mail_task_on_commit",
    "portal_link",
]

logger = logging.getLogger(__name__)
MAIL_MAX_RETRIES = 8
# How every task that sends mail retries (shared_task options).
MAIL_RETRY = {
    "autoretry_for": (SMTPException, OSError),
    "retry_backoff": 10,
    # Well inside the broker's visibility timeout (600 s by default): a retry waiting longer
    # could be handed to a second worker as well, and the mail sent twice.
    "retry_backoff_max": 300,
    "max_retries": MAIL_MAX_RETRIES,
}


def portal_link(view_name: str, **kwargs) -> str:
    """The portal page `view_name` as a link for an e-mail: on SITE_URL (a path under it
    included), never on the Host a request named."""
    return settings.SITE_URL.rstrip("/") + reverse(view_name, kwargs=kwargs or None)


@shared_task(name="marketplace.mail.mail_send", **MAIL_RETRY)
def mail_send(subject: str, body: str, recipients: list[str], from_email: str | None = None) -> int:
    """Send one message to `recipients`; a failure raises, and the task retries it."""
    return send_mail(subject, body, from_email, recipients, fail_silently=False)


def mail_send_on_commit(
    *, subject: str, body: str, recipients: list[str], from_email: str | None = None
) -> None:
    """Queue the message once the current transaction commits (at once outside one)."""
    if not recipients:
        return
    args = [subject, body, list(recipients), from_email]
    transaction.on_commit(lambda: _enqueue(args), robust=True)


def _enqueue(args: list) -> None:
    try:
        mail_send.delay(*args)
    except BROKER_ERRORS as exc:
        logger.warning("could not queue an e-mail (%s); sending it from this process", exc)
        try:
            # Tried once: an eager apply would run every retry back to back, without its
            # backoff, inside the request (nine tries of up to EMAIL_TIMEOUT each).
            mail_send.run(*args)
        except (SMTPException, OSError):
            # Neither the broker nor the mail server: logged in full, for an operator to send.
            logger.exception(
                "could not send an e-mail from this process either: %r to %s", args[0], args[2]
            )


def mail_task_on_commit(task_name: str, ids: list[int], *, inline: Callable[[], object]) -> None:
    """Queue `task_name`, which composes and sends a message from `ids`, once the current
    transaction commits; if the broker cannot be reached, `inline` sends it from this process."""
    transaction.on_commit(lambda: _enqueue_task(task_name, ids, inline), robust=True)


def _enqueue_task(task_name: str, ids: list[int], inline: Callable[[], object]) -> None:
    try:
        task_enqueue(task_name, ids)
    except BROKER_ERRORS as exc:
        logger.warning("could not queue an e-mail (%s); sending it from this process", exc)
        inline()
