"""Model instances from plain SQL, for the few statements on a hot path written without the ORM.

Compiling an ORM query costs more CPU than running a simple statement (docs/benchmarks.md
has the measurement on the reservation path). Where a request makes such a statement on every
call, it is written as SQL and the rows are turned back into model instances here, converted
exactly as the ORM converts them (JSON fields, for one), so callers cannot tell the difference.
"""

from functools import cache
from typing import NamedTuple

from django.db import connection
from django.db.models import Model
from django.db.models.base import ModelState
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.query_utils import DeferredAttribute
from django.db.models.signals import post_init, pre_init

__all__ = ["model_columns", "model_from_row", "model_insert"]


def model_columns(model: type[Model], alias: str) -> str:
    """The model's columns, qualified with `alias`, in the order model_from_row expects."""
    return ", ".join(f'{alias}."{f.column}"' for f in model._meta.concrete_fields)


def model_from_row(model: type[Model], values) -> Model:
    """An instance loaded from the values of model_columns(model, …), as a query would load it."""
    plan = _plan(model)
    values = [
        convert(v, None, connection) if convert else v
        for convert, v in zip(plan.converters, values, strict=True)
    ]
    return _loaded(model, plan, values)


class _Plan(NamedTuple):
    attnames: list[str]
    converters: list  # each field's from_db_value, or None
    plain: bool  # Model.from_db, and only the ORM's own descriptors on the fields


@cache
def _plan(model: type[Model]) -> _Plan:
    fields = model._meta.concrete_fields
    plain = model.from_db.__func__ is Model.from_db.__func__ and all(
        type(model.__dict__.get(f.attname)) in (DeferredAttribute, ForeignKeyDeferredAttribute)
        for f in fields
    )
    return _Plan(
        [f.attname for f in fields], [getattr(f, "from_db_value", None) for f in fields], plain
    )


def _loaded(model: type[Model], plan: _Plan, values: list) -> Model:
    """Model.from_db(alias, every field, values). For a plain model, with nobody listening
    to pre_init or post_init, the same instance is built without Model.__init__, whose
    setattr per field and two signal sends cost more than the statement on the hot paths:
    the values go into the instance's __dict__ in field order, as __init__ would put them
    (a foreign key's descriptor only clears a cache a new instance does not have)."""
    if not plan.plain or pre_init.receivers or post_init.receivers:
        return model.from_db(connection.alias, plan.attnames, values)
    instance = model.__new__(model)
    state = instance._state = ModelState()
    state.adding, state.db = False, connection.alias
    instance.__dict__.update(zip(plan.attnames, values, strict=True))
    return instance


@cache
def _insert_sql(model: type[Model]) -> str:
    meta, quote = model._meta, connection.ops.quote_name
    columns = [quote(f.column) for f in meta.concrete_fields if not f.primary_key]
    return (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(columns)})"
        f" VALUES ({', '.join(['%s'] * len(columns))}) RETURNING {quote(meta.pk.column)}"
    )


def model_insert(instance: Model) -> Model:
    """Insert a new, unsaved instance as `save(force_insert=True)` would, and return it saved.

    The values are prepared as the ORM prepares them (each field's `pre_save`, so
    `auto_now_add` is set, and `get_db_prep_save`); the statement is built once per model,
    not compiled per call. The instance returned is a new one, loaded as a query loads a row
    (`Model.from_db`, see _loaded), holding the related objects the given one had cached.
    Expressions as values (a `db_default` left to the database, say), models with several
    tables and generated columns are the ORM's to write.
    """
    model = type(instance)
    meta = model._meta
    if meta.parents or any(getattr(f, "generated", False) for f in meta.concrete_fields):
        raise TypeError(f"model_insert cannot write {model.__name__}: use the ORM")
    params = []
    for field in meta.concrete_fields:
        if field.primary_key:
            continue
        value = field.pre_save(instance, add=True)
        if hasattr(value, "resolve_expression"):
            raise TypeError(f"{model.__name__}.{field.name} is an expression: use the ORM")
        params.append(field.get_db_prep_save(value, connection))
    with connection.cursor() as cur:
        cur.execute(_insert_sql(model), params)
        (pk,) = cur.fetchone()
    saved = _loaded(
        model,
        _plan(model),
        [pk if f.primary_key else getattr(instance, f.attname) for f in meta.concrete_fields],
    )
    for field in meta.concrete_fields:
        if field.is_relation and field.is_cached(instance):
            field.set_cached_value(saved, field.get_cached_value(instance))
    return saved
