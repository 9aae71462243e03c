"""config.api.serializers.Serializer: the base of every serializer of ours, whose instances
copy the declared fields by their attributes instead of DRF's deepcopy. Each instance must
still get fields of its own, bound to it, equal to DRF's copies; and no serializer of ours
may skip the base (one that did would only be slower, so this test says where)."""

import copy
import importlib
import pkgutil

import pytest
from rest_framework import serializers

from config.api.serializers import (
    MAX_ITEMS,
    MAX_UNKNOWN_REPORTED,
    LenientSerializer,
    Serializer,
)

PACKAGES = ("billing", "config", "inventory", "marketplace")


class _Child(Serializer):
    n = serializers.IntegerField()
    shown = serializers.SerializerMethodField()

    def get_shown(self, obj) -> str:
        return f"{self.context['who']}:{obj['n']}"


class _Parent(Serializer):
    name = serializers.CharField(max_length=5)
    tags = serializers.ListField(child=serializers.CharField(), required=False)
    child = _Child()
    children = _Child(many=True)
    kind = serializers.ChoiceField(choices=["a", "b"])
    greeting = serializers.SerializerMethodField()

    def get_greeting(self, obj) -> str:
        return f"hello {self.context['who']}"


def _our_serializers() -> list[type]:
    for package in PACKAGES:
        root = importlib.import_module(package)
        for module in pkgutil.walk_packages(root.__path__, f"{package}."):
            if ".migrations" in module.name or module.name.endswith(".tests"):
                continue
            importlib.import_module(module.name)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    return sorted(
        {
            cls
            for cls in subclasses(serializers.Serializer)
            if cls.__module__.split(".")[0] in PACKAGES
        },
        key=lambda cls: f"{cls.__module__}.{cls.__qualname__}",
    )


def test_each_instance_has_fields_of_its_own_bound_to_it():
    one, two = _Parent(context={"who": "one"}), _Parent(context={"who": "two"})
    for name in one.fields:
        assert one.fields[name] is not two.fields[name]
        assert one.fields[name].parent is one and two.fields[name].parent is two
        assert one.fields[name] is not _Parent._declared_fields[name]
    one.fields["name"].required = False  # an instance may change its own field
    assert two.fields["name"].required is True
    assert _Parent().fields["name"].required is True
    assert _Parent._declared_fields["name"].parent is None  # the template stays unbound


def test_context_reaches_method_fields_and_nested_serializers_of_each_instance():
    data = {"name": "x", "child": {"n": 1}, "children": [{"n": 2}, {"n": 3}], "kind": "a"}
    first = _Parent(data, context={"who": "first"}).data
    second = _Parent(data, context={"who": "second"}).data
    assert first["greeting"] == "hello first" and second["greeting"] == "hello second"
    assert first["child"]["shown"] == "first:1"
    assert [c["shown"] for c in second["children"]] == ["second:2", "second:3"]


def test_validation_errors_are_drfs():
    serializer = _Parent(
        data={"name": "toolong", "kind": "c", "child": {"n": "x"}, "children": []},
        context={"who": "v"},
    )
    assert not serializer.is_valid()
    assert set(serializer.errors) == {"name", "kind", "child"}
    assert "5 characters" in str(serializer.errors["name"][0])
    assert serializer.errors["child"] == {"n": ["A valid integer is required."]}
    ok = _Parent(data={"name": "ok", "kind": "b", "child": {"n": 1}, "children": []})
    assert ok.is_valid(), ok.errors
    assert ok.validated_data["kind"] == "b"


def _described(field) -> tuple:
    return (
        type(field),
        repr(field),
        field.field_name,
        field.source,
        field.source_attrs,
        field.label,
        field.required,
        field.read_only,
        field.write_only,
        field.allow_null,
        [type(v) for v in field.validators],
    )


def test_every_serializer_of_ours_uses_the_base_and_gets_drfs_fields():
    found = _our_serializers()
    assert len(found) > 50  # the import walk found the apps' serializers
    skipped = [f"{c.__module__}.{c.__qualname__}" for c in found if not issubclass(c, Serializer)]
    assert skipped == []
    for cls in found:
        if cls is Serializer:
            continue
        ours = cls()
        drfs = cls()
        drf_fields = copy.deepcopy(cls._declared_fields)
        for name, field in drf_fields.items():
            field.bind(name, drfs)
        assert {n: _described(f) for n, f in ours.fields.items()} == {
            n: _described(f) for n, f in drf_fields.items()
        }, cls


@pytest.mark.parametrize("field", [serializers.ListField(child=serializers.IntegerField()),
                                   _Child(), _Child(many=True)])  # fmt: skip
def test_fields_holding_fields_are_copied_whole(field):
    class _Holder(Serializer):
        held = field

    one, two = _Holder(), _Holder()
    held_one, held_two = one.fields["held"], two.fields["held"]
    assert held_one is not held_two
    inner = "child" if hasattr(held_one, "child") else None
    if inner:
        assert getattr(held_one, inner) is not getattr(held_two, inner)


class _CountedInteger(serializers.IntegerField):
    """An IntegerField that counts the items it reads (class-wide: fields are copied)."""

    reads = 0

    def to_internal_value(self, data):
        type(self).reads += 1
        return super().to_internal_value(data)


class _Bounded(Serializer):
    name = serializers.CharField(max_length=5)
    ports = serializers.ListField(child=_CountedInteger(), max_length=16)
    tags = serializers.ListField(child=_CountedInteger(), required=False)
    env = serializers.DictField(child=_CountedInteger(), required=False)


class _LenientBounded(LenientSerializer):
    tags = serializers.ListField(child=_CountedInteger(), required=False)


@pytest.fixture
def reads():
    _CountedInteger.reads = 0
    yield lambda: _CountedInteger.reads


def test_a_list_over_its_max_length_is_refused_unread_beside_the_other_errors(reads):
    # DRF read all 400,000 items (an error built for each) before looking at max_length.
    serializer = _Bounded(data={"name": "toolong", "ports": ["x"] * 400_000})
    assert not serializer.is_valid()
    assert reads() == 0
    assert set(serializer.errors) == {"name", "ports"}
    assert serializer.errors["ports"][0].code == "max_length"
    assert str(serializer.errors["ports"][0]) == "Ensure this field has no more than 16 elements."


def _items(field: str, count: int):
    return [1] * count if field == "tags" else {f"K{i}": 1 for i in range(count)}


@pytest.mark.parametrize("field", ["tags", "env"])
def test_a_collection_without_a_max_length_takes_at_most_max_items(reads, field):
    serializer = _Bounded(data={"name": "ok", "ports": [1], field: _items(field, MAX_ITEMS + 1)})
    assert not serializer.is_valid()
    assert reads() == 1  # the one port
    assert list(serializer.errors) == [field]
    assert serializer.errors[field][0].code == "max_length"
    assert f"no more than {MAX_ITEMS} elements" in str(serializer.errors[field][0])
    at_most = _Bounded(data={"name": "ok", "ports": [1], field: _items(field, MAX_ITEMS)})
    assert at_most.is_valid(), at_most.errors
    assert len(at_most.validated_data[field]) == MAX_ITEMS


def test_the_agents_lenient_protocol_has_no_ceiling_of_its_own():
    serializer = _LenientBounded(data={"tags": [1] * (MAX_ITEMS + 1)})
    assert serializer.is_valid(), serializer.errors
    assert len(serializer.validated_data["tags"]) == MAX_ITEMS + 1


def test_at_most_max_unknown_reported_unknown_keys_are_named():
    body = {"name": "ok", "ports": [1], **{f"k{i:06d}": 1 for i in range(200_000)}}
    serializer = _Bounded(data=body)
    assert not serializer.is_valid()
    assert sorted(serializer.errors) == [f"k{i:06d}" for i in range(MAX_UNKNOWN_REPORTED)]
    assert {e[0].code for e in serializer.errors.values()} == {"unknown_field"}


class _Flags(Serializer):
    enabled = serializers.BooleanField(required=False)
    flags = serializers.ListField(child=serializers.BooleanField(), required=False)


@pytest.mark.parametrize("value", ["yes", "true", "on", 1, 0, "0", "False"])
def test_a_boolean_in_a_json_body_is_true_or_false_not_a_word_or_a_number(value):
    # DRF read "yes", "on" and 1 as true: {"enabled": "no"} was a typo away from "on".
    for body in ({"enabled": value}, {"flags": [True, value]}):
        serializer = _Flags(data=body)
        assert not serializer.is_valid()
        (field,) = serializer.errors
        assert serializer.errors[field][0].code == "invalid"
        assert str(serializer.errors[field][0]) == "Must be a valid boolean."


def test_a_boolean_in_a_query_string_is_still_read_from_text():
    from django.http import QueryDict

    serializer = _Flags(data=QueryDict("enabled=true"))
    assert serializer.is_valid(), serializer.errors
    assert serializer.validated_data["enabled"] is True
    assert _Flags(data={"enabled": False}).is_valid()


def test_the_agents_lenient_protocol_reads_booleans_as_drf_does():
    class _LenientFlags(LenientSerializer):
        enabled = serializers.BooleanField()

    serializer = _LenientFlags(data={"enabled": 1})
    assert serializer.is_valid(), serializer.errors
