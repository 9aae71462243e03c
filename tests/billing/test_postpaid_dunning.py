"""A postpaid organisation whose invoice goes unpaid: Stripe's word (signed webhook deliveries
through the real endpoint) makes the invoice past due, the customer is told (an event, a
billing notice e-mailed to owners and billing members), and once it has been past due for
longer than BILLING_POSTPAID_PAST_DUE_GRACE the funding gate refuses new reservations and
extensions (402 invoice_past_due, nothing written) until Stripe says it is paid. Running
reservations keep running; prepaid organisations are not concerned."""

import json
import time
from datetime import timedelta

import pytest
from django.db import connection
from django.urls import reverse
from django.utils import timezone

from billing.models import BillingAccount, BillingMode, BillingNotice, Hold, Invoice, WebhookEvent
from billing.selectors import _PAST_DUE_SQL
from billing.tasks import webhook_process
from marketplace.models import Event, Reservation, Role
from tests.billing.test_webhooks import SECRET, URL, sign
from tests.factories import GpuModelFactory, MembershipFactory, SiteFactory
from tests.marketplace.api_fixtures import key_client
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow

pytestmark = pytest.mark.django_db

PAY_URL = "https://invoice.stripe.com/i/acct_1/test_in_dun"
DAY = 86400


@pytest.fixture
def postpaid(org, settings):
    """`org` (its owner owner@example.com) approved for postpaid invoicing, with a billing
    member and a plain member, capacity to book, and Stripe's webhook secret."""
    settings.STRIPE_WEBHOOK_SECRET = SECRET
    BillingAccount.objects.filter(organization=org).update(
        mode=BillingMode.POSTPAID, stripe_customer_id="cus_dun"
    )
    MembershipFactory(organization=org, role=Role.BILLING, user__email="billing@example.com",
                      user__password="!")  # fmt: skip
    MembershipFactory(organization=org, role=Role.MEMBER, user__email="member@example.com",
                      user__password="!")  # fmt: skip
    model = GpuModelFactory()
    make_rate(model, "2.5000")
    make_policy()
    make_nodes(SiteFactory(), model, 1)
    return org


def deliver(client, event_id: str, event_type: str, status: str, *, ago: int = 0,
            paid: int = 0, attempts: int = 0, invoice_id: str = "in_dun",
            customer: str = "cus_dun") -> dict:  # fmt: skip
    """A signed delivery of Stripe's invoice event (sent `ago` seconds ago), then what the
    worker does with it; the endpoint's answer."""
    invoice = {"id": invoice_id, "object": "invoice", "customer": customer, "status": status,
               "currency": "usd", "amount_due": 12345, "amount_paid": paid,
               "amount_remaining": 12345 - paid, "attempt_count": attempts,
               "attempted": attempts > 0, "hosted_invoice_url": PAY_URL,
               "period_start": 1793491200, "period_end": 1796083200}  # fmt: skip
    payload = json.dumps({"id": event_id, "object": "event", "type": event_type,
                          "created": int(time.time()) - ago,
                          "data": {"object": invoice}}).encode()  # fmt: skip
    response = client.post(URL, payload, content_type="application/json",
                           HTTP_STRIPE_SIGNATURE=sign(payload))  # fmt: skip
    assert response.status_code == 200, response.content
    webhook_process(WebhookEvent.objects.get(stripe_event_id=event_id).pk)
    return response.json()


def book(api, hours: int = 2):
    return api.post("/api/v1/reservations", {"gpu_model": "h100-sxm-80gb", "gpu_count": 1,
                    "starts_at": tomorrow().isoformat(), "ends_at": tomorrow(hours).isoformat(),
                    "tier": "on_demand"}, format="json")  # fmt: skip


def invoice_events(org) -> list[str]:
    return list(
        Event.objects.filter(organization=org, object_type="invoice")
        .order_by("created_at", "id")
        .values_list("type", flat=True)
    )


def test_a_failed_payment_makes_the_invoice_past_due_once_and_tells_owners_and_billing(
    client, postpaid, mailoutbox, django_capture_on_commit_callbacks
):
    deliver(client, "evt_fin", "invoice.finalized", "open", ago=3 * DAY)
    with django_capture_on_commit_callbacks(execute=True):
        deliver(client, "evt_fail_1", "invoice.payment_failed", "open", ago=2 * DAY, attempts=1)
    first_failure = Invoice.objects.get().payment_failed_at
    # Stripe delivers the same event again, then its next attempt fails too: nothing new.
    with django_capture_on_commit_callbacks(execute=True):
        again = deliver(client, "evt_fail_1", "invoice.payment_failed", "open", ago=2 * DAY,
                        attempts=1)  # fmt: skip
        deliver(client, "evt_fail_2", "invoice.payment_failed", "open", ago=DAY, attempts=2)

    assert again["duplicate"] is True
    invoice = Invoice.objects.get()
    assert (invoice.status, invoice.past_due) == ("open", True)
    # Since the first failure, as Stripe stamped it (not when the worker got to it).
    assert abs((timezone.now() - invoice.payment_failed_at) - timedelta(days=2)) < timedelta(
        seconds=30
    )
    assert invoice.payment_failed_at == first_failure
    assert invoice_events(postpaid) == ["invoice.finalized", "invoice.payment_failed"]
    event = Event.objects.get(organization=postpaid, type="invoice.payment_failed")
    assert (event.object_id, event.data["past_due"], event.data["amount_due"]) == (
        "in_dun", True, "123.45",
    )  # fmt: skip
    assert event.data["hosted_invoice_url"] == PAY_URL
    (notice,) = BillingNotice.objects.filter(organization=postpaid)
    assert notice.kind == "invoice_past_due"
    refused_from = invoice.payment_failed_at + timedelta(days=7)
    assert notice.message == (
        "Invoice in_dun (123.45 USD due, for 2026-11-01 to 2026-12-01) is past due: its "
        f"payment failed. Pay it at {PAY_URL}. If it is still unpaid at "
        f"{refused_from:%Y-%m-%d %H:%M} UTC, new reservations and extensions will be refused "
        "until it is paid; running reservations keep running."
    )
    (mail,) = mailoutbox
    assert sorted(mail.to) == ["billing@example.com", "owner@example.com"]
    assert mail.subject == "Switchyard billing: invoice past due"
    assert mail.body == (
        f"{notice.message}\n\nBilling of {postpaid.name} in the portal:\n"
        "http://127.0.0.1:8000/billing/invoices\n"
    )  # the page to pay it from


def test_a_failure_delivered_after_the_invoice_was_paid_changes_nothing(client, postpaid):
    deliver(client, "evt_fin", "invoice.finalized", "open", ago=30 * DAY)
    deliver(client, "evt_paid", "invoice.paid", "paid", ago=20 * DAY, paid=12345, attempts=2)
    # Stripe's earlier failure (the first attempt) arrives last: out of order.
    deliver(client, "evt_fail", "invoice.payment_failed", "open", ago=29 * DAY, attempts=1)

    invoice = Invoice.objects.get()
    assert (invoice.status, invoice.payment_failed_at, invoice.past_due) == ("paid", None, False)
    assert invoice_events(postpaid) == ["invoice.finalized", "invoice.paid"]
    assert not BillingNotice.objects.filter(organization=postpaid).exists()
    api = key_client(postpaid)
    assert api.get("/api/v1/billing/balance").json()["invoice_past_due"] is None
    [listed] = api.get("/api/v1/billing/invoices").json()
    assert (listed["status"], listed["past_due"], listed["payment_failed_at"]) == (
        "paid", False, None,
    )  # fmt: skip
    assert book(api).status_code == 201


def test_bookings_and_extensions_are_refused_after_the_grace_until_the_invoice_is_paid(
    client, postpaid, settings
):
    api = key_client(postpaid)
    deliver(client, "evt_fail", "invoice.payment_failed", "open", ago=6 * DAY, attempts=1)
    since = Invoice.objects.get().payment_failed_at

    # Within the default grace (7 days): booked, and the balance says when that ends.
    booked = book(api)
    assert booked.status_code == 201, booked.content
    balance = api.get("/api/v1/billing/balance").json()
    assert balance["invoice_past_due"]["id"] == "in_dun"
    assert balance["invoice_past_due"]["payment_failed_at"] == since.isoformat().replace(
        "+00:00", "Z"
    )
    refused_from = since + timedelta(days=7)
    assert balance["bookings_refused_from"] == refused_from.isoformat().replace("+00:00", "Z")

    settings.BILLING_POSTPAID_PAST_DUE_GRACE = timedelta(days=5)
    reservations, holds = (
        Reservation.objects.count(),
        list(Hold.objects.values_list("pk", "amount_minor")),
    )
    events = Event.objects.count()
    refused = book(api)
    reservation_id = booked.json()["id"]
    extension = api.post(f"/api/v1/reservations/{reservation_id}/extend",
                         {"ends_at": tomorrow(6).isoformat()}, format="json")  # fmt: skip

    for response, what in ((refused, "reservation"), (extension, "extension")):
        assert response.status_code == 402, response.content
        error = response.json()["error"]
        assert error["code"] == "invoice_past_due"
        assert error["message"] == (
            f"This {what} is refused: invoice in_dun (123.45 USD due) has been past due since "
            f"{since:%Y-%m-%d %H:%M} UTC: pay it at {PAY_URL}. New reservations and "
            "extensions are accepted again once it is paid (running ones keep running)."
        )
    # Nothing written: no reservation, no hold, no event, and the booked one's end unmoved.
    assert Reservation.objects.count() == reservations
    assert list(Hold.objects.values_list("pk", "amount_minor")) == holds
    assert Event.objects.count() == events
    assert Reservation.objects.get(public_id=reservation_id).ends_at == tomorrow(2)

    deliver(client, "evt_paid", "invoice.paid", "paid", paid=12345, attempts=2)

    assert book(api).status_code == 201
    extended = api.post(f"/api/v1/reservations/{reservation_id}/extend",
                        {"ends_at": tomorrow(6).isoformat()}, format="json")  # fmt: skip
    assert extended.status_code == 200, extended.content
    assert api.get("/api/v1/billing/balance").json()["invoice_past_due"] is None
    invoice = Invoice.objects.get()
    # The date stays as history; the invoice no longer blocks.
    assert (invoice.status, invoice.payment_failed_at, invoice.past_due) == ("paid", since, False)


def test_with_no_grace_a_failure_refuses_bookings_at_once(client, postpaid, settings):
    settings.BILLING_POSTPAID_PAST_DUE_GRACE = timedelta(0)
    deliver(client, "evt_fail", "invoice.payment_failed", "open", attempts=1)

    refused = book(key_client(postpaid))

    assert refused.status_code == 402
    assert refused.json()["error"]["code"] == "invoice_past_due"
    assert not Reservation.objects.exists() and not Hold.objects.exists()
    notice = BillingNotice.objects.get(organization=postpaid)
    assert "New reservations and extensions are refused until it is paid" in notice.message


def test_an_uncollectible_invoice_is_past_due_and_a_voided_one_no_longer(
    client, postpaid, settings
):
    settings.BILLING_POSTPAID_PAST_DUE_GRACE = timedelta(0)
    deliver(client, "evt_fin", "invoice.finalized", "open", ago=40 * DAY)
    deliver(client, "evt_unc", "invoice.marked_uncollectible", "uncollectible", ago=DAY)

    assert Invoice.objects.get().past_due is True
    assert "it was marked uncollectible" in BillingNotice.objects.get().message
    assert book(key_client(postpaid)).json()["error"]["code"] == "invoice_past_due"

    deliver(client, "evt_void", "invoice.voided", "void")

    invoice = Invoice.objects.get()
    assert (invoice.status, invoice.past_due) == ("void", False)
    assert invoice.payment_failed_at is not None
    assert book(key_client(postpaid)).status_code == 201


def test_a_prepaid_organisation_is_not_refused_for_an_unpaid_invoice(client, postpaid, settings):
    from billing.models import LedgerKind
    from billing.services.ledger import ledger_entry_add

    settings.BILLING_POSTPAID_PAST_DUE_GRACE = timedelta(0)
    BillingAccount.objects.filter(organization=postpaid).update(mode=BillingMode.PREPAID)
    ledger_entry_add(organization=postpaid, kind=LedgerKind.CREDIT, amount_minor=50000,
                     currency="usd", idempotency_key="c")  # fmt: skip
    deliver(client, "evt_fail", "invoice.payment_failed", "open", ago=30 * DAY, attempts=1)
    api = key_client(postpaid)

    assert book(api).status_code == 201
    assert api.get("/api/v1/billing/balance").json()["invoice_past_due"] is None


def test_the_portal_and_the_api_show_a_past_due_invoice_and_where_to_pay_it(
    client, postpaid, settings
):
    deliver(client, "evt_fail", "invoice.payment_failed", "open", ago=8 * DAY, attempts=1)
    Invoice.objects.create(organization=postpaid, stripe_invoice_id="in_old",
                           stripe_customer_id="cus_dun", status="paid", currency="usd",
                           amount_due_minor=500, amount_paid_minor=500,
                           hosted_invoice_url="https://invoice.stripe.com/i/acct_1/old")  # fmt: skip
    since = Invoice.objects.get(stripe_invoice_id="in_dun").payment_failed_at
    client.force_login(postpaid.memberships.get(role=Role.OWNER).user)

    html = client.get("/billing/invoices").content.decode()

    assert 'id="invoice-past-due"' in html
    assert (
        f"<strong>Invoice in_dun is past due</strong>: 123.45 USD unpaid since "
        f"{since:%Y-%m-%d %H:%M} UTC." in html
    )
    assert "New reservations and extensions are refused until it is paid" in html
    assert (
        f'<a href="{PAY_URL}" rel="noopener noreferrer" target="_blank">Pay invoice in_dun</a>'
        in html
    )
    assert f"past due since {since:%Y-%m-%d}</span>" in html
    assert "Pay invoice in_dun (123.45 USD due)" in html
    assert "View or pay invoice in_old" in html  # the paid one is not marked
    assert html.count("past due since") == 1

    listed = {i["id"]: i for i in key_client(postpaid).get("/api/v1/billing/invoices").json()}
    assert (listed["in_dun"]["past_due"], listed["in_old"]["past_due"]) == (True, False)
    assert listed["in_old"]["payment_failed_at"] is None

    deliver(client, "evt_paid", "invoice.paid", "paid", paid=12345, attempts=2)

    html = client.get("/billing/invoices").content.decode()
    assert 'id="invoice-past-due"' not in html and "past due since" not in html


def test_staff_can_list_the_past_due_invoices(client, postpaid, django_user_model):
    deliver(client, "evt_fail", "invoice.payment_failed", "open", attempts=1)
    Invoice.objects.create(organization=postpaid, stripe_invoice_id="in_paid_after_failing",
                           stripe_customer_id="cus_dun", status="paid", currency="usd",
                           payment_failed_at=timezone.now())  # fmt: skip
    Invoice.objects.create(organization=postpaid, stripe_invoice_id="in_open_fine",
                           stripe_customer_id="cus_dun", status="open", currency="usd")  # fmt: skip
    staff = django_user_model.objects.create(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    url = reverse("admin:billing_invoice_changelist")

    past_due = client.get(url, {"past_due": "yes"})
    others = client.get(url, {"past_due": "no"})

    assert past_due.status_code == others.status_code == 200
    assert [i.stripe_invoice_id for i in past_due.context["cl"].result_list] == ["in_dun"]
    assert sorted(i.stripe_invoice_id for i in others.context["cl"].result_list) == [
        "in_open_fine", "in_paid_after_failing",
    ]  # fmt: skip


def test_the_gate_reads_past_due_invoices_from_their_partial_index(postpaid):
    # The statement the gate runs on every postpaid booking, prepared as the server-side
    # binding prepares it: its condition implies the index's even in a generic plan (with the
    # statuses as parameters, PostgreSQL would filter the organisation's invoices instead).
    prepared = _PAST_DUE_SQL.replace("%s", "$1", 1).replace("%s", "$2", 1)
    with connection.cursor() as cur:
        cur.execute("SET LOCAL enable_seqscan = off")
        cur.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cur.execute(f"PREPARE past_due (bigint, timestamptz) AS {prepared}")
        cur.execute(f"EXPLAIN EXECUTE past_due ({postpaid.pk}, now())")
        plan = "\n".join(row[0] for row in cur.fetchall())
        cur.execute("DEALLOCATE past_due")
    assert "Index Scan using invoice_past_due_org_idx" in plan, plan


def test_the_quote_page_says_an_invoice_past_due_refuses_it_and_where_to_pay(client, postpaid):
    """It said "Due now — nothing: you are invoiced monthly", then, refused, offered Top up
    and Add a card, neither of which a postpaid organisation can pay an invoice with."""
    from marketplace.services.quotes import quote_create

    deliver(client, "evt_fail", "invoice.payment_failed", "open", ago=8 * DAY, attempts=1)
    quote = quote_create(organization=postpaid, gpu_model="h100-sxm-80gb", gpu_count=1,
                         starts_at=tomorrow(), ends_at=tomorrow(2), tier="on_demand")  # fmt: skip
    since = Invoice.objects.get().payment_failed_at
    client.force_login(postpaid.memberships.get(role=Role.OWNER).user)
    page = f"/quotes/{quote.public_id}"

    html = client.get(page).content.decode()
    assert (
        f"but invoice in_dun has been past due since {since:%Y-%m-%d}, and nothing more is "
        "reserved until it is paid." in html
    )
    assert f'<a href="{reverse("portal-billing:invoices")}">Pay it</a>' in html

    refused = client.post(page, {"image": "", "ssh_public_keys": "", "without_ssh": "on"})
    html = refused.content.decode()
    assert refused.status_code == 402
    assert "<strong>Not reserved: an invoice is past due.</strong>" in html
    assert f'href="{reverse("portal-billing:invoices")}">Pay the invoice</a>' in html
    assert "Top up" not in html and "Add a card" not in html
    assert not Reservation.objects.exists()

    member = MembershipFactory(organization=postpaid, role=Role.MEMBER, user__password="!")
    client.force_login(member.user)
    assert "Ask an owner, admin or billing member to pay it." in client.get(page).content.decode()
