"""A form that acts once, however often it is sent (a double click, a reload of the answer):
the portal's top-ups and webhook endpoints, the admin's credits and refunds."""

import secrets

from django import forms
from django.db import transaction

from config.api.idempotency import once_claim

__all__ = ["OnceField", "once_or_refused"]


class OnceField(forms.CharField):
    """A form's one-time key (hidden, new each time the form is shown): the action it asks
    for is taken once, however often the same form is sent (once_or_refused)."""

    widget = forms.HiddenInput

    def __init__(self, **kwargs):
        super().__init__(
            max_length=64, initial=lambda: secrets.token_urlsafe(16), required=True, **kwargs
        )


@transaction.atomic
def once_or_refused(request, organization, key: str, action):
    """Run `action()` unless this form's key was already used for it; None when it was. In
    one transaction with the claim: a refused or failed action frees the key again."""
    if not once_claim(organization=organization, principal=f"user:{request.user.pk}",
                      key=f"form:{key}"):  # fmt: skip
        return None
    return action()
