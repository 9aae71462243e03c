"""config.db: model instances from plain SQL must be what the ORM would have loaded.

The hot-path statements (API-key lookup, node lock, funding read) are written as SQL for
speed; these tests hold their rows to the ORM's for every concrete field, so a field added
later (a JSON field, a decimal, a converter of any kind) cannot come back different."""

import pytest
from django.db import connection

from config.db import model_columns, model_from_row
from inventory.models import Node
from marketplace.models import ApiKey
from marketplace.selectors.organizations import api_key_by_secret_hash
from marketplace.services.api_keys import api_key_create, api_key_hash
from tests.factories import NodeFactory, OrganizationFactory

pytestmark = pytest.mark.django_db


def _fields(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


def test_a_row_loads_as_the_orm_loads_it():
    node = NodeFactory()
    with connection.cursor() as cur:
        cur.execute(f"SELECT {model_columns(Node, 'n')} FROM inventory_node n WHERE n.id = %s",
                    [node.pk])  # fmt: skip
        loaded = model_from_row(Node, cur.fetchone())

    assert _fields(loaded) == _fields(Node.objects.get(pk=node.pk))
    assert loaded._state.adding is False and loaded._state.db == "default"
    loaded.hostname = "renamed"
    loaded.save(update_fields=["hostname"])  # an UPDATE of the row, not a second INSERT
    assert Node.objects.get(pk=node.pk).hostname == "renamed"


def test_the_key_lookup_matches_select_related_field_for_field():
    org = OrganizationFactory()
    _, secret = api_key_create(organization=org, name="ci", scopes=["read", "write"],
                               created_by=None)  # fmt: skip

    key = api_key_by_secret_hash(api_key_hash(secret))
    expected = ApiKey.objects.select_related("organization").get(secret_hash=api_key_hash(secret))

    assert _fields(key) == _fields(expected)
    assert key.scopes == ["read", "write"]  # JSON decoded, not the text
    assert _fields(key.organization) == _fields(expected.organization)
    assert api_key_by_secret_hash(api_key_hash(secret + "x")) is None
