"""The SDK and the CLI against a live test server (pytest-django's live_server): real HTTP."""

import pytest

from marketplace.models import ApiKeyScope, Role
from marketplace.services.api_keys import api_key_create
from tests.factories import GpuModelFactory, MembershipFactory, OrganizationFactory, SiteFactory
from tests.marketplace.api_fixtures import fresh_rate_limits  # noqa: F401
from tests.marketplace.market_helpers import (  # noqa: F401
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
)


@pytest.fixture
def world(transactional_db, allow_all_funding, live_server, settings):  # noqa: F811
    """An organisation with an owner and a write key, one site with two 8-GPU H100 nodes."""
    settings.WEBHOOK_ALLOW_INSECURE = True
    site = SiteFactory(slug="abilene-1", region="us-central")
    gpu_model = GpuModelFactory()
    make_policy()
    make_rate(gpu_model, "2.00")
    make_nodes(site, gpu_model, 2, gpus=8)
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER)
    key, secret = api_key_create(
        organization=org, name="sdk", scopes=[ApiKeyScope.READ, ApiKeyScope.WRITE],
        created_by=owner.user,
    )  # fmt: skip

    class World:
        pass

    w = World()
    w.url, w.org, w.owner, w.key, w.secret = live_server.url, org, owner, key, secret
    w.site, w.gpu_model = site, gpu_model
    # SDK clients the test made: closed before the database goes, or their keep-alive
    # connections keep the live server's threads (and their database sessions) open.
    w.clients = []
    yield w
    for client in w.clients:
        client.close()
