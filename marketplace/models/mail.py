"""The e-mail outbox: every message is a row first (marketplace.mail)."""

from django.db import models
from django.db.models import Q

__all__ = ["MailMessage", "MailStatus"]


class MailStatus(models.TextChoices):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class MailMessage(models.Model):
    """An e-mail decided in a transaction that committed, and the task that sends it.

    `task` composes and sends the message from `args`: a notice's subject, body and
    recipients, or the ids a message with a secret is built from by the worker (an
    invitation's, a password reset's link is never stored here or in the broker). Sent rows
    are deleted after MAIL_RETENTION_DAYS (docs/retention.md).
    """

    task = models.CharField(max_length=100)
    args = models.JSONField()
    status = models.CharField(max_length=10, choices=MailStatus.choices, default=MailStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # When a sender may claim it next (a claim pushes it a lease ahead, a failure a backoff).
    next_attempt_at = models.DateTimeField()
    # When its send task was last handed to the broker; null once a sender took that one.
    queued_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="mail_pending_due_idx",
            ),
            models.Index(fields=["sent_at"], condition=Q(status="sent"), name="mail_sent_at_idx"),
            models.Index(fields=["id"], condition=Q(status="failed"), name="mail_failed_idx"),
        ]

    def __str__(self) -> str:
        return f"mail {self.pk} {self.task} {self.status}"
