"""The audit log: who (person or key) changed what, when, from where; append-only in the database."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from config.dates import iso_utc
from marketplace.models import AuditEntry, Reservation, Role, WebhookEndpoint
from marketplace.services.api_keys import api_key_create
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
)
from tests.marketplace.market_helpers import member_client

pytestmark = pytest.mark.django_db

UA = {"HTTP_USER_AGENT": "switchyard-cli/0.1 (tests)"}


def _entries(org, **filters):
    return list(AuditEntry.objects.filter(organization=org, **filters).order_by("id"))


def test_a_member_creating_and_revoking_a_key_is_recorded_without_the_secret(org, owner):
    client = session_client(owner)
    created = client.post(
        "/api/v1/api-keys", {"name": "ci", "scopes": ["read"]}, format="json",
        REMOTE_ADDR="203.0.113.7", **UA,
    )  # fmt: skip
    assert created.status_code == 201
    client.post(f"/api/v1/api-keys/{created.json()['id']}/revoke", REMOTE_ADDR="203.0.113.7")

    create, revoke = _entries(org)
    assert (create.actor, create.action, create.object_id) == (
        f"user:{owner.user.username}", "api_key.create", created.json()["id"],
    )  # fmt: skip
    assert create.changes == {"after": {"name": "ci", "scopes": ["read"]}}
    assert (create.ip_address, create.user_agent) == ("203.0.113.7", UA["HTTP_USER_AGENT"])
    assert created.json()["secret"] not in str(create.changes)
    assert revoke.action == "api_key.revoke"
    assert revoke.changes == {"before": {"revoked": False}, "after": {"revoked": True}}


def test_reservations_made_cancelled_and_extended_by_a_key_name_the_key(market, org):
    client = key_client(org)
    prefix = client.secret.rsplit("_", 1)[0]
    body = make_reservation(client)
    reservation = Reservation.objects.get(public_id=body["id"])
    new_end = (reservation.ends_at + timedelta(hours=1)).isoformat()
    assert client.post(f"/api/v1/reservations/{body['id']}/extend", {"ends_at": new_end},
                       format="json").status_code == 200  # fmt: skip
    assert (
        client.post(f"/api/v1/reservations/{body['id']}/cancel", {}, format="json").status_code
        == 200
    )

    entries = _entries(org, object_type="reservation")
    assert [(e.actor, e.action) for e in entries] == [
        (f"api_key:{prefix}", "reservation.create"),
        (f"api_key:{prefix}", "reservation.extend"),
        (f"api_key:{prefix}", "reservation.cancel"),
    ]
    assert entries[0].changes["after"]["total"] == "12.00"
    assert entries[1].changes == {
        # Times as the API writes every time: in UTC with "Z".
        "before": {"ends_at": iso_utc(reservation.ends_at), "total": "12.00"},
        "after": {"ends_at": new_end.replace("+00:00", "Z"), "total": "16.00"},
    }
    assert entries[2].changes["before"] == {"status": "pending"}
    assert entries[2].changes["after"]["status"] == "cancelled"


def test_settings_changes_record_before_and_after_of_what_changed_only(org, owner, settings):
    settings.WEBHOOK_ALLOW_INSECURE = True
    client = session_client(owner)
    endpoint = client.post(
        "/api/v1/webhook-endpoints", {"url": "http://127.0.0.1:9/a"}, format="json"
    ).json()
    client.patch(f"/api/v1/webhook-endpoints/{endpoint['id']}", {"enabled": False,
                 "description": ""}, format="json")  # fmt: skip
    client.post(f"/api/v1/webhook-endpoints/{endpoint['id']}/rotate-secret")
    client.patch("/api/v1/billing/settings", {"recharge_threshold": "20.00",
                 "monthly_spend_limit": "100.00"}, format="json")  # fmt: skip

    create, update, rotate, billing = _entries(org)
    assert create.action == "webhook_endpoint.create"
    assert update.changes == {"before": {"enabled": True}, "after": {"enabled": False}}
    endpoint = WebhookEndpoint.objects.get()
    secrets = [endpoint.secret] + [s for s, _ in endpoint.previous_secrets_signing()]
    assert rotate.action == "webhook_endpoint.rotate_secret"
    assert not any(s in str(e.changes) for s in secrets for e in (create, update, rotate))
    assert billing.action == "billing_settings.update"
    assert billing.changes["after"] == {
        "monthly_spend_limit_minor": 10000,
        "recharge_threshold_minor": 2000,
    }
    assert set(billing.changes["before"]) == {
        "monthly_spend_limit_minor",
        "recharge_threshold_minor",
    }


def test_member_role_changes_are_recorded(org, owner):
    member = MembershipFactory(organization=org, role=Role.MEMBER)
    client = session_client(owner)
    response = client.patch(f"/api/v1/organization/members/{member.public_id}", {"role": "admin"},
                            format="json")  # fmt: skip
    assert response.status_code == 200
    (entry,) = _entries(org, action="member.change_role")
    assert entry.changes == {"before": {"role": "member"}, "after": {"role": "admin"}}


def test_changes_made_outside_a_request_are_not_audit_entries(org):
    api_key_create(organization=org, name="by a task", scopes=["read"], created_by=None)
    assert _entries(org) == []


def test_the_log_is_append_only_in_the_database(org, owner):
    session_client(owner).post("/api/v1/api-keys", {"name": "x"}, format="json")
    (entry,) = _entries(org)

    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        AuditEntry.objects.filter(pk=entry.pk).update(action="nothing.happened")
    with pytest.raises(IntegrityError, match="append-only"), transaction.atomic():
        AuditEntry.objects.filter(pk=entry.pk).delete()
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cur:
        cur.execute("DELETE FROM marketplace_auditentry")
    assert _entries(org) == [entry]
    entry.refresh_from_db()
    assert entry.action == "api_key.create"


def test_the_client_address_comes_through_trusted_proxies_only(org, owner, settings):
    client = session_client(owner)
    forwarded = {"HTTP_X_FORWARDED_FOR": "198.51.100.20", "REMOTE_ADDR": "10.0.0.2"}
    settings.TRUSTED_PROXIES = 0
    client.post("/api/v1/api-keys", {"name": "a"}, format="json", **forwarded)
    settings.TRUSTED_PROXIES = 1
    client.post("/api/v1/api-keys", {"name": "b"}, format="json", **forwarded)
    assert [e.ip_address for e in _entries(org)] == ["10.0.0.2", "198.51.100.20"]


# --- reading it ------------------------------------------------------------------------------


def test_owners_read_the_log_newest_first_with_filters(org, owner, other_org):
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    session_client(owner).post("/api/v1/api-keys", {"name": "a"}, format="json")
    session_client(admin).post("/api/v1/api-keys", {"name": "b"}, format="json")
    session_client(admin).post("/api/v1/organization/invitations",
                               {"email": UserFactory().email, "role": "member"}, format="json")  # fmt: skip
    theirs = MembershipFactory(organization=other_org, role=Role.OWNER)
    session_client(theirs).post("/api/v1/api-keys", {"name": "theirs"}, format="json")
    client = session_client(owner)

    def actions(query=""):
        response = client.get("/api/v1/audit-log" + query)
        assert response.status_code == 200, response.content
        return [e["action"] for e in response.json()["results"]]

    assert actions() == ["invitation.create", "api_key.create", "api_key.create"]
    assert actions(f"?actor=user:{admin.user.username}") == ["invitation.create", "api_key.create"]
    assert actions("?action=api_key.create") == ["api_key.create", "api_key.create"]
    assert actions("?action=invitation.") == ["invitation.create"]
    future = (timezone.now() + timedelta(minutes=1)).isoformat().replace("+00:00", "Z")
    assert actions("?created_after=" + future) == []
    first = client.get("/api/v1/audit-log").json()["results"][0]
    assert set(first) == {"id", "created_at", "actor", "action", "object_type", "object_id",
                          "changes", "ip_address", "user_agent"}  # fmt: skip
    assert_error(client.get("/api/v1/audit-log?created_after=soon"), 400, field="created_after")


def test_a_key_reads_the_log_with_invited_addresses_masked(org, owner):
    session_client(owner).post("/api/v1/organization/invitations",
                               {"email": "grace.hopper@example.com", "role": "member"},
                               format="json")  # fmt: skip

    by_key = key_client(org, scopes=["read"]).get("/api/v1/audit-log?action=invitation.")
    by_owner = session_client(owner).get("/api/v1/audit-log?action=invitation.")

    assert by_key.status_code == 200
    assert by_key.json()["results"][0]["changes"]["after"]["email"] == "g***@example.com"
    assert "grace.hopper" not in by_key.content.decode()
    assert by_owner.json()["results"][0]["changes"]["after"]["email"] == "grace.hopper@example.com"


def test_members_and_keys_without_a_manager_cannot_read_the_log(org):
    member = session_client(MembershipFactory(organization=org, role=Role.MEMBER))
    assert_error(member.get("/api/v1/audit-log"), 403, "insufficient_role")


def test_the_portal_page_shows_the_log_to_managers_only(org, owner):
    session_client(owner).post("/api/v1/api-keys", {"name": "shown"}, format="json")
    page = member_client(org, Role.OWNER).get("/audit-log")
    assert page.status_code == 200
    assert "api_key.create" in page.content.decode()
    assert member_client(org, Role.MEMBER).get("/audit-log").status_code == 403


def test_times_kept_in_json_read_as_the_api_writes_times_old_rows_too(market, org, owner):
    """A reservation's extensions and cancellation terms and the audit log's changes are JSON
    a service wrote: their times come out in UTC with "Z", like every other time in the API,
    also for rows written when they were kept with "+00:00"."""
    client = key_client(org)
    body = make_reservation(client)
    reservation = Reservation.objects.get(public_id=body["id"])
    new_end = reservation.ends_at + timedelta(hours=1)
    client.post(f"/api/v1/reservations/{body['id']}/extend",
                {"ends_at": new_end.isoformat()}, format="json")  # fmt: skip
    client.post(f"/api/v1/reservations/{body['id']}/cancel", {}, format="json")

    detail = client.get(f"/api/v1/reservations/{body['id']}").json()
    (extension,) = detail["breakdown"]["extensions"]
    assert extension["to"] == iso_utc(new_end) and extension["to"].endswith(":00Z")
    assert detail["cancellation"]["at"].endswith("Z")
    assert "+00:00" not in str(Reservation.objects.get(pk=reservation.pk).breakdown)

    # Rows kept before: their JSON still holds "+00:00" (the audit log is never rewritten).
    kept = Reservation.objects.get(pk=reservation.pk).cancellation
    Reservation.objects.filter(pk=reservation.pk).update(
        cancellation={**kept, "at": "2026-12-06T10:00:00+00:00"}
    )
    AuditEntry.objects.create(
        organization=org, actor="user:old", action="reservation.extend", object_type="reservation",
        object_id=body["id"], changes={"before": {"ends_at": "2026-12-06T10:00:00+00:00"}},
    )  # fmt: skip

    assert client.get(f"/api/v1/reservations/{body['id']}").json()["cancellation"]["at"] == (
        "2026-12-06T10:00:00Z"
    )
    audit = session_client(owner).get("/api/v1/audit-log?action=reservation.extend").json()
    assert [e["changes"] for e in audit["results"]] == [
        {"before": {"ends_at": "2026-12-06T10:00:00Z"}},
        {
            "before": {"ends_at": iso_utc(reservation.ends_at), "total": "12.00"},
            "after": {"ends_at": iso_utc(new_end), "total": "16.00"},
        },
    ]
