"""Staff who may only view a model in the admin do not run its actions: cancelling
reservations, revoking keys, calling off curtailments and resending webhook deliveries need
a permission to change the model (a view-only account, say support's, reads and acts not)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest
from django.contrib.admin.sites import site as admin_site
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from marketplace.models import ReservationStatus, WebhookDelivery
from tests.clients import HttpsClient
from tests.factories import UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
)

pytestmark = pytest.mark.django_db


def _staff(*codenames: str) -> HttpsClient:
    user = UserFactory(username="support", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = HttpsClient()
    client.force_login(user)
    return client


def test_a_view_only_staff_member_cannot_cancel_reservations(market, org):
    reservation = book_at_market(org, start=timezone.now() + timedelta(days=1), hours=4)
    client = _staff("view_reservation")
    url = reverse("admin:marketplace_reservation_changelist")

    listing = client.get(url)
    assert listing.status_code == 200
    assert "Cancel selected reservations" not in listing.content.decode()
    client.post(url, {"action": "cancel", "_selected_action": [reservation.pk], "index": 0})

    reservation.refresh_from_db()
    assert reservation.status == ReservationStatus.PENDING
    assert not reservation.cancellation


def test_staff_who_may_change_reservations_still_cancel_them(market, org):
    reservation = book_at_market(org, start=timezone.now() + timedelta(days=1), hours=4)
    client = _staff("view_reservation", "change_reservation")

    client.post(
        reverse("admin:marketplace_reservation_changelist"),
        {
            "action": "cancel",
            "_selected_action": [reservation.pk],
            "index": 0,
            "confirmed": "yes",
            "reason": "support ticket 42",
            f"refund_fraction_{reservation.pk}": "1",  # as the confirmation page showed it
        },
    )

    reservation.refresh_from_db()
    assert reservation.status == ReservationStatus.CANCELLED


def test_resending_webhook_deliveries_needs_the_change_permission(rf):
    model_admin = admin_site._registry[WebhookDelivery]
    viewer, changer = rf.get("/"), rf.get("/")
    viewer.user = UserFactory(username="viewer", is_staff=True)
    viewer.user.user_permissions.set(Permission.objects.filter(codename="view_webhookdelivery"))
    changer.user = UserFactory(username="changer", is_staff=True)
    changer.user.user_permissions.set(
        Permission.objects.filter(codename__in=["view_webhookdelivery", "change_webhookdelivery"])
    )

    assert "resend" not in model_admin.get_actions(viewer)
    assert "resend" in model_admin.get_actions(changer)
