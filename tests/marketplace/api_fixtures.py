"""Fixtures for the API tests (imported by tests/marketplace/test_api_*.py)."""

from datetime import timedelta
from decimal import Decimal

import pytest
import redis

from marketplace.models import ApiKeyScope, Reservation, ReservationStatus, Role, Term, Tier
from marketplace.services.api_keys import api_key_create
from marketplace.services.reservations import reservation_create
from marketplace.services.transitions import reservation_transition
from tests.clients import HttpsAPIClient
from tests.factories import (
    GpuModelFactory,
    MembershipFactory,
    OrganizationFactory,
    SiteFactory,
    UserFactory,
)
from tests.marketplace.market_helpers import (
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)


@pytest.fixture(autouse=True)
def fresh_rate_limits(settings):
    """Rate-limit counters live in Redis; each test starts with none.

    Only the counters are deleted (not FLUSHDB): the same Redis may carry Celery's queues.
    """
    client = redis.Redis.from_url(settings.CACHES["default"]["LOCATION"])
    try:
        keys = list(client.scan_iter(match="*ratelimit:*", count=1000))
        if keys:
            client.delete(*keys)
        yield
    finally:
        client.close()


def session_client(membership, *, org_header: str | None = None) -> HttpsAPIClient:
    client = HttpsAPIClient()
    client.force_login(membership.user)
    if org_header:
        client.credentials(HTTP_SY_ORGANIZATION=org_header)
    return client


def key_client(organization, scopes=(ApiKeyScope.READ, ApiKeyScope.WRITE)) -> HttpsAPIClient:
    _, secret = api_key_create(
        organization=organization, name="test key", scopes=list(scopes), created_by=None
    )
    client = HttpsAPIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    client.secret = secret
    return client


@pytest.fixture
def org():
    return OrganizationFactory()


@pytest.fixture
def owner(org):
    return MembershipFactory(organization=org, role=Role.OWNER)


@pytest.fixture
def owner_client(owner):
    return session_client(owner)


@pytest.fixture
def client_key(org):
    """A read+write key of `org`."""
    return key_client(org)


@pytest.fixture
def other_org():
    other = OrganizationFactory()
    MembershipFactory(organization=other, role=Role.OWNER)
    return other


def assert_error(response, status: int, code: str | None = None, field: str | None = None):
    """The one error shape: {"error": {type, code, field, message}}."""
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"type", "code", "field", "message"} <= set(error)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, error
    if field is not None:
        assert error["field"] == field, error
    return error


__all__ = [
    "fresh_rate_limits",
    "org",
    "owner",
    "owner_client",
    "client_key",
    "other_org",
    "session_client",
    "key_client",
    "assert_error",
    "UserFactory",
    "allow_all_funding",
    "market",
    "reservation_body",
    "make_reservation",
    "book_at_market",
    "tomorrow",
]


@pytest.fixture
def market(allow_all_funding):
    """One active site with two 8-GPU H100 nodes at 2.00 USD per GPU-hour, funding allowed."""
    site = SiteFactory(slug="abilene-1", region="us-central")
    gpu_model = GpuModelFactory()
    make_policy()
    make_rate(gpu_model, "2.00")
    make_nodes(site, gpu_model, 2, gpus=8)
    return site, gpu_model


def reservation_body(**overrides) -> dict:
    start = tomorrow()
    body = {
        "gpu_model": "h100-sxm-80gb",
        "gpu_count": 2,
        "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=3)).isoformat(),
        "tier": "on_demand",
    }
    return {**body, **overrides}


def make_reservation(client, **overrides) -> dict:
    response = client.post("/api/v1/reservations", reservation_body(**overrides), format="json")
    assert response.status_code == 201, response.content
    return response.json()


def book_at_market(org, *, start, hours=8, gpus=2, tier="on_demand", active=False, price=None):
    """A reservation on the market fixture's H100s at abilene-1 (a reserved one for a week's
    term), booked through the service; active: moved through provisioning to active; price:
    the price paid, set apart from the rate card."""
    reservation = reservation_create(
        organization=org,
        gpu_model="h100-sxm-80gb",
        gpu_count=gpus,
        starts_at=start,
        ends_at=start + timedelta(hours=hours),
        tier=tier,
        term="1w" if tier == Tier.RESERVED else Term.NONE,
        site="abilene-1",
    )
    if price is not None:
        Reservation.objects.filter(pk=reservation.pk).update(price_per_gpu_hour=Decimal(price))
        reservation.refresh_from_db()
    if active:
        for to in (ReservationStatus.PROVISIONING, ReservationStatus.ACTIVE):
            reservation = reservation_transition(
                reservation=reservation, to_status=to, cause="test", actor_label="test"
            )
    return reservation
