"""Model instances from plain SQL, for the few statements on a hot path written without the ORM.

Compiling an ORM query costs more CPU than running a simple statement (docs/benchmarks.md
has the measurement on the reservation path). Where a request makes such a statement on every
call, it is written as SQL and the rows are turned back into model instances here, converted
exactly as the ORM converts them (JSON fields, for one), so callers cannot tell the difference.
"""

from django.db import connection
from django.db.models import Model

__all__ = ["model_columns", "model_from_row"]


def model_columns(model: type[Model], alias: str) -> str:
    """The model's columns, qualified with `alias`, in the order model_from_row expects."""
    return ", ".join(f'{alias}."{f.column}"' for f in model._meta.concrete_fields)


def model_from_row(model: type[Model], values) -> Model:
    """An instance loaded from the values of model_columns(model, …), as a query would load it."""
    fields = model._meta.concrete_fields
    values = [
        f.from_db_value(v, None, connection) if hasattr(f, "from_db_value") else v
        for f, v in zip(fields, values, strict=True)
    ]
    return model.from_db(connection.alias, [f.attname for f in fields], values)
