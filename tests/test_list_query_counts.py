"""Customer-facing lists read their rows' related records in the list's queries, however many
rows there are: each API list and each portal page that lists costs the same queries with 25
rows of everything as with one (reservations, events, audit entries, webhook endpoints and
deliveries, resale listings, ledger lines and usage, invoices, API and SSH keys, members,
invitations, sites and GPU models, and a reservation's transitions, outages and GPUs)."""

# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.models import Invoice, LedgerEntry, LedgerKind
from inventory.models import OutageCause
from marketplace.models import (
    Event,
    Invitation,
    ReservationOutage,
    ReservationTransition,
    Role,
    WebhookEndpoint,
)
from marketplace.services.api_keys import api_key_create
from marketplace.services.audit import audit_record
from marketplace.services.quotes import quote_create
from marketplace.services.resale import listing_create
from marketplace.services.ssh_keys import ssh_key_create
from marketplace.services.webhooks import webhook_deliveries_create
from tests.clients import HttpsClient
from tests.factories import GpuModelFactory, MembershipFactory, SiteFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    fresh_rate_limits,
    market,
    org,
    owner,
    session_client,
)
from tests.marketplace.market_helpers import make_nodes, make_rate
from tests.marketplace.ssh_key_helpers import key_bytes, ssh_key

pytestmark = pytest.mark.django_db

# The lists, each growing by one row a round ({…}: filled in by _url). The GPU models with
# a query: without, a catalogue of one page comes from the per-process cache instead.
API = [
    "/api/v1/reservations", "/api/v1/events", "/api/v1/audit-log", "/api/v1/webhook-endpoints",
    "{deliveries}", "/api/v1/resale/listings", "/api/v1/billing/ledger", "/api/v1/billing/usage",
    "/api/v1/billing/invoices", "/api/v1/api-keys", "/api/v1/ssh-keys",
    "/api/v1/organization/members", "/api/v1/organization/invitations", "/api/v1/sites",
    "/api/v1/gpu-models?limit=100", "{availability}", "{reservation_api}",
]  # fmt: skip
PORTAL = [
    "/dashboard", "/reservations", "{reservation}", "/billing/", "/billing/usage",
    "/billing/statements", "{statement}", "/billing/invoices", "/team", "/webhooks",
    "{webhook}", "/api-keys", "/ssh-keys", "/audit-log", "/sites", "/resale", "/gpus",
    "{search}",
]  # fmt: skip


class History:
    """An organisation's rows, added `n` at a time by add(n): a reservation each (and a
    transition and an outage on the first, active one), a quote, an audit entry, a webhook
    endpoint (and a delivery of each new event to the first), a resale listing of its reserved
    term, two ledger lines, an invoice, an API key, an SSH key, a member, an invitation, and a
    site with a GPU model of its own."""

    def __init__(self, org, owner):
        self.org, self.owner, self.made = org, owner, 0
        now = timezone.now()
        self.endpoint = WebhookEndpoint.objects.create(
            organization=org, url="https://hooks.example.com/sy", secret="whsec_x"
        )
        self.first = book_at_market(
            org, start=now + timedelta(seconds=30), hours=48, gpus=1, active=True
        )
        self.term = book_at_market(
            org, start=now + timedelta(days=100), hours=168, gpus=1, tier="reserved"
        )

    def add(self, n: int) -> None:
        now = timezone.now()
        for _ in range(n):
            i = self.made
            self.made += 1
            reservation = book_at_market(
                self.org, start=now + timedelta(days=1 + i, hours=1), hours=2
            )
            ReservationTransition.objects.create(
                reservation=self.first, from_status="active", to_status="active",
                cause="extended", actor_label="test",
            )  # fmt: skip
            start = now - timedelta(hours=3 + i)
            ReservationOutage.objects.create(
                reservation=self.first, node=self.first.allocations.first().node,
                started_at=start, ended_at=start + timedelta(minutes=5),
                cause=OutageCause.GPU_FAILURE,
            )  # fmt: skip
            quote_create(
                organization=self.org, gpu_model="h100-sxm-80gb", gpu_count=1, tier="on_demand",
                starts_at=now + timedelta(days=40 + i),
                ends_at=now + timedelta(days=40 + i, hours=1),
            )  # fmt: skip
            audit_record(
                organization_id=self.org.pk, action="api_key.created", object_type="api_key",
                object_id=f"key_{i}", actor="ops",
            )  # fmt: skip
            WebhookEndpoint.objects.create(
                organization=self.org, url=f"https://hooks.example.com/{i}", secret="whsec_x"
            )
            listing_create(
                organization=self.org, reservation=self.term, gpu_count=1,
                starts_at=self.term.starts_at + timedelta(hours=i),
                ends_at=self.term.starts_at + timedelta(hours=i + 1), price_per_gpu_hour="5.00",
            )  # fmt: skip
            for kind in (LedgerKind.USAGE, LedgerKind.CREDIT):
                LedgerEntry.objects.create(
                    organization=self.org, kind=kind, amount_minor=-100, currency="usd",
                    reservation=reservation, period_start=now - timedelta(hours=2),
                    period_end=now - timedelta(hours=1), gpu_seconds=3600,
                    idempotency_key=f"t-{kind}-{i}", created_by=self.owner.user,
                )  # fmt: skip
            Invoice.objects.create(
                organization=self.org, stripe_invoice_id=f"in_{i}", stripe_customer_id="cus",
                status="open", currency="usd", period_start=now - timedelta(days=30 + i),
                period_end=now - timedelta(days=i),
            )  # fmt: skip
            api_key_create(
                organization=self.org, name=f"k{i}", scopes=["read"], created_by=self.owner.user
            )
            ssh_key_create(
                organization=self.org, user=self.owner.user, name=f"s{i}",
                public_key=ssh_key(body=key_bytes(i + 1)),
            )  # fmt: skip
            MembershipFactory(organization=self.org, role=Role.MEMBER)
            Invitation.objects.create(
                organization=self.org, email=f"i{i}@example.com", token_hash=f"{i:064d}",
                invited_by=self.owner.user, expires_at=now + timedelta(days=3),
            )  # fmt: skip
            model = GpuModelFactory(slug=f"gm-{i}", name=f"GM {i}")
            make_nodes(SiteFactory(), model, 1, gpus=1)
            make_rate(model, "3.00")
        for event in Event.objects.filter(organization=self.org, deliveries__isnull=True):
            webhook_deliveries_create(event=event)


def _url(history: History, url: str) -> str:
    now = timezone.now()
    start, end = now + timedelta(days=60), now + timedelta(days=60, hours=2)
    window = f"start={start:%Y-%m-%dT%H:00:00Z}&end={end:%Y-%m-%dT%H:00:00Z}"
    return url.format(
        deliveries=f"/api/v1/webhook-endpoints/{history.endpoint.public_id}/deliveries",
        availability=f"/api/v1/availability?gpu_count=1&{window}",
        reservation_api=f"/api/v1/reservations/{history.first.public_id}",
        reservation=f"/reservations/{history.first.public_id}",
        statement=f"/billing/statements/{now:%Y-%m}",
        webhook=f"/webhooks/{history.endpoint.public_id}",
        search=f"/gpus?gpu_count=1&{window}",
    )


def _queries(client, url: str) -> int:
    client.get(url)  # the session and what is cached once
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200, (url, response.content[:300])
    if url.startswith("/api/v1/") and "results" in response.json():
        assert len(response.json()["results"]) >= min(history_rows[0], 25), url
    return len(queries.captured_queries)


history_rows = [0]  # the rows of each kind now made (what a list shows at least)


@pytest.mark.parametrize("side", ["api", "portal"])
def test_every_list_costs_the_same_queries_for_one_row_as_for_25(market, org, owner, side):
    history = History(org, owner)
    if side == "api":
        client, urls = session_client(owner), API
    else:
        client, urls = HttpsClient(), PORTAL
        client.force_login(owner.user)

    history.add(1)
    history_rows[0] = 1
    few = {url: _queries(client, _url(history, url)) for url in urls}
    history.add(24)
    history_rows[0] = 25
    many = {url: _queries(client, _url(history, url)) for url in urls}

    assert many == few


def test_a_reservations_page_costs_the_same_queries_for_one_gpu_as_for_eight(market, org, owner):
    portal = HttpsClient()
    portal.force_login(owner.user)
    api = session_client(owner)
    start = timezone.now() + timedelta(seconds=30)
    one = book_at_market(org, start=start, hours=4, gpus=1, active=True)
    eight = book_at_market(org, start=start, hours=4, gpus=8, active=True)
    assert eight.allocations.count() == 8

    for prefix, client in (("/reservations/", portal), ("/api/v1/reservations/", api)):
        few = _queries(client, prefix + one.public_id)
        assert _queries(client, prefix + eight.public_id) == few, prefix
