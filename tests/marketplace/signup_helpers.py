"""Sign-up through the mailed link, for tests that need an account made the portal's way."""

import re

from django.test import TestCase

from tests.clients import HttpsClient

PASSWORD = "a-long-passphrase-1"
CONFIRM_LINK = re.compile(r"https?://\S+?(/signup/confirm/[0-9a-f]{64})\b")


def signup_form(**changes) -> dict:
    return {
        "username": "grace",
        "email": "grace@example.com",
        "organization": "Hopper Compute",
        "password1": PASSWORD,
        "password2": PASSWORD,
        **changes,
    }


def signup_post(client: HttpsClient, path: str = "/signup", **data):
    """POST the sign-up form and run what its transaction queued once it commits (the mail)."""
    with TestCase.captureOnCommitCallbacks(execute=True):
        return client.post(path, data)


def confirm_path(message) -> str:
    """The /signup/confirm/<token> path in a sign-up mail."""
    return CONFIRM_LINK.search(message.body).group(1)
