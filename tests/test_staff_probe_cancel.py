"""Staff cancelling reservations from the admin: the refund the confirmation page showed is the
refund given, or nothing is cancelled (as the portal holds a customer to what they were shown)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import re
from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from billing.models import LedgerEntry
from marketplace.models import ReservationStatus, Tier
from tests.factories import UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(username="ops", is_staff=True, is_superuser=True))
    return client


def _confirm(staff_client, page, reservation, reason: str):
    shown = dict(re.findall(r'name="(refund_fraction_\d+)" value="([^"]*)"', page.content.decode()))
    return staff_client.post(
        reverse("admin:marketplace_reservation_changelist"),
        {"action": "cancel", "_selected_action": [reservation.pk], "confirmed": "yes",
         "reason": reason, **shown},
        follow=True,
    )  # fmt: skip


def test_staff_cancel_refuses_once_the_refund_shown_has_shrunk(
    staff_client, market, org, monkeypatch
):
    # Seven days and a minute ahead: a full refund when the page is shown ...
    start = (timezone.now() + timedelta(days=7, minutes=1)).replace(microsecond=0)
    reservation = book_at_market(org, start=start, hours=168, tier=Tier.RESERVED)
    page = staff_client.post(
        reverse("admin:marketplace_reservation_changelist"),
        {"action": "cancel", "_selected_action": [reservation.pk]},
    )
    assert "full refund" in page.content.decode()

    # ... but staff confirm it two minutes later, when the rule gives 50 %.
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(minutes=2))
    response = _confirm(staff_client, page, reservation, "site recalled")

    reservation.refresh_from_db()
    assert reservation.status == ReservationStatus.PENDING
    assert not reservation.cancellation
    assert "not the 100 % shown: nothing was cancelled" in response.content.decode()


def test_staff_cancel_gives_the_refund_shown(staff_client, market, org):
    start = (timezone.now() + timedelta(days=8)).replace(microsecond=0)
    reservation = book_at_market(org, start=start, hours=168, tier=Tier.RESERVED)
    page = staff_client.post(
        reverse("admin:marketplace_reservation_changelist"),
        {"action": "cancel", "_selected_action": [reservation.pk]},
    )

    _confirm(staff_client, page, reservation, "site recalled")

    reservation.refresh_from_db()
    assert reservation.status == ReservationStatus.CANCELLED
    assert reservation.cancellation["refund_fraction"] == "1"
    assert reservation.cancellation["reason"] == "site recalled"
    assert reservation.transitions.last().cause == "cancelled by staff: site recalled"


def test_staff_cancel_does_nothing_to_a_reservation_the_page_did_not_offer(
    staff_client, market, org
):
    # Not on the confirmation page (or shown there as refused): a confirmation without its
    # terms cancels nothing.
    reservation = book_at_market(org, start=timezone.now() + timedelta(days=1), hours=4)
    entries = LedgerEntry.objects.count()

    response = staff_client.post(
        reverse("admin:marketplace_reservation_changelist"),
        {"action": "cancel", "_selected_action": [reservation.pk], "confirmed": "yes",
         "reason": "forged"},
        follow=True,
    )  # fmt: skip

    reservation.refresh_from_db()
    assert reservation.status == ReservationStatus.PENDING
    assert not reservation.cancellation
    assert LedgerEntry.objects.count() == entries
    assert "its terms were not on the page confirmed" in response.content.decode()
