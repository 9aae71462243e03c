"""Staff suspend an organisation (abuse, a stolen card, a company that stopped paying): its keys
are refused, its members read but change nothing, nothing is booked, extended or charged, its
webhooks wait; its running work is kept or stopped as staff chose; lifting it restores all."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.db import connections, transaction
from django.urls import reverse
from django.utils import timezone

from billing.services.topups import top_up_create
from config.errors import PermissionDenied
from marketplace.models import (
    AuditEntry,
    DeliveryStatus,
    Organization,
    Reservation,
    ReservationStatus,
    Role,
    WebhookDelivery,
)
from marketplace.services.api_keys import api_key_create
from marketplace.services.organizations import organization_suspend, organization_unsuspend
from marketplace.services.reservations import reservation_create, reservation_extend
from marketplace.services.webhook_sending import webhook_endpoint_send, webhook_endpoints_due
from marketplace.services.webhooks import webhook_endpoint_create
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    assert_error,
    book_at_market,
    fresh_rate_limits,
    key_client,
    market,
    org,
    owner,
    session_client,
)
from tests.marketplace.market_helpers import tomorrow
from tests.races import until_a_backend_waits_for_this_one
from tests.webhook_receiver import receiver  # noqa: F401

pytestmark = pytest.mark.django_db

REASON = "Card reported stolen by its holder."


@pytest.fixture
def staff_client():
    client = HttpsClient()
    client.force_login(UserFactory(username="ops", is_staff=True, is_superuser=True))
    return client


def _suspend(staff_client, organization, **form):
    return staff_client.post(
        reverse("admin:marketplace_organization_changelist"),
        {"action": "suspend", "_selected_action": [organization.pk], **form},
        follow=True,
    )


def _suspended(organization) -> bool:
    return Organization.objects.get(pk=organization.pk).suspended_at is not None


def test_suspending_asks_first_with_a_reason_and_a_choice_and_needs_the_change_permission(
    staff_client, market, org, owner
):
    running = book_at_market(org, start=timezone.now(), active=True)

    page = _suspend(staff_client, org)
    assert page.status_code == 200
    body = page.content.decode()
    assert "Suspend 1 organisation(s)?" in body
    assert running.public_id in body  # what would be kept or stopped
    assert not _suspended(org)

    # Confirmed without a reason, or without choosing what happens to its work: asked again.
    for form in ({"running": "keep"}, {"reason": REASON}, {"reason": " ", "running": "stop"}):
        again = _suspend(staff_client, org, confirmed="yes", **form)
        assert "Say why" in again.content.decode()
        assert not _suspended(org)

    # Staff who may only view organisations act on nothing, even with a forged POST.
    viewer = UserFactory(is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_organization"))
    client = HttpsClient()
    client.force_login(viewer)
    _suspend(client, org, confirmed="yes", reason=REASON, running="stop")
    assert not _suspended(org)
    assert Reservation.objects.get(pk=running.pk).status == ReservationStatus.ACTIVE


def test_a_suspended_organisation_is_refused_everything_but_reading_until_it_is_lifted(
    staff_client, market, org, owner, mailoutbox, django_capture_on_commit_callbacks
):
    MembershipFactory(organization=org, role=Role.MEMBER)  # not e-mailed
    MembershipFactory(organization=org, role=Role.OWNER, user__is_active=False)  # nor this one
    running = book_at_market(org, start=timezone.now(), active=True)
    booked = book_at_market(org, start=timezone.now() + timedelta(days=2))
    key = key_client(org)
    for _ in range(2):  # the second from the key cache
        assert key.get("/api/v1/organization").status_code == 200

    with django_capture_on_commit_callbacks(execute=True):
        page = _suspend(staff_client, org, confirmed="yes", reason=REASON, running="keep")
    assert "suspended; its reservations keep running" in page.content.decode()

    # Its keys do nothing, not even read the catalogue.
    for path in ("/api/v1/organization", "/api/v1/gpu-models", "/api/v1/reservations"):
        error = assert_error(key.get(path), 403, "organization_suspended")
        assert REASON in error["message"]
    # Its members read, and see why; they change nothing.
    member = session_client(owner)
    shown = member.get("/api/v1/organization").json()
    assert shown["suspension_reason"] == REASON and shown["suspended_at"]
    assert member.get(f"/api/v1/reservations/{running.public_id}").status_code == 200
    refused = member.post(
        "/api/v1/reservations",
        {"gpu_model": "h100-sxm-80gb", "gpu_count": 1, "tier": "on_demand",
         "starts_at": (timezone.now() + timedelta(days=1)).isoformat(),
         "ends_at": (timezone.now() + timedelta(days=1, hours=2)).isoformat()},
        format="json",
    )  # fmt: skip
    assert_error(refused, 403, "organization_suspended")
    # The services refuse too, whoever calls them: booking, extending, topping up.
    start = timezone.now() + timedelta(days=3)
    with pytest.raises(PermissionDenied) as booking:
        reservation_create(organization=org, gpu_model="h100-sxm-80gb", gpu_count=1,
                           starts_at=start, ends_at=start + timedelta(hours=1),
                           tier="on_demand", site="abilene-1")  # fmt: skip
    assert booking.value.code == "organization_suspended"
    with pytest.raises(PermissionDenied):
        reservation_extend(
            reservation=running, new_ends_at=running.ends_at + timedelta(hours=1), actor_label="t"
        )
    with pytest.raises(PermissionDenied):
        top_up_create(organization=org, amount=Decimal("20.00"))
    assert Reservation.objects.filter(organization=org).count() == 2
    running.refresh_from_db()
    assert running.status == ReservationStatus.ACTIVE  # kept, as chosen
    assert Reservation.objects.get(pk=booked.pk).status == ReservationStatus.PENDING
    # What only stops spending stays open to its members (never to its keys): cancelling.
    assert_error(key.post(f"/api/v1/reservations/{booked.public_id}/cancel"), 403)
    cancelled = member.post(f"/api/v1/reservations/{booked.public_id}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"

    (suspended_mail,) = mailoutbox
    assert suspended_mail.to == [owner.user.email]
    assert REASON in suspended_mail.body
    entry = AuditEntry.objects.get(organization=org, action="organization.suspend")
    assert (entry.actor, entry.object_id) == ("staff:ops", org.public_id)
    assert entry.changes["after"] == {"suspended": True, "reason": REASON}

    # Lifted: everything works again, at once (the key from the cache too), audited, told.
    with django_capture_on_commit_callbacks(execute=True):
        staff_client.post(
            reverse("admin:marketplace_organization_changelist"),
            {"action": "unsuspend", "_selected_action": [org.pk]},
        )
    assert not _suspended(org)
    assert key.get("/api/v1/organization").status_code == 200
    assert member.get("/api/v1/organization").json()["suspended_at"] is None
    assert AuditEntry.objects.filter(organization=org, action="organization.unsuspend").count() == 1
    assert [m.to for m in mailoutbox] == [[owner.user.email], [owner.user.email]]
    assert "lifted" in mailoutbox[1].subject


def test_stopping_its_work_stops_running_reservations_now_and_cancels_booked_ones(
    staff_client, market, org, owner
):
    running = book_at_market(org, start=timezone.now(), active=True)
    booked = book_at_market(org, start=timezone.now() + timedelta(days=2))
    # Kept at first; staff decide later to stop it (its first reason stands).
    _suspend(staff_client, org, confirmed="yes", reason=REASON, running="keep")
    assert Reservation.objects.get(pk=running.pk).status == ReservationStatus.ACTIVE
    before = timezone.now()

    page = _suspend(staff_client, org, confirmed="yes", reason="Still unpaid.", running="stop")

    assert Organization.objects.get(pk=org.pk).suspension_reason == REASON
    running.refresh_from_db()
    assert running.status == ReservationStatus.RELEASING
    assert before <= running.released_at <= timezone.now()  # billed until the stop
    assert running.transitions.last().cause == (
        "cancelled by staff: organisation suspended: Still unpaid."
    )
    assert running.cancellation["actor_label"] == "staff:ops"
    assert Reservation.objects.get(pk=booked.pk).status == ReservationStatus.CANCELLED
    assert f"stopped or cancelled: {running.public_id}, {booked.public_id}" in (
        page.content.decode()
    )


def test_a_suspended_organisations_webhooks_wait_and_go_once_it_is_lifted(org, receiver):
    from django.test import override_settings

    with override_settings(WEBHOOK_ALLOW_INSECURE=True, WEBHOOK_TIMEOUT=2):
        endpoint, _ = webhook_endpoint_create(
            organization=org, url=receiver.url + "/hook", event_types=[]
        )
        organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")
        api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)  # an event

        assert endpoint.pk not in webhook_endpoints_due()
        assert webhook_endpoint_send(endpoint_id=endpoint.pk) == {
            "sent": 0, "failed": 0, "more": False,
        }  # fmt: skip
        assert receiver.received == []
        assert WebhookDelivery.objects.get().status == DeliveryStatus.PENDING

        organization_unsuspend(organization=org, actor_label="staff:ops")
        assert endpoint.pk in webhook_endpoints_due()
        assert webhook_endpoint_send(endpoint_id=endpoint.pk)["sent"] == 1
        assert len(receiver.received) == 1


def test_the_portal_says_why_and_changes_nothing_but_stopping_work(market, org, owner):
    running = book_at_market(org, start=timezone.now(), active=True)
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")
    client = HttpsClient()
    client.force_login(owner.user)

    page = client.get(reverse("portal:dashboard"))
    assert page.status_code == 200
    assert f"{org.name} is suspended by Switchyard staff: {REASON}" in page.content.decode()

    refused = client.post(reverse("portal:api-keys"), {"name": "ci", "scopes": ["read"]})
    assert refused.status_code == 403
    assert "This organisation is suspended" in refused.content.decode()
    assert not org.api_keys.exists()

    # Stopping its own work early stays open: it only stops spending.
    stop = reverse("portal:reservation-cancel", kwargs={"public_id": running.public_id})
    assert client.get(stop).status_code == 200
    assert client.post(stop, {"confirm": "on"}).status_code == 302
    assert Reservation.objects.get(pk=running.pk).status == ReservationStatus.RELEASING


def test_a_suspended_organisations_card_is_not_charged_by_an_automatic_recharge(org, owner):
    from billing.models import BillingAccount, TopUp
    from billing.services.accounts import billing_account_get_or_create
    from billing.services.topups import auto_recharge_check

    billing_account_get_or_create(organization=org)
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, stripe_customer_id="cus_x", default_payment_method_id="pm_x",
        recharge_threshold_minor=5000, recharge_amount_minor=10000,
    )  # fmt: skip
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")

    assert auto_recharge_check(organization=org) is None  # its balance (0) is below 50.00
    assert not TopUp.objects.filter(organization=org).exists()

    organization_unsuspend(organization=org, actor_label="staff:ops")
    assert auto_recharge_check(organization=org).amount_minor == 10000


@pytest.mark.django_db(transaction=True)
def test_a_suspension_waits_for_a_booking_under_way_and_the_next_one_is_refused(market, org):
    """No booking slips past a suspension: one under way holds the organisation's row (shared)
    until it commits, so the suspension waits for it (and staff's "stop" then sees it)."""
    booked, waited = threading.Event(), []

    def book_and_hold():
        try:
            with transaction.atomic():
                book_at_market(org, start=tomorrow(), hours=2)
                booked.set()
                waited.append(until_a_backend_waits_for_this_one())
        finally:
            connections.close_all()

    booking = threading.Thread(target=book_and_hold)
    booking.start()
    assert booked.wait(60)
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")
    booking.join(60)

    assert waited == [True]
    assert Reservation.objects.filter(organization=org).count() == 1  # committed first
    with pytest.raises(PermissionDenied):
        book_at_market(org, start=tomorrow(48), hours=2)
    assert Reservation.objects.filter(organization=org).count() == 1
