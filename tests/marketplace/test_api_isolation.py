"""No endpoint lets one organisation see or touch another's objects: always 404, never 403."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from marketplace.models import ApiKey, Invitation, Membership, Quote, Reservation, Role, SshKey
from marketplace.services.organizations import invitation_create
from marketplace.services.ssh_keys import ssh_key_create
from tests.factories import MembershipFactory, OrganizationFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    fresh_rate_limits,
    key_client,
    make_reservation,
    market,
    reservation_body,
    session_client,
    tomorrow,
)
from tests.provisioning_support import ssh_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def victim(market):
    """Organisation A with a reservation, a quote, a key, an SSH key, a second member and an
    open invitation."""
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER)
    member = MembershipFactory(organization=org, role=Role.MEMBER)
    client = session_client(owner)
    reservation = make_reservation(client)
    body = reservation_body()
    body.pop("tier")
    quote = client.post("/api/v1/quotes", body, format="json").json()
    key = ApiKey.objects.create(
        organization=org, name="a", prefix="sy_live_victim00", secret_hash="0" * 64,
        scopes=["read", "write"],
    )  # fmt: skip
    saved_key = ssh_key_create(organization=org, user=None, name="a", public_key=ssh_key())
    invitation, _ = invitation_create(actor=owner, email="invitee@example.com", role=Role.MEMBER)
    return {
        "inv": invitation.public_id,
        "org": org,
        "ssh": saved_key.public_id,
        "res": reservation["id"],
        "quo": quote["id"],
        "key": key.public_id,
        "mem": member.public_id,
    }


@pytest.fixture
def intruder_owner():
    return MembershipFactory(organization=OrganizationFactory(), role=Role.OWNER)


ENDPOINTS = [
    ("get", "/api/v1/reservations/{res}", None),
    ("get", "/api/v1/reservations/{res}/cancellation-terms", None),
    ("post", "/api/v1/reservations/{res}/cancel", {}),
    ("post", "/api/v1/reservations/{res}/extend", {"ends_at": "2099-01-01T00:00:00Z"}),
    ("get", "/api/v1/quotes/{quo}", None),
    ("post", "/api/v1/reservations", {"quote": "{quo}"}),
    ("post", "/api/v1/api-keys/{key}/revoke", {}),
    ("patch", "/api/v1/organization/members/{mem}", {"role": "admin"}),
    ("delete", "/api/v1/organization/members/{mem}", None),
    ("post", "/api/v1/organization/invitations/{inv}/revoke", {}),
    ("get", "/api/v1/ssh-keys/{ssh}", None),
    ("delete", "/api/v1/ssh-keys/{ssh}", None),
]


def _fill(value, ids):
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {k: _fill(v, ids) for k, v in value.items()}
    return value


def _snapshot():
    return (
        list(Reservation.objects.values_list("public_id", "status", "ends_at").order_by("pk")),
        list(ApiKey.objects.values_list("pk", "revoked_at").order_by("pk")),
        list(Membership.objects.values_list("pk", "role").order_by("pk")),
        Quote.objects.count(),
        list(SshKey.objects.values_list("pk", flat=True).order_by("pk")),
        list(Invitation.objects.values_list("pk", "revoked_at", "accepted_at").order_by("pk")),
    )


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=[f"{m} {p}" for m, p, _ in ENDPOINTS])
def test_another_organisations_objects_are_not_found(victim, intruder_owner, method, path, body):
    before = _snapshot()
    client = session_client(intruder_owner)
    url = _fill(path, victim)
    response = getattr(client, method)(url, _fill(body, victim), format="json")
    error = assert_error(response, 404)
    assert error["type"] == "not_found_error"
    assert _snapshot() == before


@pytest.mark.parametrize(
    "method,path,body",
    [
        e
        for e in ENDPOINTS
        if "members" not in e[1] and "api-keys" not in e[1] and "invitations" not in e[1]
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_another_organisations_objects_are_not_found_with_an_api_key(victim, method, path, body):
    before = _snapshot()
    client = key_client(OrganizationFactory())
    response = getattr(client, method)(_fill(path, victim), _fill(body, victim), format="json")
    assert_error(response, 404)
    assert _snapshot()[0] == before[0]


def test_lists_show_only_the_callers_objects(victim, intruder_owner, market):
    client = session_client(intruder_owner)
    mine = make_reservation(client, gpu_count=1)
    assert [r["id"] for r in client.get("/api/v1/reservations").json()["results"]] == [mine["id"]]
    keys = client.get("/api/v1/api-keys").json()["results"]
    assert keys == []
    members = client.get("/api/v1/organization/members").json()["results"]
    assert [m["id"] for m in members] == [intruder_owner.public_id]
    assert client.get("/api/v1/organization/invitations").json()["results"] == []
    assert client.get("/api/v1/ssh-keys").json()["results"] == []


def test_another_organisations_saved_ssh_key_cannot_be_reserved_with(victim, intruder_owner):
    """A saved key is refused as input (400 on ssh_key_ids), as an unknown id would be."""
    before = _snapshot()
    client = session_client(intruder_owner)
    body = reservation_body(ssh_key_ids=[victim["ssh"]])
    response = client.post("/api/v1/reservations", body, format="json")
    assert_error(response, 400, "unknown_ssh_key", "ssh_key_ids")
    assert _snapshot() == before


def test_an_organisation_header_naming_another_org_is_not_found(victim, intruder_owner):
    client = session_client(intruder_owner, org_header=victim["org"].public_id)
    assert_error(client.get("/api/v1/reservations"), 404, "organization_not_found")
    key = key_client(OrganizationFactory())
    key.credentials(
        HTTP_AUTHORIZATION=f"Bearer {key.secret}", HTTP_SY_ORGANIZATION=victim["org"].public_id
    )
    assert_error(key.get("/api/v1/reservations"), 404, "organization_not_found")


def test_the_organisation_header_picks_among_the_users_memberships(victim, intruder_owner):
    second = MembershipFactory(user=intruder_owner.user, role=Role.MEMBER)
    default = session_client(intruder_owner).get("/api/v1/organization").json()
    assert default["id"] == intruder_owner.organization.public_id
    chosen = session_client(intruder_owner, org_header=second.organization.public_id)
    body = chosen.get("/api/v1/organization").json()
    assert (body["id"], body["role"]) == (second.organization.public_id, "member")


def test_a_user_without_an_organisation_is_refused(market):
    from tests.clients import HttpsAPIClient
    from tests.factories import UserFactory

    client = HttpsAPIClient()
    client.force_login(UserFactory())
    assert_error(client.get("/api/v1/reservations"), 403, "no_organization")
    # The catalogue acts for nobody in particular.
    assert client.get("/api/v1/gpu-models").status_code == 200
