"""The portal's Billing pages through Django's test client: roles, bad input, Stripe refusing
or missing. The browser paths (Stripe.js card form) are in tests/portal/test_portal_billing.py."""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from billing.models import BillingAccount, Invoice, LedgerKind, PaymentMethod, TopUp
from billing.services.ledger import ledger_entry_add
from billing.services.usage import reservation_meter
from marketplace.models import Role
from tests.billing.conftest import T0, make_reservation, save_card
from tests.clients import HttpsClient
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def owner_client(client, org):
    client.force_login(org.memberships.get().user)
    return client


@pytest.fixture
def member_client(client, org):
    member = MembershipFactory(organization=org, role=Role.MEMBER, user__password="!").user
    client.force_login(member)
    return client


def _account_row(org) -> tuple:
    account = BillingAccount.objects.get(organization=org)
    return (
        account.auto_recharge_enabled,
        account.recharge_threshold_minor,
        account.recharge_amount_minor,
        account.monthly_spend_limit_minor,
    )


SETTINGS = {
    "auto_recharge_enabled": "on",
    "recharge_threshold": "20.00",
    "recharge_amount": "80.00",
    "monthly_spend_limit": "1000.00",
}


def test_the_overview_shows_balance_mode_and_what_the_funding_state_means(org, owner_client):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=12345,
                     currency="usd", idempotency_key="c1")  # fmt: skip
    BillingAccount.objects.filter(organization=org).update(funding_state="grace")

    response = owner_client.get("/billing/")

    html = response.content.decode()
    assert response.status_code == 200
    assert '<strong id="balance">123.45 USD</strong>' in html
    assert "Prepaid: usage is drawn from this balance." in html
    assert "The balance has run out. On-demand and interruptible reservations keep" in html
    assert 'href="/billing/"' in html  # the nav item billing registered with the portal


def test_a_low_balance_warning_states_the_threshold_it_is_below(org, owner_client):
    """A new account warns below a default threshold its owner never set (about US$50); the
    warning names the figure rather than "your recharge threshold", which nothing shows."""
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=4997,
                     currency="usd", idempotency_key="c1")  # fmt: skip
    BillingAccount.objects.filter(organization=org).update(
        funding_state="warning", recharge_threshold_minor=5000, auto_recharge_enabled=False
    )

    overview = owner_client.get("/billing/").content.decode()
    dashboard = _panel(owner_client.get("/dashboard").content.decode())

    said = (
        "The available balance is below 50.00 USD, the threshold in your billing settings at "
        "which you are warned (and automatic recharge, when on, tops up). Top up before it runs "
        "out."
    )
    assert said in overview and said in dashboard
    assert ">Running low<" in dashboard
    assert _account_row(org) == (False, 5000, 10000, None)  # reading changed nothing


def test_an_owner_changes_auto_recharge_and_the_spend_limit(org, owner_client):
    BillingAccount.objects.filter(organization=org).update(default_payment_method_id="pm_saved")
    response = owner_client.post("/billing/", SETTINGS, follow=True)
    cleared = owner_client.post("/billing/", {**SETTINGS, "monthly_spend_limit": "",
                                              "auto_recharge_enabled": ""})  # fmt: skip

    assert "Billing settings saved." in response.content.decode()
    assert 'id="spend-limit">1,000.00 USD<' in response.content.decode()
    assert cleared.status_code == 302
    assert _account_row(org) == (False, 2000, 8000, None)


def test_a_plain_member_reads_billing_but_cannot_change_settings(org, member_client):
    before = _account_row(org)

    page = member_client.get("/billing/")
    refused = member_client.post("/billing/", SETTINGS)

    assert page.status_code == 200
    assert "Save settings" not in page.content.decode()
    assert "Only owners, admins and billing members can change billing settings." in (
        page.content.decode()
    )
    assert refused.status_code == 403
    assert "Your role (member) cannot do this" in refused.content.decode()
    assert _account_row(org) == before


def test_a_plain_member_cannot_top_up_or_start_saving_a_card(org, member_client):
    top_up = member_client.post("/billing/top-ups", {"amount": "50.00", "once": "t1"})
    new_card = member_client.get("/billing/payment-methods/new")
    attach = member_client.post("/billing/payment-methods", {"payment_method": "pm_card_visa"})

    assert (top_up.status_code, new_card.status_code, attach.status_code) == (403, 403, 403)
    assert not TopUp.objects.exists()
    assert BillingAccount.objects.get(organization=org).stripe_customer_id == ""
    assert not PaymentMethod.objects.exists()


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("recharge_threshold", "9999999999999", "Ensure that there are no more than 12 digits"),
        ("recharge_threshold", "-1", "The recharge threshold is between 0 and 100,000.00 USD."),
        ("recharge_threshold", "lots", "Enter a number."),
        ("recharge_amount", "1.00", "A recharge is between 5.00 and 100,000.00 USD."),
        ("monthly_spend_limit", "-5", "Must be zero or more."),
    ],
)
def test_bad_settings_are_a_form_error_and_change_nothing(org, owner_client, field, value, error):
    before = _account_row(org)

    response = owner_client.post("/billing/", {**SETTINGS, field: value})

    assert response.status_code == 400
    assert error in response.content.decode()
    assert response.context["form"].errors[field]
    assert _account_row(org) == before


@pytest.mark.parametrize(
    ("amount", "error"),
    [
        ("-5", "A top-up is between 5.00 and 100,000.00 USD."),
        ("1000000", "A top-up is between 5.00 and 100,000.00 USD."),
        ("abc", "Enter a number."),
        ("", "This field is required."),
    ],
)
def test_a_bad_top_up_amount_is_a_form_error_and_writes_nothing(org, owner_client, amount, error):
    response = owner_client.post("/billing/top-ups", {"amount": amount, "once": "t1"})

    assert response.status_code == 400
    assert response.context["form"].errors["amount"] == [error]
    assert not TopUp.objects.exists()


def test_a_top_up_without_a_card_says_so_and_writes_nothing(org, owner_client, settings):
    settings.STRIPE_SECRET_KEY = "sk_test_switchyard"  # configured, but no card saved

    response = owner_client.post("/billing/top-ups", {"amount": "50.00", "once": "t1"})

    assert response.status_code == 400
    assert "Add a card before topping up." in response.content.decode()
    assert not TopUp.objects.exists()


def _card_on_file(org) -> None:
    """A saved card as Stripe's answers leave it (no call is made before the commit)."""
    BillingAccount.objects.filter(organization=org).update(
        stripe_customer_id="cus_test", default_payment_method_id="pm_test"
    )


def test_a_top_up_form_sent_twice_charges_once(org, owner_client, settings):
    # A double click, or a reload of the page that answered it.
    settings.STRIPE_SECRET_KEY = "sk_test_switchyard"
    owner_client.get("/billing/top-ups")
    _card_on_file(org)
    page = owner_client.get("/billing/top-ups").content.decode()
    once = page.split('name="once" value="')[1].split('"')[0]

    first = owner_client.post("/billing/top-ups", {"amount": "50.00", "once": once})
    second = owner_client.post("/billing/top-ups", {"amount": "50.00", "once": once})

    assert (first.status_code, second.status_code) == (302, 302)
    assert TopUp.objects.filter(organization=org).count() == 1
    assert "already requested" in owner_client.get("/billing/top-ups").content.decode()
    # A new form (a new key) is a new top-up; a refused one leaves its key free to send again.
    fresh = owner_client.get("/billing/top-ups").content.decode()
    assert fresh.split('name="once" value="')[1].split('"')[0] != once
    refused = owner_client.post("/billing/top-ups", {"amount": "1.00", "once": "k2"})
    assert refused.status_code == 400
    assert (
        owner_client.post("/billing/top-ups", {"amount": "20.00", "once": "k2"}).status_code == 302
    )
    assert TopUp.objects.filter(organization=org).count() == 2


def test_without_stripe_the_card_and_top_up_pages_say_so(org, owner_client, settings):
    settings.STRIPE_SECRET_KEY = ""
    message = "Card payments are not available on this deployment; contact support."

    cards = owner_client.get("/billing/payment-methods")
    new_card = owner_client.get("/billing/payment-methods/new")
    top_up = owner_client.get("/billing/top-ups")

    for response in (cards, new_card, top_up):
        assert response.status_code == 200
        assert message in response.content.decode()
    assert "Add a card</a>" not in cards.content.decode()
    assert 'id="card-form"' not in new_card.content.decode()
    assert 'name="amount"' not in top_up.content.decode()
    assert BillingAccount.objects.get(organization=org).stripe_customer_id == ""


@pytest.mark.stripe
def test_the_card_page_starts_a_setup_intent_for_stripe_js(
    localstripe, org, owner_client, settings
):
    settings.STRIPE_JS_URL = f"{localstripe.url}/js.stripe.com/v3/"

    response = owner_client.get("/billing/payment-methods/new")

    html = response.content.decode()
    config = response.context["stripe_config"]
    assert response.status_code == 200
    assert config["publishableKey"] == "pk_test_switchyard"
    assert config["clientSecret"].startswith("seti_")
    assert f'<script src="{localstripe.url}/js.stripe.com/v3/"></script>' in html
    assert BillingAccount.objects.get(organization=org).stripe_customer_id.startswith("cus_")


@pytest.mark.stripe
def test_stripe_unreachable_on_the_card_page_is_a_message_not_a_500(localstripe, org, owner_client):
    localstripe.stop()
    try:
        response = owner_client.get("/billing/payment-methods/new")
    finally:
        localstripe.start()

    assert response.status_code == 200
    assert "The payment provider is unreachable; try again shortly." in response.content.decode()
    assert BillingAccount.objects.get(organization=org).stripe_customer_id == ""


@pytest.mark.stripe
def test_a_card_not_set_up_here_is_shown_as_refused_and_not_stored(localstripe, org, owner_client):
    response = owner_client.post(
        "/billing/payment-methods", {"payment_method": "pm_card_visa_chargeDeclined"}, follow=True
    )

    assert response.status_code == 200
    [message] = [str(m) for m in response.context["messages"]]
    assert "was set up for this organisation" in message
    assert "No saved cards." in response.content.decode()
    assert not PaymentMethod.objects.exists()
    assert BillingAccount.objects.get(organization=org).default_payment_method_id == ""


def test_a_malformed_payment_method_id_is_refused_before_stripe(org, owner_client, settings):
    settings.STRIPE_SECRET_KEY = ""  # proves Stripe is not called: it would fail differently

    response = owner_client.post(
        "/billing/payment-methods", {"payment_method": "tok_<script>"}, follow=True
    )

    assert "The card was not confirmed by Stripe; nothing was saved." in response.content.decode()
    assert not PaymentMethod.objects.exists()


@pytest.mark.stripe
def test_an_owner_makes_another_card_default_and_removes_one(localstripe, org, owner_client):
    first = save_card(localstripe, org)
    second = save_card(localstripe, org, card="pm_card_chargeCustomerFail")  # Visa …0341

    listed = owner_client.get("/billing/payment-methods").content.decode()
    owner_client.post(f"/billing/payment-methods/{second}/default")
    owner_client.post(f"/billing/payment-methods/{first}/remove")
    missing = owner_client.post("/billing/payment-methods/pm_nope/default", follow=True)

    assert "Visa ending 4242" in listed and "Visa ending 0341" in listed
    assert listed.count('<span class="status active">Default</span>') == 1
    account = BillingAccount.objects.get(organization=org)
    assert account.default_payment_method_id == second
    assert list(
        PaymentMethod.objects.filter(detached_at__isnull=True).values_list(
            "stripe_payment_method_id", flat=True
        )
    ) == [second]
    assert "No such payment method." in missing.content.decode()
    assert account.default_payment_method_id == second


def test_a_member_cannot_remove_a_card(org, member_client):
    PaymentMethod.objects.create(organization=org, stripe_payment_method_id="pm_1", last4="4242")

    response = member_client.post("/billing/payment-methods/pm_1/remove")

    assert response.status_code == 403
    assert PaymentMethod.objects.get().detached_at is None


def test_removing_a_card_asks_first_and_says_what_changes(org, owner_client):
    """The card list's Remove opens a confirmation page (no one-click removal); it names the
    card that takes over as default, or that automatic recharge stops with the last card."""
    older = PaymentMethod.objects.create(
        organization=org, stripe_payment_method_id="pm_old", brand="visa", last4="1111"
    )
    newer = PaymentMethod.objects.create(
        organization=org, stripe_payment_method_id="pm_new", brand="mastercard", last4="2222"
    )
    BillingAccount.objects.filter(organization=org).update(
        default_payment_method_id="pm_old", auto_recharge_enabled=True
    )

    listed = owner_client.get("/billing/payment-methods").content.decode()
    default = owner_client.get("/billing/payment-methods/pm_old/remove")
    other = owner_client.get("/billing/payment-methods/pm_new/remove").content.decode()
    newer.delete()
    last = owner_client.get("/billing/payment-methods/pm_old/remove").content.decode()
    theirs = MembershipFactory(user__password="!").organization
    PaymentMethod.objects.create(organization=theirs, stripe_payment_method_id="pm_theirs")

    assert 'action="/billing/payment-methods/pm_old/remove"' not in listed
    assert 'href="/billing/payment-methods/pm_old/remove"' in listed
    assert default.status_code == 200
    page = default.content.decode()
    assert "Remove Visa ending 1111?" in page
    assert "charged to Mastercard ending 2222 instead" in page
    assert 'method="post" action="/billing/payment-methods/pm_old/remove"' in page
    assert "It is not your default card" in other
    assert "automatic recharge will be turned off" in last
    assert owner_client.get("/billing/payment-methods/pm_theirs/remove").status_code == 404
    assert PaymentMethod.objects.get(pk=older.pk).detached_at is None  # asking removes nothing


def test_a_member_cannot_open_a_cards_removal_page(org, member_client):
    PaymentMethod.objects.create(organization=org, stripe_payment_method_id="pm_1", last4="4242")

    assert member_client.get("/billing/payment-methods/pm_1/remove").status_code == 403


def test_usage_and_ledger_show_amounts_with_the_currency_and_only_this_org(org, owner_client):
    other = MembershipFactory(user__password="!").organization
    reservation = make_reservation(org, gpu_count=2, activated_at=T0)
    reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=1))
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=2500,
                     currency="usd", idempotency_key="c1", description="Welcome credit")  # fmt: skip
    ledger_entry_add(organization=other, kind=LedgerKind.CREDIT, amount_minor=999,
                     currency="usd", idempotency_key="c2", description="Someone else")  # fmt: skip

    response = owner_client.get("/billing/usage")
    filtered = owner_client.get("/billing/usage", {"since": "2026-03-03"})
    bad = owner_client.get("/billing/usage", {"since": "yesterday"})

    html = response.content.decode()
    [row] = response.context["usage"]
    assert (row["reservation__public_id"], row["gpu_hours"], row["amount_display"]) == (
        reservation.public_id, 2, "4.00 USD",
    )  # fmt: skip
    assert "Welcome credit" in html and "25.00 USD" in html and "-4.00 USD" in html
    assert "Someone else" not in html
    assert filtered.context["usage"] == []
    assert bad.status_code == 400
    assert "Enter a valid date." in bad.content.decode()


def test_the_ledger_pages_keep_the_usage_dates(org, owner_client):
    for i in range(51):  # one more than a page
        ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=100 + i,
                         currency="usd", idempotency_key=f"c{i}", description=f"credit {i}")  # fmt: skip

    first = owner_client.get("/billing/usage", {"since": "2026-03-03", "until": "2026-03-04"})
    older = first.context["page"].next_page_number()
    second = owner_client.get("/billing/usage", {"since": "2026-03-03", "until": "2026-03-04",
                                                 "page": older})  # fmt: skip

    assert '<a href="?since=2026-03-03&amp;until=2026-03-04&amp;page=2" rel="next">' in (
        first.content.decode()
    )
    assert '<a href="?since=2026-03-03&amp;until=2026-03-04&amp;page=1" rel="prev">' in (
        second.content.decode()
    )
    assert [e.description for e in second.context["page"].object_list] == ["credit 0"]


def test_the_usage_table_pages_through_every_row(org, owner_client, monkeypatch):
    """The usage table shows every row, a page at a time (it used to drop all but the first
    thousand rows without a word); the pages keep the period and the ledger's page."""
    from billing.portal import UsageView

    monkeypatch.setattr(UsageView, "USAGE_PAGE_SIZE", 2)
    reservation = make_reservation(org, activated_at=T0, hours=96)
    for hours in range(6, 81, 6):  # metered as it ran: a line a day or less
        reservation_meter(reservation_id=reservation.pk, now=T0 + timedelta(hours=hours))
    rows = lambda response: [  # noqa: E731
        (row["day"], row["reservation__public_id"]) for row in response.context["usage"]
    ]

    first = owner_client.get("/billing/usage", {"since": "2026-01-01", "page": "1"})
    older = first.context["usage_pages"]["older"]
    second = owner_client.get("/billing/usage", {"since": "2026-01-01", "usage_after": older})
    back = owner_client.get(
        "/billing/usage",
        {"since": "2026-01-01", "usage_before": second.context["usage_pages"]["newer"]},
    )
    tampered = owner_client.get("/billing/usage", {"usage_after": "yesterday x"})

    days = [d for d, _ in rows(first) + rows(second)]
    assert len(days) == 4 and days == sorted(days, reverse=True)  # every day, newest first
    assert first.context["usage_pages"]["newer"] is None and older is not None
    assert second.context["usage_pages"]["older"] is None
    assert rows(back) == rows(first)
    html = first.content.decode()
    assert f"?since=2026-01-01&amp;page=1&amp;usage_after={older.replace(' ', '+')}#usage" in html
    assert tampered.status_code == 200 and rows(tampered) == rows(first)


def test_invoices_link_to_the_hosted_invoice(org, owner_client):
    Invoice.objects.create(organization=org, stripe_invoice_id="in_1", stripe_customer_id="cus_1",
                           status="open", currency="usd", amount_due_minor=4200,
                           hosted_invoice_url="https://invoice.stripe.com/i/acct/in_1",
                           period_start=datetime(2026, 10, 1, tzinfo=UTC))  # fmt: skip
    Invoice.objects.create(organization=None, stripe_invoice_id="in_2", stripe_customer_id="cus_2",
                           status="open", currency="usd")  # fmt: skip

    html = owner_client.get("/billing/invoices").content.decode()

    assert '<a href="https://invoice.stripe.com/i/acct/in_1"' in html
    assert "42.00 USD" in html
    assert "in_2" not in html


def test_the_portal_overview_shows_the_balance_its_state_and_the_latest_notices():
    from billing.models import FundingState
    from billing.services.notices import notice_send
    from tests.factories import OrganizationFactory

    org = OrganizationFactory()
    membership = MembershipFactory(organization=org, role=Role.MEMBER)
    client = HttpsClient()
    client.force_login(membership.user)

    panel = _panel(client.get("/dashboard").content.decode())
    # Nothing owed, but nothing to reserve with either: not called "funded".
    assert "0.00 USD" in panel and ">No balance<" in panel and "top up before reserving" in panel
    assert "grace" not in panel.lower() and "Funded" not in panel

    BillingAccount.objects.create(
        organization=org, funding_state=FundingState.GRACE,
        grace_until=timezone.now() + timedelta(hours=1),
    )  # fmt: skip
    for i in range(4):
        notice_send(organization=org, kind="low_balance", message=f"notice number {i}")
    panel = _panel(client.get("/dashboard").content.decode())
    assert ">Out of funds (grace period)<" in panel and "Grace ends" in panel
    assert "notice number 3" in panel and "notice number 1" in panel
    assert "notice number 0" not in panel  # the latest three
    billing_page = client.get("/billing/").content.decode()
    assert all(f"notice number {i}" in billing_page for i in range(4))


def _panel(page: str) -> str:
    return page.split('id="billing-panel"')[1].split("</section>")[0]


def test_turning_auto_recharge_on_without_a_card_is_refused_on_the_form(org, owner_client):
    before = _account_row(org)

    response = owner_client.post("/billing/", SETTINGS)

    assert response.status_code == 400
    assert "Save a card before turning automatic recharge on." in response.content.decode()
    assert _account_row(org) == before


def test_the_usage_heading_names_the_last_day_shown_not_the_day_after(org, owner_client):
    # "Until" is the day after the last (the form says so): the heading names the days shown.
    page = owner_client.get("/billing/usage", {"since": "2026-03-01", "until": "2026-03-08"})

    html = page.content.decode()
    assert "Spend and balance, 2026-03-01 to 2026-03-07</h2>" in html
    assert page.context["chart_days"][-1].isoformat() == "2026-03-07"


def test_the_ledger_names_each_kind_in_words(org, owner_client):
    for i, kind in enumerate([LedgerKind.TOP_UP, LedgerKind.SLA_CREDIT, LedgerKind.CREDIT]):
        ledger_entry_add(organization=org, kind=kind, amount_minor=100, currency="usd",
                         idempotency_key=f"k{i}", description=f"entry {i}")  # fmt: skip

    html = owner_client.get("/billing/usage").content.decode()

    assert "<td>Top-up</td>" in html and "<td>SLA credit</td>" in html
    assert "Top Up" not in html and "Sla Credit" not in html
