"""Staff suspend an organisation (abuse, a stolen card, a company that stopped paying): its keys
are refused, its members read but change nothing, nothing is booked, extended or charged, its
webhooks wait; its running work is kept or stopped as staff chose; lifting it restores all."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import secrets
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.db import connections, transaction
from django.urls import reverse
from django.utils import timezone

from billing.services.topups import top_up_create
from config.errors import ApplicationError, Conflict, NotAvailable, PermissionDenied
from marketplace.mail import mail_outbox_deliver
from marketplace.models import (
    ApiKey,
    AuditEntry,
    DeliveryStatus,
    Invitation,
    ListingStatus,
    MailMessage,
    Membership,
    Organization,
    ResaleListing,
    Reservation,
    ReservationStatus,
    Role,
    SshKey,
    WebhookDelivery,
    WebhookEndpoint,
)
from marketplace.selectors.resale import resale_offer_rows
from marketplace.services.api_keys import api_key_create
from marketplace.services.organizations import (
    INVITATION_MAIL_TASK,
    invitation_accept,
    invitation_create,
    invitation_mail_send,
    organization_create,
    organization_suspend,
    organization_unsuspend,
)
from marketplace.services.reservations import reservation_create, reservation_extend
from marketplace.services.ssh_keys import ssh_key_create
from marketplace.services.webhook_sending import webhook_endpoint_send, webhook_endpoints_due
from marketplace.services.webhooks import (
    webhook_endpoint_create,
    webhook_endpoint_rotate_secret,
    webhook_endpoint_update,
)
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory
from tests.marketplace import resale_helpers as resale
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
from tests.marketplace.market_helpers import member_client, tomorrow
from tests.provisioning_support import ssh_key
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
        api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)  # an event
        organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")

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


def test_a_member_of_a_suspended_organisation_cannot_create_another_until_it_is_lifted(org, owner):
    """Evasion: a new organisation would carry on what the suspension stopped."""
    member = MembershipFactory(organization=org, role=Role.MEMBER)
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")
    before = Organization.objects.count()

    for user in (owner.user, member.user):
        with pytest.raises(PermissionDenied) as refused:
            organization_create(name="Fresh Start", owner=user)
        assert refused.value.code == "organization_suspended"
        assert f"You are a member of {org.name}, which Switchyard staff suspended" in (
            refused.value.message
        )
    client = HttpsClient()
    client.force_login(owner.user)
    page = client.post(
        reverse("portal:organization-new"),
        {"name": "Fresh Start", "once": secrets.token_urlsafe(8)},
    )
    assert page.status_code == 403
    assert "you cannot create another organisation until the suspension is lifted" in (
        page.content.decode()
    )
    assert Organization.objects.count() == before
    assert not Membership.objects.filter(organization__name="Fresh Start").exists()
    # Someone in no suspended organisation is not concerned.
    assert organization_create(name="Elsewhere", owner=UserFactory()).name == "Elsewhere"

    organization_unsuspend(organization=org, actor_label="staff:ops")
    again = client.post(
        reverse("portal:organization-new"),
        {"name": "Fresh Start", "once": secrets.token_urlsafe(8)},
    )
    assert again.status_code == 302
    assert Membership.objects.get(organization__name="Fresh Start").user == owner.user


def test_invitations_are_neither_sent_nor_accepted_while_suspended_and_stay_valid(org, owner):
    sent, token = invitation_create(actor=owner, email="grace@example.com", role=Role.ADMIN)
    expiring, expiring_token = invitation_create(
        actor=owner, email="alan@example.com", role="member"
    )
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")

    with pytest.raises(PermissionDenied) as refused:
        invitation_create(actor=owner, email="linus@example.com", role=Role.MEMBER)
    assert refused.value.code == "organization_suspended"
    assert_error(
        session_client(owner).post(
            "/api/v1/organization/invitations", {"email": "linus@example.com"}, format="json"
        ),
        403,
        "organization_suspended",
    )
    assert Invitation.objects.filter(organization=org).count() == 2

    grace = UserFactory()
    with pytest.raises(PermissionDenied) as refused:
        invitation_accept(token=token, user=grace)
    assert refused.value.code == "organization_suspended"
    client = HttpsClient()
    client.force_login(grace)
    page = client.post(f"/invitations/{token}")
    body = page.content.decode()
    assert page.status_code == 403
    assert "is suspended by Switchyard staff: nobody can join it" in body
    assert REASON not in body  # the invitee is no member: not told staff's reason
    assert not Membership.objects.filter(user=grace).exists()
    sent.refresh_from_db()
    assert (sent.accepted_at, sent.revoked_at) == (None, None)  # still open

    # Lifted: what is still valid can be accepted; what expired meanwhile cannot.
    Invitation.objects.filter(pk=expiring.pk).update(expires_at=timezone.now())
    organization_unsuspend(organization=org, actor_label="staff:ops")
    assert client.post(f"/invitations/{token}").status_code == 302
    assert Membership.objects.get(user=grace).role == Role.ADMIN
    with pytest.raises(Conflict) as expired:
        invitation_accept(token=expiring_token, user=UserFactory())
    assert expired.value.code == "invitation_expired"


def test_a_suspended_sellers_listings_are_neither_offered_nor_sold_until_it_is_lifted():
    m = resale.market()
    lst = resale.listing(m, gpus=4)
    wanted = {"gpu_count": 4, "starts_at": lst.starts_at, "ends_at": lst.ends_at}

    def offered() -> list:
        return [x.pk for x in resale_offer_rows(tier="on_demand", **wanted)]

    assert offered() == [lst.pk]
    organization_suspend(organization=m.seller, reason=REASON, actor_label="staff:ops")

    assert offered() == []
    with pytest.raises(NotAvailable) as refused:
        resale.buy(m, lst)
    assert refused.value.code == "listing_not_available"
    assert REASON not in refused.value.message  # the seller's suspension is not the buyer's
    assert not Reservation.objects.filter(organization=m.buyer).exists()
    lst.refresh_from_db()
    assert lst.status == ListingStatus.OPEN
    with pytest.raises(PermissionDenied):  # nor does it list more
        resale.listing(m, gpus=2, start_h=72)
    assert ResaleListing.objects.filter(organization=m.seller).count() == 1

    organization_unsuspend(organization=m.seller, actor_label="staff:ops")
    assert offered() == [lst.pk]
    bought = resale.buy(m, lst)
    lst.refresh_from_db()
    assert (lst.status, bought.organization) == (ListingStatus.SOLD, m.buyer)


def _call_while_a_suspension_is_written(organization, call) -> tuple[bool, str]:
    """call() while staff's suspension of `organization` is written and not yet committed:
    whether call came to wait for it (then it commits), and call's outcome ("ok" or the
    refusal's code)."""
    suspended, waited = threading.Event(), []

    def suspend_and_hold():
        try:
            with transaction.atomic():
                organization_suspend(organization=organization, reason=REASON, actor_label="s")
                suspended.set()
                waited.append(until_a_backend_waits_for_this_one())
        finally:
            connections.close_all()

    suspension = threading.Thread(target=suspend_and_hold)
    suspension.start()
    assert suspended.wait(60)
    try:
        call()
        outcome = "ok"
    except ApplicationError as exc:
        outcome = exc.code
    suspension.join(60)
    return waited == [True], outcome


@pytest.mark.django_db(transaction=True)
def test_a_purchase_waits_for_a_suspension_of_the_seller_being_written_and_is_refused():
    m = resale.market()
    lst = resale.listing(m, gpus=4)

    waited, outcome = _call_while_a_suspension_is_written(m.seller, lambda: resale.buy(m, lst))

    assert (waited, outcome) == (True, "listing_not_available")
    assert not Reservation.objects.filter(organization=m.buyer).exists()
    assert ResaleListing.objects.get(pk=lst.pk).status == ListingStatus.OPEN


@pytest.mark.django_db(transaction=True)
def test_creating_an_organisation_or_joining_one_waits_for_a_suspension_being_written(org, owner):
    _, token = invitation_create(actor=owner, email="grace@example.com", role=Role.MEMBER)
    grace = UserFactory()

    creating = _call_while_a_suspension_is_written(
        org, lambda: organization_create(name="Fresh Start", owner=owner.user)
    )
    organization_unsuspend(organization=org, actor_label="staff:ops")
    joining = _call_while_a_suspension_is_written(
        org, lambda: invitation_accept(token=token, user=grace)
    )

    assert creating == joining == (True, "organization_suspended")
    assert not Organization.objects.filter(name="Fresh Start").exists()
    assert not Membership.objects.filter(user=grace).exists()


@pytest.mark.django_db(transaction=True)
def test_a_suspension_of_the_seller_waits_for_a_purchase_under_way_which_stands():
    m = resale.market()
    lst = resale.listing(m, gpus=4)
    bought, waited = threading.Event(), []

    def buy_and_hold():
        try:
            with transaction.atomic():
                resale.buy(m, lst)
                bought.set()
                waited.append(until_a_backend_waits_for_this_one())
        finally:
            connections.close_all()

    purchase = threading.Thread(target=buy_and_hold)
    purchase.start()
    assert bought.wait(60)
    organization_suspend(organization=m.seller, reason=REASON, actor_label="staff:ops")
    purchase.join(60)

    assert waited == [True]  # the sale committed first: it stands
    assert ResaleListing.objects.get(pk=lst.pk).status == ListingStatus.SOLD
    assert Reservation.objects.filter(organization=m.buyer).count() == 1


def test_webhooks_held_longer_than_the_retry_window_get_all_of_it_from_the_lift(org, receiver):
    from django.test import override_settings

    with override_settings(WEBHOOK_ALLOW_INSECURE=True, WEBHOOK_TIMEOUT=2):
        endpoint, _ = webhook_endpoint_create(
            organization=org, url=receiver.url + "/hook", event_types=[]
        )
        api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)  # an event
        organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")
        # Suspended for 100 hours (more than WEBHOOK_RETRY_HOURS, 72), its last success before.
        long_ago = timezone.now() - timedelta(hours=100)
        WebhookEndpoint.objects.filter(pk=endpoint.pk).update(last_success_at=long_ago)
        WebhookDelivery.objects.update(retry_from=long_ago, next_attempt_at=long_ago)

        lifted = timezone.now()
        organization_unsuspend(organization=org, actor_label="staff:ops")
        receiver.answer(status=503)  # down for a moment as it is lifted
        assert webhook_endpoint_send(endpoint_id=endpoint.pk) == {
            "sent": 0, "failed": 1, "more": False,
        }  # fmt: skip

        delivery = WebhookDelivery.objects.get()
        assert delivery.status == DeliveryStatus.PENDING  # retried, as a new delivery is
        assert delivery.retry_from >= lifted
        assert 25 <= (delivery.next_attempt_at - timezone.now()).total_seconds() <= 30
        endpoint.refresh_from_db()
        assert endpoint.enabled and endpoint.failing_since >= lifted

        receiver.answer(status=200)
        WebhookDelivery.objects.update(next_attempt_at=timezone.now())
        assert webhook_endpoint_send(endpoint_id=endpoint.pk)["sent"] == 1
        assert len(receiver.received) == 2


@pytest.mark.django_db(transaction=True)
def test_a_sender_under_way_stops_at_the_next_delivery_once_a_suspension_commits(org, receiver):
    from django.test import override_settings

    with override_settings(WEBHOOK_ALLOW_INSECURE=True, WEBHOOK_TIMEOUT=5):
        endpoint, _ = webhook_endpoint_create(
            organization=org, url=receiver.url + "/hook", event_types=[]
        )
        for name in ("first", "second"):  # two events, two deliveries
            api_key_create(organization=org, name=name, scopes=["read"], created_by=None)
        receiver.answer(delay=1.0)  # the first try is under way while staff suspend it

        def suspend_during_the_first_try():
            try:
                receiver.wait_for("/hook")
                organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")
            finally:
                connections.close_all()

        suspension = threading.Thread(target=suspend_during_the_first_try)
        suspension.start()
        result = webhook_endpoint_send(endpoint_id=endpoint.pk)
        suspension.join(60)

    assert result == {"sent": 1, "failed": 0, "more": False}
    assert len(receiver.received) == 1
    statuses = WebhookDelivery.objects.order_by("event_created_at").values_list("status", flat=True)
    assert list(statuses) == [DeliveryStatus.SUCCEEDED, DeliveryStatus.PENDING]


def test_a_suspended_sellers_open_listing_reads_not_for_sale_to_the_seller_and_the_buyer():
    m = resale.market()
    lst = resale.listing(m, gpus=4)
    seller = session_client(MembershipFactory(organization=m.seller, role=Role.OWNER))
    buyer = member_client(m.buyer, "member")
    buy_page = reverse("portal:resale-buy", args=[lst.public_id])
    offer = {"gpu_count": 2, "starts_at": lst.starts_at.isoformat(),
             "ends_at": lst.ends_at.isoformat()}  # fmt: skip

    def seen() -> tuple[bool, bool, bool]:
        one = seller.get(f"/api/v1/resale/listings/{lst.public_id}").json()["for_sale"]
        (listed,) = seller.get("/api/v1/resale/listings").json()["results"]
        page = buyer.get(buy_page, offer)
        assert page.status_code == 200
        return one, listed["for_sale"], 'id="reserve"' in page.content.decode()

    assert seen() == (True, True, True)
    organization_suspend(organization=m.seller, reason=REASON, actor_label="staff:ops")

    assert seen() == (False, False, False)
    body = buyer.get(buy_page, offer).content.decode()
    assert "This listing is not for sale at the moment." in body
    assert REASON not in body and "suspended" not in body  # the seller's, not the buyer's
    assert ResaleListing.objects.get(pk=lst.pk).status == ListingStatus.OPEN

    organization_unsuspend(organization=m.seller, actor_label="staff:ops")
    assert seen() == (True, True, True)


def test_the_buy_page_of_a_listing_sold_meanwhile_offers_no_form():
    m = resale.market()
    lst = resale.listing(m, gpus=4)
    resale.buy(m, lst)
    page = member_client(OrganizationFactory(), "member").get(
        reverse("portal:resale-buy", args=[lst.public_id]),
        {"gpu_count": 1, "starts_at": lst.starts_at.isoformat(),
         "ends_at": lst.ends_at.isoformat()},
    )  # fmt: skip
    body = page.content.decode()
    assert "This listing is not for sale at the moment." in body
    assert 'id="reserve"' not in body


def test_an_invitation_queued_before_a_suspension_is_sent_saying_it_works_once_lifted(
    org, owner, mailoutbox
):
    invitation, token = invitation_create(actor=owner, email="grace@example.com", role="member")
    queued = MailMessage.objects.get(task=INVITATION_MAIL_TASK, args=[invitation.pk])
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")

    assert mail_outbox_deliver(message_id=queued.pk) == "sent"

    (mail,) = [m for m in mailoutbox if m.to == ["grace@example.com"]]
    assert f"/invitations/{token}" in mail.body
    assert (
        f"{org.name} is suspended by Switchyard staff at the moment: nobody can join it until "
        "the suspension is lifted. The link works once it is lifted, until it expires."
    ) in mail.body
    assert REASON not in mail.body  # the invitee is no member

    # Sent after the lift (or never suspended): no such line.
    organization_unsuspend(organization=org, actor_label="staff:ops")
    mailoutbox.clear()
    assert invitation_mail_send(invitation_id=invitation.pk) == 1
    assert "suspended" not in mailoutbox[0].body


def _grants(organization) -> tuple[int, int, int]:
    return (
        ApiKey.objects.filter(organization=organization).count(),
        SshKey.objects.filter(organization=organization).count(),
        WebhookEndpoint.objects.filter(organization=organization).count(),
    )


def _grant_calls(organization, *, n: int) -> dict:
    # What a member hands on: a key for a script, a key for its machines, an endpoint.
    return {
        "api key": lambda: api_key_create(
            organization=organization, name=f"ci-{n}", scopes=["read"], created_by=None
        ),
        "ssh key": lambda: ssh_key_create(
            organization=organization,
            user=None,
            name=f"laptop-{n}",
            public_key=ssh_key(body=bytes([n]) * 32),
        ),
        "webhook endpoint": lambda: webhook_endpoint_create(
            organization=organization, url=f"http://127.0.0.1:9/{n}", event_types=[]
        ),
    }


def test_a_suspended_organisation_is_given_no_api_key_ssh_key_or_webhook_endpoint(
    org, owner, settings
):
    settings.WEBHOOK_ALLOW_INSECURE = True  # a local address
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")

    for what, call in _grant_calls(org, n=1).items():
        with pytest.raises(PermissionDenied) as refused:
            call()
        assert refused.value.code == "organization_suspended", what
    assert _grants(org) == (0, 0, 0)
    # Through the API and the portal alike (the views refuse first; the services stand behind).
    member = session_client(owner)
    assert_error(
        member.post("/api/v1/ssh-keys", {"name": "x", "public_key": ssh_key()}, format="json"),
        403,
        "organization_suspended",
    )
    assert _grants(org) == (0, 0, 0)

    organization_unsuspend(organization=org, actor_label="staff:ops")
    for call in _grant_calls(org, n=2).values():
        call()
    assert _grants(org) == (1, 1, 1)


@pytest.mark.django_db(transaction=True)
def test_a_grant_under_way_waits_for_a_suspension_being_written_and_is_refused(org, settings):
    """The views' check reads the organisation as the request began; the service's, under its
    row, sees a suspension committed meanwhile (or waits for one being written)."""
    settings.WEBHOOK_ALLOW_INSECURE = True
    outcomes = {}
    for what, call in _grant_calls(org, n=3).items():
        outcomes[what] = _call_while_a_suspension_is_written(org, call)
        organization_unsuspend(organization=org, actor_label="staff:ops")

    assert outcomes == dict.fromkeys(
        ("api key", "ssh key", "webhook endpoint"), (True, "organization_suspended")
    )
    assert _grants(org) == (0, 0, 0)


def test_an_invitations_page_offers_no_join_while_its_organisation_is_suspended(org, owner):
    _, token = invitation_create(actor=owner, email="grace@example.com", role=Role.MEMBER)
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")
    signed_in, signed_out = HttpsClient(), HttpsClient()
    signed_in.force_login(UserFactory())

    for client in (signed_in, signed_out):
        page = client.get(f"/invitations/{token}")
        body = page.content.decode()
        assert page.status_code == 403
        assert f"{org.name} is suspended by Switchyard staff: nobody can join it" in body
        assert "open its link again once the suspension is lifted" in body
        assert f"Join {org.name}</button>" not in body and "to accept</a>" not in body
        assert REASON not in body and "invite you again" not in body

    organization_unsuspend(organization=org, actor_label="staff:ops")
    assert f"Join {org.name}</button>" in signed_in.get(f"/invitations/{token}").content.decode()
    assert "Sign in to accept" in signed_out.get(f"/invitations/{token}").content.decode()


def test_a_suspended_organisations_webhook_endpoint_is_neither_changed_nor_given_a_secret(
    org, settings
):
    settings.WEBHOOK_ALLOW_INSECURE = True  # a local address
    endpoint, secret = webhook_endpoint_create(
        organization=org, url="http://127.0.0.1:9/hook", event_types=[]
    )
    organization_suspend(organization=org, reason=REASON, actor_label="staff:ops")

    for call in (
        lambda: webhook_endpoint_update(endpoint=endpoint, url="http://127.0.0.1:9/elsewhere"),
        lambda: webhook_endpoint_update(endpoint=endpoint, enabled=False),
        lambda: webhook_endpoint_rotate_secret(endpoint=endpoint, expire_previous=True),
    ):
        with pytest.raises(PermissionDenied) as refused:
            call()
        assert refused.value.code == "organization_suspended"
    endpoint.refresh_from_db()
    assert (endpoint.url, endpoint.enabled, endpoint.secret) == (
        "http://127.0.0.1:9/hook", True, secret,
    )  # fmt: skip

    organization_unsuspend(organization=org, actor_label="staff:ops")
    webhook_endpoint_update(endpoint=endpoint, enabled=False)
    assert WebhookEndpoint.objects.get(pk=endpoint.pk).enabled is False
