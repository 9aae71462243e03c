import re

import pytest
from django.urls import reverse

from marketplace.models import ReservationStatus
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory, UserFactory
from tests.marketplace.market_helpers import (  # noqa: F401 (fixture)
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]


@pytest.fixture
def staff_client(client):
    user = UserFactory(username="staff", is_staff=True, is_superuser=True)
    client.force_login(user)
    return client


@pytest.fixture
def reservation():
    model = GpuModelFactory()
    make_rate(model, "2.0000")
    make_policy()
    make_nodes(SiteFactory(), model, 1)
    org = OrganizationFactory()
    quote_create(
        organization=org,
        gpu_model=model.slug,
        gpu_count=1,
        starts_at=tomorrow(),
        ends_at=tomorrow(2),
        tier="on_demand",
    )
    return reservation_create(
        organization=org,
        gpu_model=model.slug,
        gpu_count=2,
        starts_at=tomorrow(),
        ends_at=tomorrow(5),
        tier="on_demand",
    )


@pytest.mark.parametrize(
    "model",
    ["organization", "apikey", "ratecard", "pricingpolicy", "quote", "reservation", "allocation"],
)
def test_every_marketplace_changelist_renders(staff_client, reservation, model):
    response = staff_client.get(reverse(f"admin:marketplace_{model}_changelist"))
    assert response.status_code == 200


def test_the_reservation_page_shows_transitions_allocations_and_actions(staff_client, reservation):
    response = staff_client.get(
        reverse("admin:marketplace_reservation_change", args=[reservation.pk])
    )
    body = response.content.decode()
    assert response.status_code == 200
    assert "cancel, extend" in body
    assert body.count(reservation.site.nodes.first().hostname) >= 2  # one row per allocation


def _shown_terms(page) -> dict:
    """The terms the confirmation page posts back with its reason (the refund it showed)."""
    html = page.content.decode()
    return dict(re.findall(r'name="(refund_fraction_\d+)" value="([^"]*)"', html))


def test_staff_cancel_first_shows_the_terms_then_goes_through_the_service(
    staff_client, reservation
):
    url = reverse("admin:marketplace_reservation_changelist")
    asked = {"action": "cancel", "_selected_action": [reservation.pk]}

    page = staff_client.post(url, asked)
    no_reason = staff_client.post(url, {**asked, "confirmed": "yes", "reason": " "})

    assert page.status_code == 200 and no_reason.status_code == 200
    html = page.content.decode()
    assert reservation.public_id in html and 'name="reason"' in html
    # On-demand: charged as used, so no refund is promised (none would be credited).
    assert "none, charged as used" in html and "20.00 USD" not in html
    assert "Say why" in no_reason.content.decode()
    reservation.refresh_from_db()
    assert reservation.status != ReservationStatus.CANCELLED  # nothing before it is confirmed

    response = staff_client.post(
        url,
        {**asked, **_shown_terms(page), "confirmed": "yes", "reason": "node recalled by the site"},
        follow=True,
    )
    assert response.status_code == 200
    reservation.refresh_from_db()
    assert reservation.status == ReservationStatus.CANCELLED
    assert reservation.cancellation["actor_label"] == "staff:staff"
    assert reservation.cancellation["reason"] == "node recalled by the site"
    assert reservation.transitions.last().cause == "cancelled by staff: node recalled by the site"
    assert reservation.cancellation["refund_amount"] == "0.00"
    assert not reservation.allocations.filter(is_live=True).exists()
    assert reservation.transitions.last().actor_label == "staff:staff"


def test_staff_cannot_add_reservations_or_change_quotes(staff_client, reservation):
    assert staff_client.get(reverse("admin:marketplace_reservation_add")).status_code == 403
    quote = reservation.organization.quotes.get()
    url = reverse("admin:marketplace_quote_change", args=[quote.pk])
    response = staff_client.post(url, {"gpu_count": 7})
    assert response.status_code == 403
    quote.refresh_from_db()
    assert quote.gpu_count == 1


def test_the_reservation_page_shows_env_names_but_never_their_values(staff_client, reservation):
    reservation.workload = {
        "image": "nvcr.io/nvidia/pytorch:24.05-py3",
        "env": {"HF_TOKEN": "hf_supersecretvalue123"},
        "ports": [8888],
    }
    reservation.save(update_fields=["workload"])

    page = staff_client.get(
        reverse("admin:marketplace_reservation_change", args=[reservation.pk])
    ).content.decode()

    assert "HF_TOKEN" in page
    assert "hf_supersecretvalue123" not in page


def test_staff_cannot_edit_a_reservations_workload_by_hand(staff_client, reservation):
    url = reverse("admin:marketplace_reservation_change", args=[reservation.pk])
    staff_client.post(url, {"workload": '{"image": "evil:latest"}'})

    reservation.refresh_from_db()
    assert reservation.workload == {}
