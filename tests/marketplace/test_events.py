"""Events: written with the change they report (an outbox), listed by GET /api/v1/events."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from config.errors import InvalidTransition
from marketplace.models import Event, ReservationStatus, Role
from marketplace.services.api_keys import api_key_create, api_key_revoke
from marketplace.services.curtailment import curtailment_announce
from marketplace.services.events import events_prune
from marketplace.services.organizations import (
    invitation_accept,
    invitation_create,
    member_remove,
)
from marketplace.services.reservations import reservation_cancel, reservation_extend
from marketplace.services.transitions import reservation_transition
from tests.factories import MembershipFactory, UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    fresh_rate_limits,
    key_client,
    make_reservation,
    market,
    org,
    other_org,
    owner,
    owner_client,
    session_client,
    tomorrow,
)

pytestmark = pytest.mark.django_db
S = ReservationStatus


def _events(org, **filters):
    return list(Event.objects.filter(organization=org, **filters).order_by("created_at", "id"))


def _reserve(org, client=None, **overrides):
    from marketplace.models import Reservation

    body = make_reservation(client or key_client(org), **overrides)
    return Reservation.objects.get(public_id=body["id"])


def _step(reservation, *statuses):
    for to in statuses:
        reservation = reservation_transition(
            reservation=reservation, to_status=to, cause="test", actor_label="test"
        )
    return reservation


def test_a_reservations_life_is_a_sequence_of_events_with_its_state_at_each(market, org):
    now = timezone.now()
    reservation = _reserve(
        org, starts_at=now.isoformat(), ends_at=(now + timedelta(hours=2)).isoformat()
    )
    _step(reservation, S.PROVISIONING, S.ACTIVE, S.RELEASING, S.COMPLETED)

    events = _events(org, object_id=reservation.public_id)
    assert [e.type for e in events] == [
        "reservation.created",
        "reservation.provisioning",
        "reservation.active",
        "reservation.completed",  # releasing is an inner step: no event
    ]
    assert [e.data["status"] for e in events] == [
        "scheduled",
        "provisioning",
        "active",
        "completed",
    ]
    assert {e.public_id[:4] for e in events} == {"evt_"}
    assert len({e.public_id for e in events}) == 4
    # The object as GET /reservations/{id} shows it (the list's fields), at that moment.
    active = events[2].data
    assert active["id"] == reservation.public_id
    assert active["gpu_model"] == "h100-sxm-80gb"
    assert active["site"] == "abilene-1"
    assert active["price_per_gpu_hour"] == "2.0000"
    assert active["activated_at"] is not None and active["released_at"] is None
    assert events[3].data["released_at"] is not None
    assert all(e.object_type == "reservation" for e in events)


def test_a_refused_transition_records_no_event(market, org):
    reservation = _reserve(org)
    before = _events(org)
    with pytest.raises(InvalidTransition):
        _step(reservation, S.COMPLETED)
    assert _events(org) == before


def test_an_event_rolls_back_with_its_change(market, org):
    reservation = _reserve(org)
    before = _events(org)
    with pytest.raises(RuntimeError), transaction.atomic():
        _step(reservation, S.CANCELLED)
        assert len(_events(org)) == len(before) + 1
        raise RuntimeError("the caller's transaction fails after the transition")
    assert _events(org) == before
    reservation.refresh_from_db()
    assert reservation.status == S.PENDING


def test_cancel_and_extend_record_their_events(market, org):
    reservation = _reserve(org)
    new_end = reservation.ends_at + timedelta(hours=1)
    reservation_extend(reservation=reservation, new_ends_at=new_end, actor_label="test")
    reservation_cancel(reservation=reservation, actor_label="test")
    events = _events(org, object_id=reservation.public_id)
    assert [e.type for e in events] == [
        "reservation.created",
        "reservation.extended",
        "reservation.cancelled",
    ]
    assert events[1].data["ends_at"] == new_end.isoformat().replace("+00:00", "Z")
    assert events[1].data["total"] == "16.00"  # 2 GPUs × 2.00 USD × 4 h (was 3 h)
    assert events[2].data["status"] == "cancelled"


def test_an_interruption_notice_is_an_event(market, org):
    now = timezone.now()
    reservation = _reserve(
        org,
        tier="interruptible",
        starts_at=now.isoformat(),
        ends_at=(now + timedelta(hours=6)).isoformat(),
    )
    site, _ = market
    shed_at = now + timedelta(hours=1)
    curtailment_announce(site=site, shed_at=shed_at, reason="grid emergency")
    (event,) = _events(org, type="reservation.interruption_scheduled")
    assert event.object_id == reservation.public_id
    assert event.data["interruption"]["at"] == shed_at.isoformat().replace("+00:00", "Z")


def test_api_keys_and_members_record_events(org, owner):
    key, _ = api_key_create(organization=org, name="ci", scopes=["read"], created_by=owner.user)
    api_key_revoke(api_key=key)
    api_key_revoke(api_key=key)  # revoking twice changes nothing, and records nothing
    newcomer = UserFactory()
    _, token = invitation_create(actor=owner, email=newcomer.email, role=Role.MEMBER)
    membership = invitation_accept(token=token, user=newcomer)
    member_remove(actor=owner, membership=membership)

    events = _events(org)
    assert [(e.type, e.object_id) for e in events] == [
        ("api_key.created", key.public_id),
        ("api_key.revoked", key.public_id),
        ("member.added", membership.public_id),
        ("member.removed", membership.public_id),
    ]
    assert events[0].data["revoked_at"] is None and events[1].data["revoked_at"] is not None
    assert "secret" not in events[0].data
    assert events[3].data["user"]["username"] == newcomer.username
    assert events[3].data["id"] == membership.public_id


# --- the API ---------------------------------------------------------------------------------


def test_the_api_lists_the_organisations_events_newest_first(market, org, owner_client, other_org):
    reservation = _reserve(org)
    _step(reservation, S.CANCELLED)
    _reserve(other_org)  # another organisation's events are never shown

    body = owner_client.get("/api/v1/events").json()
    mine = _events(org)
    assert [e["id"] for e in body["results"]] == [e.public_id for e in reversed(mine)]
    first = body["results"][0]
    assert first["type"] == "reservation.cancelled"
    assert first["object"] == "event"
    assert first["object_id"] == reservation.public_id
    assert first["organization"] == org.public_id
    assert first["data"]["object"]["status"] == "cancelled"
    assert owner_client.get(f"/api/v1/events/{first['id']}").json() == first


def test_the_api_filters_by_type_object_and_time(market, org, owner_client):
    one = _reserve(org)
    two = _reserve(org)
    _step(one, S.CANCELLED)

    def ids(query):
        response = owner_client.get("/api/v1/events" + query)
        assert response.status_code == 200, response.content
        return [e["id"] for e in response.json()["results"]]

    cancelled = _events(org, type="reservation.cancelled")
    assert ids("?type=reservation.cancelled") == [e.public_id for e in cancelled]
    assert len(ids("?type=reservation.created&type=reservation.cancelled")) == 3
    assert ids(f"?object_id={two.public_id}") == [
        e.public_id for e in _events(org, object_id=two.public_id)
    ]
    created_of_two = _events(org, object_id=two.public_id)[0]
    after = created_of_two.created_at.isoformat()
    assert ids("?created_after=" + after.replace("+00:00", "Z")) == [cancelled[0].public_id]
    assert ids("?limit=1") == [cancelled[0].public_id]


def test_bad_filters_are_a_400_in_the_error_shape(org, owner_client):
    assert_error(owner_client.get("/api/v1/events?type=reservation.exploded"), 400, field="type")
    assert_error(
        owner_client.get("/api/v1/events?created_after=yesterday"), 400, field="created_after"
    )
    assert_error(owner_client.get("/api/v1/events?limit=0"), 400, field="limit")


def test_another_organisations_event_is_not_found(market, org, other_org, owner_client):
    _reserve(other_org)
    theirs = _events(other_org)[0]
    assert_error(owner_client.get(f"/api/v1/events/{theirs.public_id}"), 404, "event_not_found")


def test_every_member_role_may_read_events(org):
    client = session_client(MembershipFactory(organization=org, role=Role.BILLING))
    assert client.get("/api/v1/events").status_code == 200


# --- retention -------------------------------------------------------------------------------


def test_pruning_deletes_events_past_the_retention_and_keeps_the_rest(org, owner, settings):
    settings.EVENT_RETENTION_DAYS = 30
    key, _ = api_key_create(organization=org, name="a", scopes=["read"], created_by=None)
    api_key_revoke(api_key=key)
    old, recent = _events(org)
    now = timezone.now()
    Event.objects.filter(pk=old.pk).update(created_at=now - timedelta(days=30, seconds=1))
    Event.objects.filter(pk=recent.pk).update(created_at=now - timedelta(days=29, hours=23))

    assert events_prune(now=now) == 1
    assert _events(org) == [recent]
    assert events_prune(now=now) == 0


def test_the_provisioning_worker_records_its_steps_as_events(allow_all_funding):
    """Provisioning goes through the transition service too: provisioning, active, completed
    (with the connection details' reservation as it was at each step)."""
    from marketplace.provisioning.drivers import SimulatedDriver
    from marketplace.provisioning.services import (
        reservation_provision_step,
        reservation_release_step,
    )
    from tests.provisioning_support import market_create

    market = market_create(nodes=1, gpus=2)
    reservation = market.book(gpu_count=2)
    driver = SimulatedDriver()
    assert reservation_provision_step(reservation_id=reservation.pk, driver=driver).outcome == (
        "active"
    )
    now = timezone.now()
    type(reservation).objects.filter(pk=reservation.pk).update(
        starts_at=now - timedelta(hours=1), ends_at=now - timedelta(milliseconds=1)
    )
    assert reservation_release_step(reservation_id=reservation.pk, driver=driver).outcome == (
        "completed"
    )

    events = _events(reservation.organization, object_id=reservation.public_id)
    assert [(e.type, e.data["status"]) for e in events] == [
        ("reservation.created", "scheduled"),
        ("reservation.provisioning", "provisioning"),
        ("reservation.active", "active"),
        ("reservation.completed", "completed"),
    ]
