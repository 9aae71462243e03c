"""Filter plumbing the API's filter sets share (django-filter)."""

import django_filters
from django import forms

__all__ = ["StrictBooleanFilter"]


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
