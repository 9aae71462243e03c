"""Signed-in sessions, each row knowing whose it is (marketplace.sessions), so every session of
one account can be ended at once: "Sign out everywhere", a password change or reset."""

from django.conf import settings
from django.contrib.sessions.base_session import AbstractBaseSession
from django.db import models

__all__ = ["UserSession"]


class UserSession(AbstractBaseSession):
    """Django's database session with the signed-in user beside it (None while signed out);
    written and read by marketplace.sessions.SessionStore (SESSION_ENGINE), not decoded here.
    Deleting an account deletes its sessions."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        editable=False,
    )

    class Meta(AbstractBaseSession.Meta):
        db_table = "marketplace_user_session"
