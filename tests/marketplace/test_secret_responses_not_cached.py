"""Responses that carry a secret are never stored by a browser, proxy or CDN."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from tests.marketplace.api_fixtures import (  # noqa: F401
    fresh_rate_limits,
    org,
    owner,
    owner_client,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_rate_limits")]


def _no_store(response) -> bool:
    return "no-store" in {part.strip() for part in response.get("Cache-Control", "").split(",")}


def test_a_new_api_keys_secret_is_sent_no_store(owner_client):
    response = owner_client.post("/api/v1/api-keys", {"name": "ci"}, format="json")
    assert response.status_code == 201
    assert response.json()["secret"].startswith("sy_live_")
    assert _no_store(response)
    # Replayed with the same Idempotency-Key, too.
    replay = owner_client.post(
        "/api/v1/api-keys", {"name": "ci2"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    again = owner_client.post(
        "/api/v1/api-keys", {"name": "ci2"}, format="json", HTTP_IDEMPOTENCY_KEY="k-1"
    )
    assert _no_store(replay) and _no_store(again)


def test_an_invitations_token_is_sent_no_store(owner_client, mailoutbox):
    response = owner_client.post(
        "/api/v1/organization/invitations", {"email": "new@example.com", "role": "member"},
        format="json",
    )  # fmt: skip
    assert response.status_code == 201
    assert response.json()["token"]
    assert _no_store(response)


def test_responses_without_secrets_stay_cacheable_as_before(owner_client):
    assert not _no_store(owner_client.get("/api/v1/organization"))
    assert not _no_store(owner_client.get("/api/v1/ssh-keys"))
