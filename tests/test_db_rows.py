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
from tests.marketplace.market_helpers import allow_all_funding  # noqa: F401 (fixture)

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


@pytest.mark.usefixtures("allow_all_funding")
@pytest.mark.parametrize("with_quote", [False, True])
def test_the_provision_steps_row_lock_matches_select_related_field_for_field(with_quote):
    from datetime import timedelta

    from django.db import transaction
    from django.utils import timezone

    from marketplace.models import Reservation
    from marketplace.provisioning.services import _provision_lock_row
    from marketplace.services.quotes import quote_create
    from marketplace.services.reservations import reservation_create
    from tests.provisioning_support import market_create

    market = market_create(nodes=1, gpus=8)
    org = OrganizationFactory()
    if with_quote:
        start = timezone.now() + timedelta(minutes=1)
        quote = quote_create(organization=org, gpu_model=market.gpu_model.slug, gpu_count=1,
                             starts_at=start, ends_at=start + timedelta(hours=1),
                             tier="on_demand")  # fmt: skip
        r = reservation_create(organization=org, quote=quote, workload={"ports": [80]})
    else:
        r = market.book(organization=org, workload={"ports": [80]})

    with transaction.atomic():
        loaded = _provision_lock_row(r.pk)
    expected = Reservation.objects.select_related("gpu_model", "site", "quote").get(pk=r.pk)

    assert _fields(loaded) == _fields(expected)
    assert loaded.workload == {"ports": [80]} and loaded.get_deferred_fields() == set()
    for name in ("gpu_model", "site"):
        assert _fields(getattr(loaded, name)) == _fields(getattr(expected, name))
    if with_quote:
        assert _fields(loaded.quote) == _fields(expected.quote)
    else:
        assert loaded.quote is None
    assert _provision_lock_row(-1) is None


def test_the_node_token_lookup_and_the_gpu_read_match_the_orm_field_for_field():
    from inventory.models import Gpu, NodeToken
    from inventory.services import node_gpus_by_index, node_token_authenticate, node_token_issue

    node = NodeFactory(gpus=3)
    issued, secret = node_token_issue(node=node, label="agent")

    token = node_token_authenticate(secret)
    expected = NodeToken.objects.select_related("node").get(pk=issued.pk)

    assert _fields(token) == {**_fields(expected), "last_used_at": token.last_used_at}
    assert _fields(token.node) == _fields(expected.node)
    assert node_token_authenticate(secret + "x") is None
    gpus = node_gpus_by_index(node)
    assert {i: _fields(g) for i, g in gpus.items()} == {
        g.index: _fields(g) for g in Gpu.objects.filter(node=node)
    }
