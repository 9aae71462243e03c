"""The base of every serializer of ours: DRF's Serializer, its fields copied cheaply.

DRF gives each serializer instance its own copy of the declared fields by `deepcopy`, which
builds every field again from its constructor's arguments: on a reservation create (input,
event, response) that was about a tenth of the request's Python. A declared field is a
template that is never bound, and binding only sets attributes on the copy (its name, parent,
label and source), so a plain field is copied here by its attributes, sharing what its
constructor derived (validators, error messages, choices), which nothing changes afterwards.
A field that holds other fields (a nested serializer, a list or dict of a child field, a
related field's child) is still deep-copied, since its children are bound to it.

A serializer that changes a field's shared state (appends to its validators, edits its
choices in place) would change it for every instance: assign a new value instead.

Input: a JSON object with a key the serializer does not take is refused (400 unknown_field,
naming it), at every level, as Stripe refuses an unknown parameter: DRF would drop it, and a
misspelt `min_reliabilty` would book without the floor the caller asked for. A query
string's keys are not checked (paging and filter parameters are read elsewhere), nor are those
of a serializer that
sets `refuse_unknown_fields = False` (the site agent's protocol: a newer agent may send more
than this server reads).

A whole number given as a string is read only as ASCII digits with an optional sign, and a
decimal as ASCII digits with an optional point (no exponent): Python's int() and Decimal(),
which DRF's fields call, also read "1_0" as 10, "1e3" as 1000 and other scripts' digits. The
same holds inside lists and dicts of numbers, and a whole number is not a JSON fraction (2.0).
Text is a JSON string: a number or a boolean sent for it is refused, not kept as "5" or "True"
(not in the site agents' lenient protocol, whose agents send driver event codes as numbers).
These refusals come in one answer with DRF's own errors for the other fields.
Dates and times are read from 2000 to 2099 only (config.dates).

A list or an object given for a field is counted before its items are read: DRF reads every
item (an error built for each bad one) before it checks the field's max_length, so a 2.5 MB
body of 400,000 ports cost seconds of CPU to refuse. One over the field's max_length (else,
in the public API's serializers, over MAX_ITEMS) is refused unread (400 max_length). An
answer names at most MAX_UNKNOWN_REPORTED unknown keys of one object, so a body of 200,000
of them is not answered with 23 MB.

Output: an amount of money is written by AmountField, in its currency's own decimals.
"""

import copy
import re
from datetime import date
from decimal import Decimal

from django.http import QueryDict
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail, ValidationError
from rest_framework.fields import Field, get_attribute
from rest_framework.settings import api_settings

from config.currency import money_round
from config.dates import OUT_OF_RANGE, within_bounds

__all__ = [
    "AmountField",
    "LenientSerializer",
    "MAX_ITEMS",
    "MAX_UNKNOWN_REPORTED",
    "Serializer",
    "amount_text",
]

# The most items a list or object field of the public API takes where it sets no max_length
# of its own (more than any documented field needs: event types, scopes, environment).
MAX_ITEMS = 1000
MAX_UNKNOWN_REPORTED = 20


_WHOLE_NUMBER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
# The strings each kind of field reads, beyond DRF's own checks.
_STRICT = ((serializers.IntegerField, _WHOLE_NUMBER), (serializers.DecimalField, _DECIMAL))


def _field_copy(field: Field) -> Field:
    if isinstance(field, serializers.BaseSerializer) or any(
        hasattr(field, name) for name in ("child", "child_relation")
    ):
        return copy.deepcopy(field)
    clone = object.__new__(type(field))
    clone.__dict__.update(field.__dict__)
    return clone


class Serializer(serializers.Serializer):
    refuse_unknown_fields = True

    def get_fields(self) -> dict[str, Field]:
        return {name: _field_copy(field) for name, field in self._declared_fields.items()}

    def to_internal_value(self, data):
        # What DRF would let through (an unknown key, a loosely read number) is refused beside
        # DRF's own errors, so one answer names every field that is wrong.
        oversized = self._oversized(data) if isinstance(data, dict) else {}
        if oversized:  # left out unread; the other fields are still checked, in one answer
            data = {key: value for key, value in data.items() if key not in oversized}
        refused = self._strict_errors(data) if isinstance(data, dict) else {}  # a QueryDict too
        refused.update(oversized)
        try:
            result = super().to_internal_value(data)
        except OverflowError:  # a time whose offset takes it past year 9999
            raise ValidationError({api_settings.NON_FIELD_ERRORS_KEY: [
                ErrorDetail(OUT_OF_RANGE, code="out_of_range")]}) from None  # fmt: skip
        except ValidationError as exc:
            if refused and isinstance(exc.detail, dict):
                raise ValidationError({**exc.detail, **refused}) from None
            raise
        if refused:
            raise ValidationError(refused)
        for name, field in self.fields.items():
            value = result.get(field.source) if isinstance(result, dict) else None
            if isinstance(field, serializers.DateTimeField | serializers.DateField) and (
                isinstance(value, date) and not within_bounds(value)
            ):
                raise ValidationError({name: [ErrorDetail(OUT_OF_RANGE, code="out_of_range")]})
        return result

    def _oversized(self, data: dict) -> dict[str, list[ErrorDetail]]:
        """The list and object fields given more items than they take, counted unread."""
        if isinstance(data, QueryDict):
            return {}
        refused = {}
        for name, field in self.fields.items():
            value = data.get(name)
            collection = isinstance(field, serializers.ListField | serializers.DictField)
            if field.read_only or not collection or not isinstance(value, list | dict):
                continue  # not a collection field, or DRF says what is wrong with the value
            most = getattr(field, "max_length", None)
            if most is None and self.refuse_unknown_fields:
                most = MAX_ITEMS
            if most is not None and len(value) > most:
                message = serializers.ListField.default_error_messages["max_length"]
                refused[name] = [ErrorDetail(message.format(max_length=most), code="max_length")]
        return refused

    def _strict_errors(self, data: dict) -> dict[str, list[ErrorDetail]]:
        fields, refused = self.fields, {}
        if self.refuse_unknown_fields and not isinstance(data, QueryDict):
            unknown = sorted(str(k) for k in data if k not in fields or fields[k].read_only)
            takes = ", ".join(sorted(n for n, f in fields.items() if not f.read_only))
            for key in unknown[:MAX_UNKNOWN_REPORTED]:
                name = key[:100]
                refused[name] = [ErrorDetail(f"Unknown field {name!r}; this request takes "
                                             f"{takes}.", code="unknown_field")]  # fmt: skip
        strict = self.refuse_unknown_fields  # the agents' protocol sends Xid codes as numbers
        # In a JSON body a boolean is true or false; a query string can only send text.
        json_body = strict and not isinstance(data, QueryDict)
        for name, field in fields.items():
            if name not in data:
                continue
            if (error := _loose_number(field, data.get(name), strict, json_body)) is not None:
                refused[name] = [error]
        return refused


def _loose_number(
    field: Field, value, text_strict: bool = True, json_body: bool = False
) -> ErrorDetail | None:
    """The error for a value DRF would read loosely: a whole number or decimal string beyond
    ASCII digits (also inside a list or a dict of them), a JSON fraction for a whole number,
    a number or a boolean for text, and in a JSON body anything but true or false for a
    boolean (DRF reads "yes", "on", 1 and "0" as booleans)."""
    child = getattr(field, "child", None)
    if child is not None and not isinstance(field, serializers.BaseSerializer):
        items = list(value.values()) if isinstance(value, dict) else value
        if not isinstance(items, list):
            return None
        return next(
            (
                e
                for v in items
                if (e := _loose_number(child, v, text_strict, json_body)) is not None
            ),
            None,
        )
    if isinstance(field, serializers.IntegerField) and isinstance(value, float):
        return ErrorDetail(field.error_messages["invalid"], code="invalid")
    # DRF would keep {"reason": 5} as "5" and true as "True" (text is sent as text), and read
    # "yes" or 1 as true (in JSON a boolean is sent as one).
    sent_as = None
    if text_strict and isinstance(field, serializers.CharField):
        sent_as = str
    elif json_body and isinstance(field, serializers.BooleanField):
        sent_as = bool
    if sent_as is not None and value is not None and not isinstance(value, sent_as):
        return ErrorDetail(field.error_messages["invalid"], code="invalid")
    if isinstance(value, str):
        for kind, pattern in _STRICT:
            if isinstance(field, kind) and not pattern.fullmatch(value.strip()):
                return ErrorDetail(field.error_messages["invalid"], code="invalid")  # DRF's words
    return None


class LenientSerializer(Serializer):
    """For a protocol whose newer clients may send more than this server reads (the site
    agent's): a key it does not take is ignored, as DRF does, not refused."""

    refuse_unknown_fields = False


def amount_text(amount: Decimal | int, currency: str) -> str:
    """An amount in major units as the API writes money: a decimal string in the currency's
    own decimals ("32.00" in dollars, "241500" in yen), as billing writes balances."""
    # bool is an int; a float has no exact decimal meaning: both are bugs, said loudly.
    if isinstance(amount, bool) or not isinstance(amount, Decimal | int):
        raise TypeError(f"an amount must be Decimal or int, not {type(amount).__name__}")
    return format(money_round(Decimal(amount), currency), "f")


# As a DecimalField(max_digits=14, decimal_places=2) is documented: a string of at most two
# decimals, which a currency without a minor unit writes with none.
_AMOUNT_SCHEMA = {"type": "string", "format": "decimal", "pattern": r"^-?\d{0,12}(?:\.\d{0,2})?$"}


@extend_schema_field(_AMOUNT_SCHEMA)
class AmountField(Field):
    """An amount of money held as a Decimal (or int) in major units, written by amount_text.
    Read-only. The currency is read from the object at `currency_source` (a dotted attribute
    or key path, default "currency").

    The amount should already be in the currency's minor unit (a total, a refund); a finer one
    is rounded by the one money rule (money_round), never by a rule of its own."""

    def __init__(self, *, currency_source: str = "currency", **kwargs):
        kwargs["read_only"] = True
        self.currency_attrs = currency_source.split(".")
        super().__init__(**kwargs)

    def get_attribute(self, instance):
        return self.amount_with_currency(instance, super().get_attribute(instance))

    def amount_with_currency(self, instance, amount) -> tuple[Decimal | int, str] | None:
        """The (amount, currency) pair to_representation writes; None stays None (null)."""
        if amount is None:
            return None
        return amount, get_attribute(instance, self.currency_attrs)

    def to_representation(self, value: tuple[Decimal | int, str]) -> str:
        return amount_text(*value)
