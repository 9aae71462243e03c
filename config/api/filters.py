"""Filter plumbing the API's filter sets share (django-filter)."""

import django_filters
from django import forms
from django_filters.fields import IsoDateTimeField

from config.dates import OUT_OF_RANGE, within_bounds

__all__ = ["BoundedIsoDateTimeFilter", "StrictBooleanFilter"]


class _StrictNullBooleanField(forms.NullBooleanField):
    """true/false (or 1/0); empty is no filter; anything else is refused, where Django's
    select widget would read it as empty and the list would come back unfiltered."""

    widget = forms.TextInput
    _VALUES = {"true": True, "1": True, "false": False, "0": False}

    def to_python(self, value):
        if value in (None, ""):
            return None
        if isinstance(value, bool):
            return value
        try:
            return self._VALUES[str(value).strip().lower()]
        except KeyError:
            raise forms.ValidationError("Use true or false.", code="invalid") from None

    def validate(self, value):
        pass


class StrictBooleanFilter(django_filters.BooleanFilter):
    field_class = _StrictNullBooleanField


class _BoundedIsoDateTimeField(IsoDateTimeField):
    """An ISO 8601 time from 2000 to 2099 (config.dates), as every other time the API reads."""

    def to_python(self, value):
        try:
            parsed = super().to_python(value)
            if parsed is None or within_bounds(parsed):
                return parsed
        except OverflowError:  # an offset that takes it past year 9999
            pass
        raise forms.ValidationError(OUT_OF_RANGE, code="out_of_range")


class BoundedIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    field_class = _BoundedIsoDateTimeField
