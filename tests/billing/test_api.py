"""The billing API: the organisation's own data only, money in strings, clear 4xx."""

import base64
import csv
import io
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest

from billing.models import BillingAccount, Invoice, LedgerKind, TopUp
from billing.services.ledger import ledger_entry_add
from billing.services.usage import reservation_meter, usage_accrue
from marketplace.models import IdempotencyRecord, Role
from tests.billing.conftest import T0, make_reservation, stripe_client
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def member(org):
    return org.memberships.get().user


@pytest.fixture
def client_for(api_client):
    def login(user):
        api_client.force_authenticate(user)
        return api_client

    return login


def test_balance_is_the_sum_of_the_ledger_in_major_units(org, member, client_for):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=12345, currency="usd",
                     idempotency_key="c")  # fmt: skip

    body = client_for(member).get("/api/v1/billing/balance").json()

    assert (body["balance"], body["currency"], body["mode"], body["funding_state"]) == (
        "123.45", "usd", "prepaid", "ok",
    )  # fmt: skip


def test_ledger_is_cursor_paginated_and_only_the_organisations_own(org, member, client_for):
    other = MembershipFactory(user__password="!").organization
    for i in range(3):
        ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=100 + i,
                         currency="usd", idempotency_key=f"mine{i}")  # fmt: skip
    ledger_entry_add(organization=other, kind=LedgerKind.CREDIT, amount_minor=999, currency="usd",
                     idempotency_key="theirs")  # fmt: skip
    client = client_for(member)

    first = client.get("/api/v1/billing/ledger?limit=2").json()
    second = client.get(first["next"]).json()

    amounts = [e["amount"] for e in first["results"] + second["results"]]
    assert amounts == ["1.02", "1.01", "1.00"]
    assert second["next"] is None


def test_ledger_lines_are_shown_by_opaque_ids_never_the_platforms_sequence(org, member, client_for):
    # A sequential id would tell any customer how many lines the whole platform writes.
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=100, currency="usd",
                     idempotency_key="c")  # fmt: skip
    reservation = make_reservation(org, gpu_count=1, price=Decimal("1.8000"), activated_at=T0)
    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))  # SQL insert

    lines = client_for(member).get("/api/v1/billing/ledger").json()["results"]

    assert {line["kind"] for line in lines} == {"credit", "usage"}
    ids = [line["id"] for line in lines]
    assert all(isinstance(i, str) and i.startswith("led_") and len(i) >= 24 for i in ids)
    assert len(set(ids)) == len(ids)
    response = client_for(member).get("/api/v1/billing/ledger.csv")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))[1:]
    csv_ids = [row[0] for row in rows]
    assert sorted(csv_ids) == sorted(ids)


def test_usage_by_reservation_and_day(org, member, client_for):
    reservation = make_reservation(org, gpu_count=2, price=Decimal("1.8000"), activated_at=T0)
    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))

    body = client_for(member).get("/api/v1/billing/usage").json()["results"]

    # Energy: 2 GPUs × 700 W × 1 h × PUE 1.15 = 1.61 kWh; the site's grid intensity is unknown.
    assert body == [{"reservation": reservation.public_id, "day": "2026-03-02",
                     "gpu_seconds": 7200, "amount": "3.60", "currency": "usd",
                     "kwh": "1.610", "kg_co2e": None}]  # fmt: skip

    reservation.site.grid_carbon_g_per_kwh = 400
    reservation.site.save(update_fields=["grid_carbon_g_per_kwh"])
    [row] = client_for(member).get("/api/v1/billing/usage").json()["results"]
    # 1.61 kWh × (1 − 0.42 renewable) × 400 g/kWh = 373.52 g
    assert row["kg_co2e"] == "0.374"


def _usage_on(org, days: int, per_day: int) -> list[tuple[str, str]]:
    """`per_day` reservations of one GPU on each of `days` UTC days from T0, each metered for an
    hour (booked) and accrued for half an hour more (unbooked, as the metering run leaves it):
    their (day, reservation) rows newest day first, then reservation id."""
    rows = []
    for day in range(days):
        start = T0 + timedelta(days=day)
        for _ in range(per_day):
            r = make_reservation(org, gpu_count=1, price=Decimal("1.8000"), starts_at=start,
                                 activated_at=start)  # fmt: skip
            reservation_meter(reservation_id=r.pk, now=start + timedelta(hours=1))
            usage_accrue(now=start + timedelta(minutes=90), reservation_ids=[r.pk])
            rows.append((start.date().isoformat(), r.public_id))
    return sorted(rows, key=lambda row: (-date.fromisoformat(row[0]).toordinal(), row[1]))


def _walk(client, url: str, link: str = "next") -> list[list[dict]]:
    pages = []
    while url:
        body = client.get(url).json()
        pages.append(body["results"])
        url = body[link]
    return pages


def test_usage_pages_through_every_row_with_cursors(org, member, client_for):
    expected = _usage_on(org, days=3, per_day=3)
    client = client_for(member)

    pages = _walk(client, "/api/v1/billing/usage?limit=4")

    assert [len(page) for page in pages] == [4, 4, 1]
    rows = [row for page in pages for row in page]
    assert [(row["day"], row["reservation"]) for row in rows] == expected
    # Each row is whole: the booked hour and the unbooked half hour, 1.5 h at 1.80.
    assert {(row["gpu_seconds"], row["amount"]) for row in rows} == {(5400, "2.70")}
    # And back: the last page's previous link leads through the same rows in reverse.
    last = client.get("/api/v1/billing/usage?limit=4").json()
    last = client.get(client.get(last["next"]).json()["next"]).json()
    back = _walk(client, last["previous"], link="previous")
    assert [(r["day"], r["reservation"]) for page in back[::-1] for r in page] == [
        (row["day"], row["reservation"]) for row in rows[:8]
    ]
    assert [len(page) for page in back] == [4, 4]


def test_usage_booked_between_pages_moves_no_row_to_another_page(org, member, client_for):
    expected = _usage_on(org, days=2, per_day=2)
    client = client_for(member)
    first = client.get("/api/v1/billing/usage?limit=2").json()
    # A newer day's usage arrives before the second page is read.
    later = T0 + timedelta(days=5)
    newer = make_reservation(org, gpu_count=1, starts_at=later, activated_at=later)
    reservation_meter(reservation_id=newer.pk, now=later + timedelta(hours=1))

    second = client.get(first["next"]).json()

    got = [(r["day"], r["reservation"]) for r in first["results"] + second["results"]]
    assert got == expected


def test_usage_refuses_a_forged_cursor_and_a_limit_out_of_range(org, member, client_for):
    client = client_for(member)
    forged = base64.b64encode(b"p=yesterday+res_x").decode()

    for query, field, code in (
        (f"cursor={forged}", "cursor", "invalid_cursor"),
        ("limit=1000", "limit", "invalid_limit"),
    ):
        response = client.get(f"/api/v1/billing/usage?{query}")
        assert response.status_code == 400, query
        error = response.json()["error"]
        assert (error["field"], error["code"]) == (field, code)


def test_invoices_show_their_hosted_links(org, member, client_for):
    Invoice.objects.create(organization=org, stripe_invoice_id="in_1", stripe_customer_id="cus_1",
                           status="open", currency="usd", amount_due_minor=4200,
                           hosted_invoice_url="https://invoice.stripe.com/i/acct/in_1",
                           period_start=datetime(2026, 10, 1, tzinfo=UTC))  # fmt: skip

    [invoice] = client_for(member).get("/api/v1/billing/invoices").json()

    assert (invoice["id"], invoice["amount_due"], invoice["hosted_invoice_url"]) == (
        "in_1", "42.00", "https://invoice.stripe.com/i/acct/in_1",
    )  # fmt: skip


def test_a_plain_member_cannot_top_up(org, client_for):
    member = MembershipFactory(organization=org, role=Role.MEMBER, user__password="!").user

    response = client_for(member).post(
        "/api/v1/billing/top-ups", {"amount": "50.00"}, format="json"
    )

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_role"
    assert not TopUp.objects.exists()


def test_a_top_up_without_a_card_is_a_402(org, member, client_for):
    response = client_for(member).post(
        "/api/v1/billing/top-ups", {"amount": "50.00"}, format="json"
    )

    assert response.status_code == 402
    assert response.json()["error"] == {"type": "payment_error", "code": "no_payment_method",
                                        "field": None, "message": "Add a card before topping up."}  # fmt: skip


@pytest.mark.parametrize("amount", ["1e3", "\u0663\u0660", "1_000", "Infinity"])
def test_an_amount_is_ascii_digits_not_whatever_decimal_reads(org, member, client_for, amount):
    # Decimal() reads "1e3" as 1000.00 and "٣٠" as 30.00: neither is what anyone typed.
    response = client_for(member).post("/api/v1/billing/top-ups", {"amount": amount}, format="json")
    assert response.status_code == 400
    assert (response.json()["error"]["code"], response.json()["error"]["field"]) == (
        "invalid", "amount"
    )  # fmt: skip
    assert not TopUp.objects.exists()


def test_a_bad_amount_is_a_400_naming_the_field(org, member, client_for):
    response = client_for(member).post("/api/v1/billing/top-ups", {"amount": "lots"}, format="json")
    card = client_for(member).post("/api/v1/billing/payment-methods", {"payment_method": "x"},
                                   format="json")  # fmt: skip

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "amount"
    assert (card.status_code, card.json()["error"]["field"]) == (400, "payment_method")


@pytest.mark.stripe
def test_cards_through_the_api_setup_intent_list_and_top_up(
    localstripe, org, member, client_for, eager_celery, django_capture_on_commit_callbacks
):
    client = client_for(member)
    setup = client.post("/api/v1/billing/payment-methods/setup-intent", HTTP_IDEMPOTENCY_KEY="si")
    assert setup.status_code == 201
    assert setup.json()["client_secret"].startswith(setup.json()["setup_intent_id"])
    # The client secret is never stored for a replay, nor answered by one.
    replay = client.post("/api/v1/billing/payment-methods/setup-intent", HTTP_IDEMPOTENCY_KEY="si")
    assert replay["Idempotent-Replayed"] == "true" and replay.json()["client_secret"] is None
    assert setup.json()["client_secret"] not in str(
        list(IdempotencyRecord.objects.values_list("response_body", flat=True))
    )
    confirmed = stripe_client(localstripe).v1.setup_intents.confirm(
        setup.json()["setup_intent_id"], {"payment_method": "pm_card_visa"}
    )
    # localstripe's confirmation does not attach the card (real Stripe's does), so the
    # SetupIntent is named: it proves the card was set up by this organisation.
    attach = client.post("/api/v1/billing/payment-methods",
                         {"payment_method": confirmed.payment_method,
                          "setup_intent": confirmed.id}, format="json")  # fmt: skip
    assert attach.status_code == 201
    pm_id = attach.json()["id"]
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)

    cards = client.get("/api/v1/billing/payment-methods").json()
    with django_capture_on_commit_callbacks(execute=True):
        top_up = client.post("/api/v1/billing/top-ups", {"amount": "75.00"}, format="json")
    balance = client.get("/api/v1/billing/balance").json()["balance"]
    detach = client.delete(f"/api/v1/billing/payment-methods/{pm_id}")

    assert cards == [{"id": pm_id, "brand": "visa", "last4": "4242", "exp_month": 12,
                      "exp_year": 2030, "is_default": True}]  # fmt: skip
    assert (top_up.status_code, top_up.json()["amount"]) == (202, "75.00")
    assert top_up.json()["id"] == TopUp.objects.get().public_id  # tu_…, not the sequence
    assert top_up.json()["id"].startswith("tu_")
    assert balance == "75.00"
    assert detach.status_code == 204
    assert client.get("/api/v1/billing/payment-methods").json() == []


@pytest.mark.stripe
def test_stripe_being_unreachable_is_a_503_not_a_500(localstripe, org, member, client_for):
    localstripe.stop()
    try:
        response = client_for(member).post("/api/v1/billing/payment-methods/setup-intent")
    finally:
        localstripe.start()

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "payment_provider_unavailable"
    assert BillingAccount.objects.get(organization=org).stripe_customer_id == ""


@pytest.mark.stripe
def test_a_card_no_setup_intent_of_ours_confirmed_is_refused_before_any_attach(
    localstripe, org, member, client_for
):
    # A declined card fails at Stripe.js's confirmCardSetup; what is left to post is a card
    # that no SetupIntent of this organisation confirmed.
    response = client_for(member).post("/api/v1/billing/payment-methods",
                                       {"payment_method": "pm_card_visa_chargeDeclined"}, format="json")  # fmt: skip

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_such_payment_method"
    assert response.json()["error"]["field"] == "payment_method"
    assert client_for(member).get("/api/v1/billing/payment-methods").json() == []


@pytest.mark.stripe
def test_a_payment_method_stripe_does_not_know_is_not_found_not_a_payment_error(
    localstripe, org, member, client_for
):
    response = client_for(member).post("/api/v1/billing/payment-methods",
                                       {"payment_method": "pm_NoSuchCard123"}, format="json")  # fmt: skip

    assert response.status_code == 404
    error = response.json()["error"]
    assert (error["type"], error["code"], error["field"]) == (
        "not_found_error", "no_such_payment_method", "payment_method"
    )  # fmt: skip
    assert "pm_NoSuchCard123" in error["message"]
    assert client_for(member).get("/api/v1/billing/payment-methods").json() == []


def test_the_customer_sets_auto_recharge_and_a_spend_limit(org, member, client_for):
    client = client_for(member)

    body = client.patch("/api/v1/billing/settings", {"recharge_threshold": "20.00",
                        "recharge_amount": "80.00", "monthly_spend_limit": "1000.00"},
                        format="json").json()  # fmt: skip
    cleared = client.patch("/api/v1/billing/settings", {"monthly_spend_limit": None}, format="json")
    refused = client.patch("/api/v1/billing/settings", {"recharge_amount": "1.00"}, format="json")

    assert (body["recharge_threshold"], body["recharge_amount"], body["monthly_spend_limit"]) == (
        "20.00", "80.00", "1000.00",
    )  # fmt: skip
    assert cleared.json()["monthly_spend_limit"] is None
    assert (refused.status_code, refused.json()["error"]["field"]) == (400, "recharge_amount")
    account = BillingAccount.objects.get(organization=org)
    assert (account.recharge_amount_minor, account.monthly_spend_limit_minor) == (8000, None)


def test_card_operations_without_stripe_configured_are_a_503_that_says_so(
    org, member, client_for, settings
):
    settings.STRIPE_SECRET_KEY = ""
    response = client_for(member).post("/api/v1/billing/payment-methods/setup-intent")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "payments_not_configured"
    assert not BillingAccount.objects.exclude(stripe_customer_id="").exists()
