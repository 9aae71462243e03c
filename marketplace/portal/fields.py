"""Form fields the portal's pages share."""

import re

from django import forms

from config.dates import OUT_OF_RANGE, within_bounds

__all__ = ["PortalAmountField", "PortalDateField", "PortalDateTimeField", "PortalMinuteField"]

_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


class PortalAmountField(forms.DecimalField):
    """An amount of money typed as ASCII digits with an optional point, as the API reads one
    (config.api.serializers): Decimal() alone would also take "1e3" as 1000 and other
    scripts' digits ("１００"), so a typo could charge or set an amount nobody typed."""

    def to_python(self, value):
        if isinstance(value, str) and value.strip() and not _DECIMAL.fullmatch(value.strip()):
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return super().to_python(value)


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


class PortalMinuteField(PortalDateTimeField):
    """A time to the minute, as the portal's pickers give it: seconds are refused, not kept
    unseen (a forged or typed value would otherwise book, extend or list to the second)."""

    def to_python(self, value):
        result = super().to_python(value)
        if result is not None and (result.second or result.microsecond):
            raise forms.ValidationError(
                "Give a time to the minute, without seconds.", code="not_whole_minute"
            )
        return result


class PortalDateField(forms.DateField):
    """A day from 2000 to 2099: a form error otherwise."""

    def to_python(self, value):
        result = super().to_python(value)
        if result is not None and not within_bounds(result):
            raise forms.ValidationError(OUT_OF_RANGE, code="out_of_range")
        return result
