"""An account's e-mail address changes only once the new address confirms it.

The request (signed in, with the current password) mails the new address a link and tells the
current one; the account keeps its address until the link's page is confirmed. The link is a
token signed with SECRET_KEY, naming the account, the new address and a digest of the one it
had: it expires after SIGNUP_CONFIRM_HOURS, and works once (once the address changed, the
digest no longer matches). It is built by the mail worker, never sent through the broker.
"""

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core import signing
from django.core.mail import send_mail
from django.db import connection, transaction
from django.utils.crypto import salted_hmac

from config.errors import Conflict, Gone, NotFound, ValidationFailed
from marketplace.mail import mail_send_on_commit, mail_task_on_commit, portal_link
from marketplace.models import PendingSignup
from marketplace.rules import email_address_plain

__all__ = [
    "EMAIL_CHANGE_MAIL_TASK",
    "email_change_confirm",
    "email_change_mail_send",
    "email_change_open",
    "email_change_request",
]

EMAIL_CHANGE_MAIL_TASK = "marketplace.tasks.email_change_mail_send"
_SALT = "marketplace.accounts.email-change"


def email_change_request(*, user: AbstractBaseUser, email: str) -> str:
    """Mail `email` the link that makes it the account's address, and tell the address it has
    now (who asked, and what to do if it was not them). Returns the address as it will be
    stored. Whether another account has the address is not said here (it would tell who has
    an account); the confirmation refuses it."""
    email = email_address_plain(email.strip())  # it becomes the mail's To header
    if email.lower() == (user.email or "").lower():
        raise ValidationFailed(
            "That is already your e-mail address.", code="email_unchanged", field="email"
        )
    mail_task_on_commit(EMAIL_CHANGE_MAIL_TASK, [user.pk, email])
    if user.email:
        mail_send_on_commit(
            subject="Switchyard: a change of your e-mail address was asked",
            body=(
                f'Someone signed in to the Switchyard account "{user.get_username()}" asked to '
                f"change its e-mail address to {email}. It changes only once confirmed from "
                "that address; until then this address stays.\n\n"
                "If it was not you, change your password (which signs out every other session):\n"
                f"{portal_link('portal:password-change')}\n"
            ),
            recipients=[user.email],
        )
    return email


def email_change_mail_send(*, user_id: int, email: str) -> int:
    """Send `email` its confirmation link (the worker's part of email_change_request)."""
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None:
        return 0
    token = signing.dumps({"user": user.pk, "email": email, "was": _digest(user)}, salt=_SALT)
    body = (
        f'The Switchyard account "{user.get_username()}" asked to use this e-mail address. '
        "Confirm it here:\n"
        f"{portal_link('portal:email-confirm', token=token)}\n\n"
        f"The link works once, for {settings.SIGNUP_CONFIRM_HOURS} hours. If you did not ask "
        "for it, ignore this e-mail: nothing changes."
    )
    return send_mail("Switchyard: confirm your new e-mail address", body, None, [email])


def _digest(user) -> str:
    # The address the account has, as the link names it: the link is signed, not encrypted,
    # and a mistyped new address must not learn the account's current one.
    return salted_hmac(_SALT, user.email or "", algorithm="sha256").hexdigest()[:32]


def email_change_open(*, token: str) -> tuple[AbstractBaseUser, str]:
    """The account and new address a link names, if it can still be confirmed."""
    try:
        wanted = signing.loads(token, salt=_SALT, max_age=settings.SIGNUP_CONFIRM_HOURS * 3600)
    except signing.SignatureExpired:
        raise Gone(
            "This link has expired: ask for the change again on your account page.",
            code="email_change_expired",
        ) from None
    except signing.BadSignature:
        raise NotFound(
            "This link is not valid: copy the whole link from the e-mail.", code="not_found"
        ) from None
    user = get_user_model().objects.filter(pk=wanted["user"], is_active=True).first()
    if user is None:
        raise NotFound("This link is not valid: the account is gone.", code="not_found")
    if _digest(user) != wanted["was"]:
        raise Gone(
            "This link was used already, or the address changed since it was sent.",
            code="email_change_used",
        )
    return user, wanted["email"]


@transaction.atomic
def email_change_confirm(*, token: str) -> AbstractBaseUser:
    """Make the link's address the account's. One account per address: refused (409) when
    another account has it, checked under a lock on the address (and on its pending sign-ups,
    which signup_confirm locks before it checks)."""
    user, email = email_change_open(token=token)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(hashtext(lower(%s)))", [email])
    list(PendingSignup.objects.select_for_update().filter(email__iexact=email).order_by("pk"))
    user_model = get_user_model()
    locked = user_model.objects.select_for_update().get(pk=user.pk)
    if locked.email != user.email:
        raise Gone("This link was used already.", code="email_change_used")
    if user_model.objects.filter(email__iexact=email).exclude(pk=user.pk).exists():
        raise Conflict(
            "Another account uses this e-mail address: sign in to that one, or ask for the "
            "change with another address.",
            code="email_taken",
            field="email",
        )
    locked.email = email
    locked.save(update_fields=["email"])
    return locked
