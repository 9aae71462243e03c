"""The import reads its fields' rules (length, digits, range, choices, optional or not) from
the models, so a change to a model field reaches the import without a second edit."""

from decimal import Decimal

import pytest
from django.core.validators import MaxValueValidator, MinValueValidator

from inventory import importer
from inventory.models import GpuModel, Node, Site

KINDS = {"gpu_model": GpuModel, "site": Site, "node": Node}
# File fields that are not a column of their model (the file's own shorthand or a key).
NOT_COLUMNS = {("node", "gpu_model"), ("node", "gpu_count"), ("node", "gpu_serials")}


def _specs() -> dict[str, dict[str, importer.Spec]]:
    gpu_models, sites, nodes = importer.field_specs()
    return {"gpu_model": gpu_models, "site": sites, "node": nodes}


def _column_fields():
    return [
        (kind, name)
        for kind, specs in _specs().items()
        for name in specs
        if (kind, name) not in NOT_COLUMNS
    ]


@pytest.mark.parametrize(("kind", "name"), _column_fields())
def test_each_field_is_optional_exactly_when_its_model_field_is(kind, name):
    spec = _specs()[kind][name]
    model_field = KINDS[kind]._meta.get_field(name)
    optional = model_field.blank or model_field.null or model_field.has_default()
    assert spec.required is not optional


@pytest.mark.parametrize(
    ("kind", "name"),
    [(k, n) for k, n in _column_fields() if KINDS[k]._meta.get_field(n).get_internal_type()
     in {"CharField", "SlugField"} and not KINDS[k]._meta.get_field(n).choices],
)  # fmt: skip
def test_a_text_field_takes_its_column_length_and_no_more(kind, name):
    parse = _specs()[kind][name].parse
    length = KINDS[kind]._meta.get_field(name).max_length
    fits = {"country": "US", "energy_currency": "usd"}.get(name, "a" * length)
    assert parse(fits) == fits.upper() if name == "country" else parse(fits) == fits
    if name not in {"country", "energy_currency"}:  # their format fixes the length
        with pytest.raises(importer._Bad, match=f"at most {length} characters"):
            parse("a" * (length + 1))


def test_a_shorter_column_reaches_the_import(monkeypatch):
    monkeypatch.setattr(Site._meta.get_field("name"), "max_length", 10)
    monkeypatch.setattr(Node._meta.get_field("hostname"), "max_length", 5)
    _, sites, nodes = importer.field_specs()

    assert sites["name"].parse("x" * 10) == "x" * 10
    with pytest.raises(importer._Bad, match="at most 10 characters"):
        sites["name"].parse("x" * 11)
    with pytest.raises(importer._Bad, match="at most 5 characters"):
        nodes["hostname"].parse("abl-001")


def test_a_new_range_reaches_the_import(monkeypatch):
    pue = Site._meta.get_field("pue")
    monkeypatch.setattr(pue, "validators", [MinValueValidator(1), MaxValueValidator(3)])
    cores = Node._meta.get_field("cpu_cores")
    monkeypatch.setattr(cores, "validators", [MinValueValidator(4), MaxValueValidator(512)])
    _, sites, nodes = importer.field_specs()

    assert sites["pue"].parse("2.50") == Decimal("2.50")
    with pytest.raises(importer._Bad, match="between 1 and 3, got 3.5"):
        sites["pue"].parse("3.5")
    with pytest.raises(importer._Bad, match="between 4 and 512, got 2"):
        nodes["cpu_cores"].parse(2)
    assert nodes["cpu_cores"].parse(512) == 512


def test_new_digits_and_choices_reach_the_import(monkeypatch):
    monkeypatch.setattr(Site._meta.get_field("renewable_share"), "decimal_places", 4)
    monkeypatch.setattr(Site._meta.get_field("renewable_share"), "max_digits", 5)
    monkeypatch.setattr(
        Site._meta.get_field("cooling"), "choices", [("air", "Air"), ("oil", "Oil bath")]
    )
    _, sites, _ = importer.field_specs()

    assert sites["renewable_share"].parse("0.1234") == Decimal("0.1234")
    assert sites["cooling"].parse("Oil") == "oil"
    with pytest.raises(importer._Bad, match="must be one of air, oil, got 'immersion'"):
        sites["cooling"].parse("immersion")


def test_the_models_own_limits_are_the_imports(db):
    gpu_models, sites, nodes = importer.field_specs()
    with pytest.raises(importer._Bad, match="between 1 and"):
        gpu_models["memory_gb"].parse(0)  # a GPU has memory: the model says at least 1
    with pytest.raises(importer._Bad, match="between 0 and 2000, got 2001"):
        sites["grid_carbon_g_per_kwh"].parse(2001)
    with pytest.raises(importer._Bad, match="must be one of available, draining, maintenance"):
        nodes["status"].parse("retired")  # a node is not imported retired or offline
    assert (
        sites["energy_currency"].default == "usd" == Site._meta.get_field("energy_currency").default
    )
