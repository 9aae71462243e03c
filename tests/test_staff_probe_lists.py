"""Staff lists read their rows' related records in the list's queries, however many rows: the
curtailments (with the call or the staff member behind each), the demand-response calls (with
their site or zone) and the refunds (with who asked for each)."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from billing.models import Refund, TopUp
from marketplace.models import Curtailment, DemandResponseEvent, DemandResponseSource
from tests.factories import OrganizationFactory, PriceZoneFactory, SiteFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(username="ops", is_staff=True, is_superuser=True))
    return client


def _rows(n: int, start: int) -> None:
    """n of each: a staff curtailment and one from an operator's call, the call itself (one
    for a site, one for a zone), and a refund asked for by a staff member."""
    now = timezone.now()
    for i in range(start, start + n):
        source = DemandResponseSource.objects.create(name=f"ercot-{i}")
        site = SiteFactory()
        user = UserFactory(username=f"ops-{i}")
        call = DemandResponseEvent.objects.create(
            source=source, event_id=f"evt-{i}", site=site, starts_at=now + timedelta(hours=1),
            ends_at=now + timedelta(hours=2), target_mw=Decimal("1"),
        )  # fmt: skip
        DemandResponseEvent.objects.create(
            source=source, event_id=f"zone-{i}", zone=PriceZoneFactory(),
            starts_at=now + timedelta(hours=1), ends_at=now + timedelta(hours=2),
        )  # fmt: skip
        for by, origin in ((user, None), (None, call)):
            Curtailment.objects.create(
                site=site, shed_at=now + timedelta(hours=1), until=now + timedelta(hours=2),
                reason="grid call", announced_by=by, demand_response_event=origin,
            )  # fmt: skip
        org = OrganizationFactory()
        top_up = TopUp.objects.create(
            organization=org, amount_minor=5000, currency="usd", payment_method_id="pm_x",
            status="succeeded",
        )  # fmt: skip
        Refund.objects.create(
            organization=org, top_up=top_up, amount_minor=1000, currency="usd",
            reason="goodwill", created_by=user,
        )  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "marketplace_curtailment",
        "marketplace_demandresponseevent",
        "billing_refund",
    ],
)
def test_a_staff_list_takes_as_many_queries_for_many_rows_as_for_one(staff_client, name):
    url = reverse(f"admin:{name}_changelist")

    def queries() -> tuple[int, str]:
        with CaptureQueriesContext(connection) as ctx:
            response = staff_client.get(url)
        assert response.status_code == 200
        return len(ctx), response.content.decode()

    _rows(1, 0)
    one, _ = queries()
    _rows(5, 1)
    six, html = queries()

    assert six == one, f"{six - one} more queries for 5 more rows"
    if name == "marketplace_curtailment":
        assert "call ercot-3:evt-3" in html and "staff ops-3" in html
    if name == "billing_refund":
        assert "ops-4" in html
