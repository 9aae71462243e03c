"""Form fields the portal's pages share."""

import secrets
from datetime import UTC, date, datetime

from django import forms
from django.db import transaction

from config.api.idempotency import once_claim

__all__ = [
    "EARLIEST",
    "LATEST",
    "OnceField",
    "PortalDateField",
    "PortalDateTimeField",
    "once_or_refused",
    "within_bounds",
]

# What a date or time in the portal may be: nothing here is booked, searched or billed
# outside these years, and a time near datetime's own limits (9999-12-31) overflows the
# moment a period's length is added to it.
EARLIEST, LATEST = date(2000, 1, 1), date(2100, 1, 1)
_BOUNDS_MESSAGE = "Pick a date from 2000 to 2099."


def within_bounds(value: date | datetime) -> bool:
    day = value.date() if isinstance(value, datetime) else value
    return EARLIEST <= day < LATEST


class PortalDateTimeField(forms.DateTimeField):
    """A time (UTC when it carries no offset) from 2000 to 2099: a form error otherwise."""

    def to_python(self, value):
        try:
            result = super().to_python(value)
        except OverflowError:  # an offset that pushes past year 9999
            raise forms.ValidationError(_BOUNDS_MESSAGE, code="out_of_range") from None
        if result is not None and not within_bounds(result.astimezone(UTC)):
            raise forms.ValidationError(_BOUNDS_MESSAGE, code="out_of_range")
        return result


class PortalDateField(forms.DateField):
    """A day from 2000 to 2099: a form error otherwise."""

    def to_python(self, value):
        result = super().to_python(value)
        if result is not None and not within_bounds(result):
            raise forms.ValidationError(_BOUNDS_MESSAGE, code="out_of_range")
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
