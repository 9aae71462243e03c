"""Model instances from plain SQL, for the few statements on a hot path written without the ORM.

Compiling an ORM query costs more CPU than running a simple statement (docs/benchmarks.md
has the measurement on the reservation path). Where a request makes such a statement on every
call, it is written as SQL and the rows are turned back into model instances here, converted
exactly as the ORM converts them (JSON fields, for one), so callers cannot tell the difference.
"""

import random
import time
from collections.abc import Callable
from functools import cache, wraps

from django.db import OperationalError, connection, transaction
from django.db.models import Model

__all__ = ["model_columns", "model_from_row", "model_insert", "retried_on_deadlock"]

# A deadlock's victim (40P01) or a serialization failure (40001): PostgreSQL rolled the work
# back, so it can simply be done again.
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})
# The pause before attempt n + 1 is n to 2n times this: the winner has only just been woken,
# and a retry at once can take a row it waits for first (a row that looks free is taken
# without queueing), closing the same circle again, a victim once more.
RETRY_BACKOFF_SECONDS = 0.02


def model_columns(model: type[Model], alias: str) -> str:
    """The model's columns, qualified with `alias`, in the order model_from_row expects."""
    return ", ".join(f'{alias}."{f.column}"' for f in model._meta.concrete_fields)


def _loaded(field, value):
    """A column's value as a query loads it (the field's from_db_value, where it has one)."""
    return (
        field.from_db_value(value, None, connection) if hasattr(field, "from_db_value") else value
    )


def model_from_row(model: type[Model], values) -> Model:
    """An instance loaded from the values of model_columns(model, …), as a query would load it."""
    fields = model._meta.concrete_fields
    values = [_loaded(f, v) for f, v in zip(fields, values, strict=True)]
    return model.from_db(connection.alias, [f.attname for f in fields], values)


@cache
def _insert_sql(model: type[Model]) -> str:
    meta, quote = model._meta, connection.ops.quote_name
    columns = [quote(f.column) for f in meta.concrete_fields if not f.primary_key]
    returning = [quote(f.column) for f in meta.db_returning_fields]  # the pk first
    return (
        f"INSERT INTO {quote(meta.db_table)} ({', '.join(columns)})"
        f" VALUES ({', '.join(['%s'] * len(columns))}) RETURNING {', '.join(returning)}"
    )


def model_insert(instance: Model) -> Model:
    """Insert a new, unsaved instance as `save(force_insert=True)` would, and return it saved.

    The values are prepared as the ORM prepares them (each field's `pre_save`, so
    `auto_now_add` is set, and `get_db_prep_save`); the statement is built once per model,
    not compiled per call. What the database sets itself comes back with the pk (fields with
    `db_returning`, such as an event's writing transaction id, set by its trigger). The instance returned is a new one, loaded as a query loads a row
    (`Model.from_db`), holding the related objects the given one had cached. Expressions as
    values (a `db_default` left to the database, say), models with several tables and
    generated columns are the ORM's to write.
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
        row = cur.fetchone()
    # The pk, and what the database sets itself (fields with db_returning: a trigger's value).
    returned = {
        f.attname: _loaded(f, value) for f, value in zip(meta.db_returning_fields, row, strict=True)
    }
    names = [f.attname for f in meta.concrete_fields]
    saved = model.from_db(
        connection.alias,
        names,
        [returned.get(f.attname, getattr(instance, f.attname)) for f in meta.concrete_fields],
    )
    for field in meta.concrete_fields:
        if field.is_relation and field.is_cached(instance):
            field.set_cached_value(saved, field.get_cached_value(instance))
    return saved


def retried_on_deadlock(attempts: int = 3) -> Callable:
    """Run the decorated function in a savepoint (a transaction of its own outside one) and
    run it again, up to `attempts` times in all, when PostgreSQL picks it as a deadlock's
    victim or refuses it for serialization: the savepoint's rollback undid all it wrote and
    released its locks, and Django drops the on_commit callbacks it registered. It pauses
    first, longer after each attempt (RETRY_BACKOFF_SECONDS), so the winner takes its locks.
    Any other error, and the last attempt's, propagates.

    For writes that must lock rows in an order other paths cannot share (a site's nodes, then
    the reservations on them, against a worker holding a reservation and waiting for a node):
    every caller, API, admin or task, gets the same retry from the service."""

    def decorate(function: Callable) -> Callable:
        @wraps(function)
        def retrying(*args, **kwargs):
            for attempt in range(1, attempts + 1):
                try:
                    with transaction.atomic():
                        return function(*args, **kwargs)
                except OperationalError as exc:
                    sqlstate = getattr(exc.__cause__, "sqlstate", None)
                    if sqlstate not in RETRYABLE_SQLSTATES or attempt == attempts:
                        raise
                time.sleep(RETRY_BACKOFF_SECONDS * attempt * (1 + random.random()))

        return retrying

    return decorate
