"""GET/POST ssh-keys, GET/DELETE ssh-keys/{id}, and reserving with ssh_key_ids."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from marketplace.models import (
    Allocation,
    ApiKeyScope,
    IdempotencyRecord,
    Reservation,
    Role,
    SshKey,
)
from marketplace.services.ssh_keys import ssh_key_create
from tests.factories import MembershipFactory, OrganizationFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    client_key,
    fresh_rate_limits,
    key_client,
    market,
    org,
    other_org,
    owner,
    owner_client,
    reservation_body,
    session_client,
)
from tests.marketplace.ssh_key_helpers import expected_fingerprint, key_bytes, ssh_key

pytestmark = pytest.mark.django_db

URL = "/api/v1/ssh-keys"


def saved(org, n: int, name: str | None = None) -> SshKey:
    return ssh_key_create(
        organization=org, user=None, name=name or f"key {n}", public_key=ssh_key(body=key_bytes(n))
    )


def snapshot():
    return list(SshKey.objects.values_list("pk", "organization_id", "name").order_by("pk"))


def test_an_owner_saves_a_key_and_gets_it_back(owner_client, owner, org):
    line = ssh_key(body=key_bytes(1))
    response = owner_client.post(URL, {"name": "laptop", "public_key": line}, format="json")

    assert response.status_code == 201, response.content
    body = response.json()
    key = SshKey.objects.get()
    assert body == {
        "id": key.public_id,
        "name": "laptop",
        "public_key": line,
        "fingerprint": expected_fingerprint("ssh-ed25519", key_bytes(1)),
        "created_by": owner.user.username,
        "created_at": body["created_at"],
    }
    assert (key.organization, key.created_by) == (org, owner.user)
    assert owner_client.get(f"{URL}/{key.public_id}").json() == body


def test_a_write_key_saves_a_key_with_no_user(client_key, org):
    response = client_key.post(URL, {"name": "ci", "public_key": ssh_key()}, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["created_by"] is None
    assert SshKey.objects.get().organization == org


def test_the_list_shows_the_organisations_keys_newest_first(owner_client, org, other_org):
    first, second = saved(org, 1), saved(org, 2)
    saved(other_org, 3)
    response = owner_client.get(URL)
    assert response.status_code == 200
    assert [k["id"] for k in response.json()["results"]] == [second.public_id, first.public_id]


def test_delete_removes_the_key(owner_client, org):
    gone, kept = saved(org, 1), saved(org, 2)
    response = owner_client.delete(f"{URL}/{gone.public_id}")
    assert response.status_code == 204
    assert list(SshKey.objects.values_list("pk", flat=True)) == [kept.pk]
    assert_error(owner_client.delete(f"{URL}/{gone.public_id}"), 404, "ssh_key_not_found")
    assert_error(owner_client.get(f"{URL}/{gone.public_id}"), 404, "ssh_key_not_found")


def test_a_member_may_save_and_delete_keys(org):
    client = session_client(MembershipFactory(organization=org, role=Role.MEMBER))
    response = client.post(URL, {"name": "m", "public_key": ssh_key()}, format="json")
    assert response.status_code == 201, response.content
    assert client.delete(f"{URL}/{response.json()['id']}").status_code == 204
    assert SshKey.objects.count() == 0


def test_a_billing_member_reads_but_cannot_save_or_delete(org):
    key = saved(org, 1)
    client = session_client(MembershipFactory(organization=org, role=Role.BILLING))
    assert [k["id"] for k in client.get(URL).json()["results"]] == [key.public_id]
    assert client.get(f"{URL}/{key.public_id}").status_code == 200
    before = snapshot()

    response = client.post(
        URL, {"name": "b", "public_key": ssh_key(body=key_bytes(2))}, format="json"
    )
    assert_error(response, 403, "insufficient_role")
    assert_error(client.delete(f"{URL}/{key.public_id}"), 403, "insufficient_role")
    assert snapshot() == before


def test_a_read_only_key_reads_but_cannot_save_or_delete(org):
    key = saved(org, 1)
    client = key_client(org, scopes=[ApiKeyScope.READ])
    assert [k["id"] for k in client.get(URL).json()["results"]] == [key.public_id]
    before = snapshot()

    response = client.post(
        URL, {"name": "r", "public_key": ssh_key(body=key_bytes(2))}, format="json"
    )
    assert_error(response, 403, "insufficient_scope")
    assert_error(client.delete(f"{URL}/{key.public_id}"), 403, "insufficient_scope")
    assert snapshot() == before


def test_another_organisations_key_is_not_found(owner_client, client_key, other_org):
    theirs = saved(other_org, 1)
    before = snapshot()
    for client in (owner_client, client_key):
        assert_error(client.get(f"{URL}/{theirs.public_id}"), 404, "ssh_key_not_found")
        assert_error(client.delete(f"{URL}/{theirs.public_id}"), 404, "ssh_key_not_found")
        assert client.get(URL).json()["results"] == []
    assert snapshot() == before


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"public_key": ssh_key()}, "required", "name"),
        ({"name": "x"}, "required", "public_key"),
        ({"name": "x" * 101, "public_key": ssh_key()}, "max_length", "name"),
        ({"name": "x", "public_key": "ssh-ed25519 not*base64"}, "invalid_ssh_key", "public_key"),
        ({"name": "x", "public_key": ssh_key(body=bytes(31))}, "invalid_ssh_key", "public_key"),
        ({"name": "   ", "public_key": ssh_key()}, "blank", "name"),
    ],
    ids=["no-name", "no-key", "long-name", "bad-base64", "short-ed25519", "blank-name"],
)
def test_bad_input_is_refused_and_writes_nothing(owner_client, body, code, field):
    assert_error(owner_client.post(URL, body, format="json"), 400, code, field)
    assert SshKey.objects.count() == 0


def test_the_same_key_twice_is_a_conflict(owner_client, org):
    first = saved(org, 1, name="laptop")
    again = ssh_key(body=key_bytes(1)).replace("dev@laptop", "other comment")
    response = owner_client.post(URL, {"name": "again", "public_key": again}, format="json")
    error = assert_error(response, 409, "ssh_key_exists", "public_key")
    assert error["type"] == "conflict_error"
    assert list(SshKey.objects.values_list("pk", flat=True)) == [first.pk]


def test_an_idempotent_retry_replays_the_first_answer_and_saves_once(client_key):
    body = {"name": "laptop", "public_key": ssh_key()}
    first = client_key.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="ssh-1")
    second = client_key.post(URL, body, format="json", HTTP_IDEMPOTENCY_KEY="ssh-1")
    assert (first.status_code, second.status_code) == (201, 201)
    assert "Idempotent-Replayed" not in first
    assert second["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert SshKey.objects.count() == 1
    # Without the key, the same body is a second attempt: the duplicate is refused.
    assert_error(client_key.post(URL, body, format="json"), 409, "ssh_key_exists")


# --- reserving with saved keys ---------------------------------------------------------------


def test_a_reservation_gets_the_saved_keys_after_its_own(client_key, org, market):
    a, b = saved(org, 1), saved(org, 2)
    pasted = ssh_key(body=key_bytes(3))
    body = reservation_body(
        workload={"ssh_public_keys": [pasted]}, ssh_key_ids=[b.public_id, a.public_id]
    )

    response = client_key.post("/api/v1/reservations", body, format="json")

    assert response.status_code == 201, response.content
    expected = [pasted, b.public_key, a.public_key]
    assert response.json()["workload"]["ssh_public_keys"] == expected
    assert Reservation.objects.get().workload == {"ssh_public_keys": expected}


def test_a_reservation_from_a_quote_gets_the_saved_keys(owner_client, org, market):
    key = saved(org, 1)
    quote_body = reservation_body()
    quote_body.pop("tier")
    quote = owner_client.post("/api/v1/quotes", quote_body, format="json").json()
    response = owner_client.post(
        "/api/v1/reservations",
        {"quote": quote["id"], "ssh_key_ids": [key.public_id]},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert Reservation.objects.get().workload == {"ssh_public_keys": [key.public_key]}


@pytest.mark.parametrize("whose", ["unknown", "another organisation's"])
def test_a_reservation_with_a_wrong_key_id_is_refused_and_nothing_is_written(
    client_key, org, market, whose
):
    mine = saved(org, 1)
    if whose == "unknown":
        wrong = "ssh_doesnotexist"
    else:
        wrong = saved(OrganizationFactory(), 2).public_id
    records = IdempotencyRecord.objects.count()
    body = reservation_body(ssh_key_ids=[mine.public_id, wrong])

    response = client_key.post(
        "/api/v1/reservations", body, format="json", HTTP_IDEMPOTENCY_KEY="wrong"
    )

    error = assert_error(response, 400, "unknown_ssh_key", "ssh_key_ids")
    assert wrong in error["message"]
    assert Reservation.objects.count() == 0
    assert Allocation.objects.count() == 0
    assert IdempotencyRecord.objects.count() == records + 1  # the refusal is remembered
