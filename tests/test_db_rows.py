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
    from inventory.services import (
        node_heartbeat_read,
        node_token_authenticate,
        node_token_authenticate_with_gpus,
        node_token_issue,
    )

    node = NodeFactory(gpus=3)
    issued, secret = node_token_issue(node=node, label="agent")

    token = node_token_authenticate(secret)
    expected = NodeToken.objects.select_related("node").get(pk=issued.pk)

    assert _fields(token) == {**_fields(expected), "last_used_at": token.last_used_at}
    assert _fields(token.node) == _fields(expected.node)
    assert node_token_authenticate(secret + "x") is None
    gpus, work_waiting = node_heartbeat_read(node)
    assert {i: _fields(g) for i, g in gpus.items()} == {
        g.index: _fields(g) for g in Gpu.objects.filter(node=node)
    }
    assert work_waiting is False
    token, (with_gpus, work_waiting) = node_token_authenticate_with_gpus(secret)
    assert _fields(token.node) == _fields(expected.node)
    assert {i: _fields(g) for i, g in with_gpus.items()} == {i: _fields(g) for i, g in gpus.items()}
    assert work_waiting is False
    assert node_token_authenticate_with_gpus(secret + "x") is None


@pytest.mark.usefixtures("allow_all_funding")
def test_a_row_written_by_model_insert_equals_the_orms_for_each_model_it_writes():
    """Each model a hot path inserts through config.db.model_insert: the row in the database
    and the instance handed back are the ORM's, field for field (but for the key, the random
    public id and the moments of writing), loaded as a query loads them."""

    from django.utils import timezone

    from billing.models import Hold
    from config.db import model_insert
    from marketplace.ids import new_public_id
    from marketplace.models import AuditEntry, Event, Reservation, ReservationTransition
    from tests.provisioning_support import market_create

    booked = market_create(nodes=1, gpus=8).book()
    org = booked.organization
    now = timezone.now()
    rows = {
        Reservation: {
            f.attname: getattr(booked, f.attname)
            for f in Reservation._meta.concrete_fields
            if f.attname not in {"id", "public_id", "created_at"}
        },
        ReservationTransition: dict(
            reservation_id=booked.pk,
            from_status="pending",
            to_status="scheduled",
            cause="due",
            actor_label="test",
            at=now,
        ),  # fmt: skip
        Event: dict(
            organization_id=org.pk,
            type="reservation.created",
            object_type="reservation",
            object_id=booked.public_id,
            data={"id": booked.public_id, "n": [1, "2"], "price": "2.5000"},
        ),  # fmt: skip
        AuditEntry: dict(
            organization_id=org.pk,
            actor="user:x",
            action="reservation.create",
            object_type="reservation",
            object_id=booked.public_id,
            changes={"after": {"status": "pending"}},
            ip_address="192.0.2.1",
            user_agent="ua",
        ),  # fmt: skip
        Hold: dict(
            organization_id=org.pk,
            reservation=booked,
            amount_minor=4900,
            currency="usd",
            description="committed",
        ),  # fmt: skip
    }
    for model, values in rows.items():
        differ = {"id", "public_id", "idempotency_key"} | {
            f.attname
            for f in model._meta.concrete_fields
            if getattr(f, "auto_now", False)
            or getattr(f, "auto_now_add", False)
            or (callable(f.default) and f.default not in (list, dict))  # now, a random id
        }
        unique = {}
        if any(f.attname == "idempotency_key" for f in model._meta.concrete_fields):
            unique = {"idempotency_key": new_public_id("t")}
        through_orm = model.objects.create(**values, **unique)
        if unique:
            unique = {"idempotency_key": new_public_id("t")}
        inserted = model_insert(model(**values, **unique))

        assert inserted.pk is not None and inserted.pk != through_orm.pk, model
        assert inserted._state.adding is False and inserted._state.db == "default", model
        read_back = model.objects.get(pk=inserted.pk)
        assert _fields(inserted) == _fields(read_back), model
        assert {k: v for k, v in _fields(read_back).items() if k not in differ} == {
            k: v for k, v in _fields(model.objects.get(pk=through_orm.pk)).items()
            if k not in differ
        }, model  # fmt: skip
        if model is Hold:  # the related object given stays in hand, as after create()
            assert inserted.reservation is booked


def test_model_insert_leaves_expressions_to_the_orm():
    from django.db.models import Value

    from config.db import model_insert
    from marketplace.models import Event

    org = OrganizationFactory()
    with pytest.raises(TypeError, match="expression"):
        model_insert(Event(organization_id=org.pk, type="x", object_type="y", object_id="z",
                           data=Value({})))  # fmt: skip
    assert not Event.objects.exists()
