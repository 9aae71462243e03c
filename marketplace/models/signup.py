"""A sign-up waiting for its e-mail address to be proved (marketplace.services.organizations:
signup_request, signup_confirm)."""

from django.db import models

from marketplace import ids

__all__ = ["PendingSignup", "SIGNUP_NEXT_MAX_LENGTH"]

SIGNUP_NEXT_MAX_LENGTH = 2000


def pending_signup_id() -> str:
    return ids.new_public_id("sgn")


class PendingSignup(models.Model):
    """What a sign-up form gave, kept until the link mailed to its address is confirmed.

    No account exists until then, so the form answers the same whether or not the address
    has one. The link's token is derived from public_id (as an invitation's is): only its
    SHA-256 is stored. The password is stored already hashed (make_password), and blanked
    once the account is created. Retention deletes a row a day after it expired.

    One made through an invitation's link joins that organisation instead of creating one
    (`invitation`, `organization_name` blank). `next_url` is where the sign-up page was asked
    to go afterwards (?next=), kept only if it pointed at this site, and checked again when
    followed.
    """

    public_id = models.CharField(
        max_length=32, unique=True, default=pending_signup_id, editable=False
    )
    email = models.EmailField()
    username = models.CharField(max_length=150)
    organization_name = models.CharField(
        max_length=100, blank=True, help_text="Blank when joining through an invitation."
    )
    invitation = models.ForeignKey(
        "marketplace.Invitation",
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="+",
        help_text="The invitation whose organisation the account joins, if any.",
    )
    next_url = models.CharField(
        max_length=SIGNUP_NEXT_MAX_LENGTH,
        blank=True,
        default="",
        help_text="Where to go once the account is created (a URL on this site).",
    )
    password = models.CharField(max_length=128, help_text="Hashed; blank once used.")
    token_hash = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField(db_index=True)
    used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["email"], name="pendingsignup_email_idx")]

    def __str__(self) -> str:
        return f"{self.username} <{self.email}>"
