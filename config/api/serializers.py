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
"""

import copy

from rest_framework import serializers
from rest_framework.fields import Field

__all__ = ["Serializer"]


def _field_copy(field: Field) -> Field:
    if isinstance(field, serializers.BaseSerializer) or any(
        hasattr(field, name) for name in ("child", "child_relation")
    ):
        return copy.deepcopy(field)
    clone = object.__new__(type(field))
    clone.__dict__.update(field.__dict__)
    return clone


class Serializer(serializers.Serializer):
    def get_fields(self) -> dict[str, Field]:
        return {name: _field_copy(field) for name, field in self._declared_fields.items()}
