"""Form fields the portal's pages share."""

import secrets

from django import forms
from django.db import transaction

from config.api.idempotency import once_claim
from config.dates import OUT_OF_RANGE, within_bounds

__all__ = [
    "OnceField",
    "PortalDateField",
    "PortalDateTimeField",
    "once_or_refused",
]


class PortalDateTimeField(forms.DateTimeField):
    """A time (UTC when it carries no offset) from 2000 to 2099: a form error otherwise."""

    def to_python(self, value):
        try:
            result = super().to_python(value)
        except OverflowError:  # an offset that pushes past year 9999
            raise forms.ValidationError(OUT_OF_RANGE, code="out_of_range") from None
        if result is not None and not within_bounds(result):
            raise forms.ValidationError(OUT_OF_RANGE, code="out_of_range")
        return result


class PortalDateField(forms.DateField):
    """A day from 2000 to 2099: a form error otherwise."""

    def to_python(self, value):
        result = super().to_python(value)
        if result is not None and not within_bounds(result):
            raise forms.ValidationError(OUT_OF_RANGE, code="out_of_range")
        return result


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
