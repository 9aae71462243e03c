from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import stripe
from psycopg.types.range import Range

from billing.services.accounts import billing_account_get_or_create
from billing.services.payment_methods import payment_method_attach, setup_intent_create
from billing.stripe_gateway import StripeGateway, build_client, set_gateway_override
from config.celery import app as celery_app
from marketplace.models import Allocation, Reservation, ReservationStatus, Tier
from tests.billing.stripe_recording import DisputesBesideLocalstripe, RecordingHTTPClient
from tests.factories import GpuModelFactory, MembershipFactory, NodeFactory


@pytest.fixture
def eager_celery():
    """Run .delay() inline, so on_commit → task → Stripe happens inside the test."""
    previous = celery_app.conf.task_always_eager
    celery_app.conf.task_always_eager = True
    yield
    celery_app.conf.task_always_eager = previous


@pytest.fixture
def org(db):
    # An unusable password: hashing a real one costs about a second per test here.
    membership = MembershipFactory(user__email="owner@example.com", user__password="!")
    billing_account_get_or_create(organization=membership.organization)
    return membership.organization


def stripe_client(localstripe) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_switchyard",
        base_addresses={"api": localstripe.url},
        max_network_retries=0,
        http_client=stripe.RequestsClient(),
    )


def save_card(localstripe, organization, card: str = "pm_card_visa") -> str:
    """What the portal does: SetupIntent, Stripe.js confirmCardSetup, then attach.

    localstripe's SetupIntent confirmation does not attach the card (real Stripe does), so the
    test attaches it through our service, as TESTING-NOTES advises.
    """
    intent = setup_intent_create(organization=organization)
    confirmed = stripe_client(localstripe).v1.setup_intents.confirm(
        intent["setup_intent_id"], {"payment_method": card}
    )
    pm = payment_method_attach(
        organization=organization,
        payment_method_id=confirmed.payment_method,
        setup_intent_id=confirmed.id,
    )
    return pm.stripe_payment_method_id


def events_processed_at_once(events) -> list:
    """Process these Stripe webhook events in threads released together, each on its own
    connection to PostgreSQL; returns what each processing answered."""
    import threading

    from django.db import connection

    from billing.services.webhooks import webhook_event_process

    barrier, outcomes = threading.Barrier(len(events)), []

    def process(event):
        try:
            barrier.wait()
            outcomes.append(webhook_event_process(event_id=event.pk))
        finally:
            connection.close()

    threads = [threading.Thread(target=process, args=(e,)) for e in events]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def paid_top_up(localstripe, organization, amount_minor: int = 10000):
    """A top-up paid by card at localstripe and credited, as a customer's would be (automatic
    recharge off): the top-up and its PaymentIntent."""
    from billing.models import BillingAccount, TopUp
    from billing.services.topups import top_up_succeed

    BillingAccount.objects.filter(organization=organization).update(auto_recharge_enabled=False)
    pm_id = save_card(localstripe, organization)
    account = BillingAccount.objects.get(organization=organization)
    top_up = TopUp.objects.create(organization=organization, amount_minor=amount_minor,
                                  currency="usd", payment_method_id=pm_id)  # fmt: skip
    pi = stripe_client(localstripe).v1.payment_intents.create(
        {
            "amount": amount_minor,
            "currency": "usd",
            "customer": account.stripe_customer_id,
            "payment_method": pm_id,
            "off_session": True,
            "confirm": True,
            "metadata": {"top_up": str(top_up.pk)},
        }  # fmt: skip
    )
    assert top_up_succeed(top_up_id=top_up.pk, payment_intent_id=pi.id)
    return top_up, pi


T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


def make_reservation(
    organization,
    *,
    tier: str = Tier.ON_DEMAND,
    gpu_count: int = 2,
    price: Decimal = Decimal("2.0000"),
    starts_at: datetime = T0,
    hours: int = 10,
    status: str = ReservationStatus.ACTIVE,
    activated_at: datetime | None = None,
    released_at: datetime | None = None,
    node=None,
    total: Decimal | None = None,
):
    node = node or NodeFactory(gpus=8, gpu_model=GpuModelFactory())
    ends_at = starts_at + timedelta(hours=hours)
    reservation = Reservation.objects.create(
        organization=organization,
        gpu_model=node.gpu_model,
        site=node.site,
        gpu_count=gpu_count,
        tier=tier,
        term="1w" if tier == Tier.RESERVED else "none",
        starts_at=starts_at,
        ends_at=ends_at,
        currency="usd",
        price_per_gpu_hour=price,
        total_amount=total if total is not None else price * gpu_count * hours,
        status=status,
        activated_at=activated_at,
        released_at=released_at,
    )
    for gpu in node.gpus.order_by("index")[:gpu_count]:
        Allocation.objects.create(
            reservation=reservation,
            gpu=gpu,
            node=node,
            period=Range(starts_at, ends_at, "[)"),
            is_live=status in ("pending", "scheduled", "provisioning", "active", "releasing"),
        )
    return reservation


@pytest.fixture
def recorder(settings):
    """The Stripe gateway, sending through a RecordingHTTPClient (for what localstripe lacks)."""
    settings.STRIPE_SECRET_KEY = "sk_test_recording"
    settings.STRIPE_API_BASE = ""  # the real address: nothing is sent, only recorded
    client = RecordingHTTPClient()
    set_gateway_override(StripeGateway(build_client(http_client=client)))
    yield client
    set_gateway_override(None)


@pytest.fixture
def stripe_disputes(localstripe):
    """Stripe beside localstripe, with the disputes localstripe lacks: the list to put Stripe's
    dispute objects in (GET /v1/disputes answers them)."""
    client = DisputesBesideLocalstripe()
    set_gateway_override(StripeGateway(build_client(http_client=client)))
    yield client.disputes
    set_gateway_override(None)
