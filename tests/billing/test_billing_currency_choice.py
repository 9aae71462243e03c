"""A new customer chooses the currency it is billed in (PATCH billing/settings, the portal's
billing settings) before any money moves, among those something is sold in; staff change it in
the admin through the same service (billing_currency_change_check)."""

import threading

import pytest
from django.urls import reverse

from billing.models import (
    BillingAccount,
    BillingMode,
    Hold,
    HoldStatus,
    LedgerKind,
    TopUp,
    TopUpStatus,
)
from billing.services import accounts
from billing.services.ledger import ledger_entry_add
from inventory.models import SiteStatus
from marketplace.models import ApiKeyScope, AuditEntry, RateCard, Reservation, Role
from marketplace.services.reservations import reservation_create
from tests.billing.conftest import make_reservation
from tests.factories import GpuModelFactory, MembershipFactory, SiteFactory
from tests.marketplace.api_fixtures import key_client, session_client
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow
from tests.races import run_together, until_a_backend_waits_for_this_one

pytestmark = pytest.mark.django_db

SETTINGS_URL = "/api/v1/billing/settings"


@pytest.fixture
def euros(db):
    """GPUs sold in dollars (the model's default rate card) and in euros (a site's own)."""
    model = GpuModelFactory()
    make_rate(model, "2.5000")
    make_rate(model, "2.2000", site=SiteFactory(), currency="eur")
    return model


@pytest.fixture
def owner(org):
    return org.memberships.get()


def _account(org) -> dict:
    return BillingAccount.objects.filter(organization=org).values().get()


def _error(response) -> tuple:
    error = response.json()["error"]
    return response.status_code, error["code"], error["field"]


# --- the API -------------------------------------------------------------------------------


def test_the_balance_says_the_currency_can_change_and_to_which(org, owner, euros):
    body = session_client(owner).get("/api/v1/billing/balance").json()

    assert (body["currency"], body["currency_changeable"], body["currency_choices"]) == (
        "usd", True, ["eur", "usd"],
    )  # fmt: skip


def test_a_new_customer_chooses_euros_and_the_change_is_audited(org, owner, euros):
    response = session_client(owner).patch(SETTINGS_URL, {"currency": "eur"}, format="json")

    assert response.status_code == 200, response.json()
    assert (response.json()["currency"], response.json()["currency_changeable"]) == ("eur", True)
    account = BillingAccount.objects.get(organization=org)
    # The recharge settings were the dollar defaults (50.00 and 100.00): now the euro ones.
    assert (account.currency, account.recharge_threshold_minor, account.recharge_amount_minor) == (
        "eur", 4300, 8600,
    )  # fmt: skip
    entry = AuditEntry.objects.get(organization=org, action="billing_settings.update")
    assert entry.changes == {
        "before": {"currency": "usd", "recharge_threshold_minor": 5000,
                   "recharge_amount_minor": 10000},
        "after": {"currency": "eur", "recharge_threshold_minor": 4300,
                  "recharge_amount_minor": 8600},
    }  # fmt: skip


@pytest.mark.parametrize(
    "role, allowed", [(Role.OWNER, True), (Role.ADMIN, True), (Role.BILLING, True),
                      (Role.MEMBER, False)],
)  # fmt: skip
def test_only_owners_admins_and_billing_members_choose_the_currency(org, euros, role, allowed):
    membership = MembershipFactory(organization=org, role=role, user__password="!")

    response = session_client(membership).patch(SETTINGS_URL, {"currency": "eur"}, format="json")

    assert response.status_code == (200 if allowed else 403)
    assert BillingAccount.objects.get(organization=org).currency == ("eur" if allowed else "usd")


@pytest.mark.parametrize(
    "scopes, allowed",
    [((ApiKeyScope.READ, ApiKeyScope.WRITE), False), ((ApiKeyScope.READ, ApiKeyScope.BILLING), True)],
)  # fmt: skip
def test_a_key_chooses_the_currency_only_with_the_billing_scope(org, euros, scopes, allowed):
    response = key_client(org, scopes=scopes).patch(SETTINGS_URL, {"currency": "eur"},
                                                    format="json")  # fmt: skip

    assert response.status_code == (200 if allowed else 403)
    assert BillingAccount.objects.get(organization=org).currency == ("eur" if allowed else "usd")


@pytest.mark.parametrize("code", ["EUR", "euro", "e1", "kwd", "isk", "xyz"])
def test_a_code_that_is_no_currency_switchyard_charges_in_is_a_400(org, owner, euros, code):
    before = _account(org)

    response = session_client(owner).patch(SETTINGS_URL, {"currency": code}, format="json")

    assert _error(response) == (400, "invalid_currency", "currency")
    assert _account(org) == before


def test_a_currency_nothing_is_sold_in_is_a_400_that_lists_those_that_are(org, owner, euros):
    before = _account(org)

    response = session_client(owner).patch(SETTINGS_URL, {"currency": "gbp"}, format="json")

    assert _error(response) == (400, "currency_not_sold", "currency")
    assert response.json()["error"]["message"] == "Nothing is sold in GBP: choose one of EUR, USD."
    assert _account(org) == before


def test_a_retired_sites_rate_card_sells_nothing(org, owner, euros):
    site = RateCard.objects.get(currency="eur").site
    site.status = SiteStatus.RETIRED
    site.save()

    body = session_client(owner).get("/api/v1/billing/balance").json()
    response = session_client(owner).patch(SETTINGS_URL, {"currency": "eur"}, format="json")

    assert body["currency_choices"] == ["usd"]
    assert _error(response) == (400, "currency_not_sold", "currency")


def _ledger_money(org):
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=100, currency="usd",
                     idempotency_key="c")  # fmt: skip


def _held_money(org):
    Hold.objects.create(organization=org, reservation=make_reservation(org), amount_minor=4_000,
                        currency="usd", idempotency_key="hold:x")  # fmt: skip


def _top_up_being_charged(org):
    TopUp.objects.create(organization=org, amount_minor=5_000, currency="usd",
                         payment_method_id="pm_x", status=TopUpStatus.PENDING)  # fmt: skip


@pytest.mark.parametrize(
    "money_moves, why",
    [
        (_ledger_money, "the ledger already holds money in it"),
        (_held_money, "reservations already hold money in it"),
        (_top_up_being_charged, "a top-up in it is still being charged"),
    ],
)
def test_once_money_moves_the_currency_is_locked(org, owner, euros, money_moves, why):
    money_moves(org)
    before = _account(org)
    client = session_client(owner)

    response = client.patch(SETTINGS_URL, {"currency": "eur"}, format="json")
    balance = client.get("/api/v1/billing/balance").json()
    same = client.patch(SETTINGS_URL, {"currency": "usd", "recharge_amount": "30.00"},
                        format="json")  # fmt: skip

    assert _error(response) == (409, "currency_locked", "currency")
    assert response.json()["error"]["message"] == (
        f"The billing currency (USD) can no longer be changed: {why}."
    )
    assert (balance["currency_changeable"], balance["currency_choices"]) == (False, ["usd"])
    assert same.status_code == 200  # the currency it has is no change
    after = _account(org)
    assert after == {**before, "recharge_amount_minor": 3000}


def test_a_failed_top_up_leaves_the_currency_changeable(org, owner, euros):
    _top_up_being_charged(org)
    TopUp.objects.filter(organization=org).update(status=TopUpStatus.FAILED)

    response = session_client(owner).patch(SETTINGS_URL, {"currency": "eur"}, format="json")

    assert response.status_code == 200


@pytest.fixture
def forints(euros):
    make_rate(GpuModelFactory(slug="a100-forint"), "900.0000", currency="huf")


def test_recharge_settings_kept_out_of_the_new_currencys_limits_are_refused(org, owner, forints):
    # 50.00 dollars are 5,000 minor units: 50.00 forints, under Stripe's 175.00 HUF minimum.
    BillingAccount.objects.filter(organization=org).update(recharge_amount_minor=5_000)
    before = _account(org)

    response = session_client(owner).patch(SETTINGS_URL, {"currency": "huf"}, format="json")

    assert _error(response) == (400, "amount_out_of_range", "recharge_amount")
    assert response.json()["error"]["message"] == (
        "A recharge is between 175.00 and 999,999.99 HUF. Kept as it is, the recharge amount "
        "would be 50.00 HUF: set it in the same change."
    )
    assert _account(org) == before


def test_settings_sent_with_the_currency_are_in_it(org, owner, forints):
    BillingAccount.objects.filter(organization=org).update(recharge_amount_minor=5_000)
    client = session_client(owner)

    too_big = client.patch(SETTINGS_URL, {"currency": "huf", "recharge_threshold": "1000000.00"},
                           format="json")  # fmt: skip
    body = client.patch(SETTINGS_URL, {"currency": "huf", "recharge_amount": "20000.00",
                        "monthly_spend_limit": "500000.00"}, format="json").json()  # fmt: skip

    assert _error(too_big) == (400, "amount_out_of_range", "recharge_threshold")
    assert (body["currency"], body["recharge_amount"], body["monthly_spend_limit"]) == (
        "huf", "20000.00", "500000.00",
    )  # fmt: skip
    account = BillingAccount.objects.get(organization=org)
    assert (account.recharge_amount_minor, account.monthly_spend_limit_minor) == (
        2_000_000, 50_000_000,
    )  # fmt: skip


def test_an_amount_sent_with_a_currency_without_minor_unit_is_read_in_it(org, owner, euros):
    make_rate(GpuModelFactory(slug="a100-yen"), "400.0000", currency="jpy")
    client = session_client(owner)
    before = _account(org)

    fraction = client.patch(SETTINGS_URL, {"currency": "jpy", "monthly_spend_limit": "1000.50"},
                            format="json")  # fmt: skip
    unchanged_meanwhile = _account(org)
    whole = client.patch(SETTINGS_URL, {"currency": "jpy", "monthly_spend_limit": "50000"},
                         format="json")  # fmt: skip

    assert _error(fraction)[0::2] == (400, "monthly_spend_limit")
    assert unchanged_meanwhile == before
    assert whole.json()["monthly_spend_limit"] == "50000"
    account = BillingAccount.objects.get(organization=org)
    assert (account.currency, account.monthly_spend_limit_minor) == ("jpy", 50_000)


# --- the portal ----------------------------------------------------------------------------


@pytest.fixture
def owner_client(client, owner):
    client.force_login(owner.user)
    return client


PORTAL_SETTINGS = {
    "recharge_threshold": "20.00",
    "recharge_amount": "80.00",
    "monthly_spend_limit": "",
}


def test_the_portal_offers_the_currencies_sold_while_it_can_change(org, owner_client, euros):
    html = owner_client.get("/billing/").content.decode()

    assert '<select name="currency"' in html
    assert '<option value="eur">EUR</option>' in html
    assert '<option value="usd" selected>USD</option>' in html


def test_the_portal_states_the_currency_when_only_one_is_sold(org, owner_client):
    make_rate(GpuModelFactory(), "2.5000")

    html = owner_client.get("/billing/").content.decode()

    assert 'name="currency"' not in html
    assert '<dd id="billing-currency">USD</dd>' in html


def test_the_portal_states_the_currency_once_money_moved(org, owner_client, euros):
    _ledger_money(org)

    html = owner_client.get("/billing/").content.decode()

    assert 'name="currency"' not in html
    assert '<dd id="billing-currency">USD</dd>' in html


def test_a_member_is_not_offered_the_currency(org, client, euros):
    client.force_login(
        MembershipFactory(organization=org, role=Role.MEMBER, user__password="!").user
    )

    html = client.get("/billing/").content.decode()

    assert 'name="currency"' not in html


def test_the_customer_chooses_euros_in_the_portal(org, owner_client, euros):
    response = owner_client.post("/billing/", {**PORTAL_SETTINGS, "currency": "eur"})

    assert response.status_code == 302
    account = BillingAccount.objects.get(organization=org)
    assert (account.currency, account.recharge_threshold_minor, account.recharge_amount_minor) == (
        "eur", 2000, 8000,
    )  # fmt: skip
    assert '<dd id="billing-currency">EUR</dd>' in owner_client.get("/billing/").content.decode()


def test_a_refused_change_is_shown_on_the_currency_field(org, owner_client, euros):
    # The page offered the choice; a top-up started before the form was sent.
    _top_up_being_charged(org)
    before = _account(org)

    response = owner_client.post("/billing/", {**PORTAL_SETTINGS, "currency": "eur"})

    assert response.status_code == 400
    form = response.context["form"]
    assert form.errors == {
        "currency": ["The billing currency (USD) can no longer be changed: a top-up in it is "
                     "still being charged."]
    }  # fmt: skip
    assert '<select name="currency"' in response.content.decode()
    assert _account(org) == before


def test_a_currency_not_offered_is_refused_on_the_field(org, owner_client, euros):
    before = _account(org)

    response = owner_client.post("/billing/", {**PORTAL_SETTINGS, "currency": "gbp"})

    assert response.status_code == 400
    assert list(response.context["form"].errors) == ["currency"]
    assert _account(org) == before


# --- the admin -----------------------------------------------------------------------------


@pytest.fixture
def staff_client(client, django_user_model):
    staff = django_user_model.objects.create(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    return client


def _admin_form(account, **changes) -> dict:
    return {"currency": account.currency, "recharge_threshold_minor": account.recharge_threshold_minor,
            "recharge_amount_minor": account.recharge_amount_minor, **changes}  # fmt: skip


def test_staff_change_to_any_currency_through_the_service_and_it_is_audited(staff_client, org):
    # Nothing is sold in Swiss francs yet: staff may still bill an organisation in them.
    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])

    response = staff_client.post(
        url, _admin_form(account, currency="chf", recharge_amount_minor=3000)
    )

    assert response.status_code == 302, response.context["adminform"].form.errors
    account.refresh_from_db()
    assert (account.currency, account.recharge_amount_minor) == ("chf", 3000)
    entry = AuditEntry.objects.get(organization=org, action="billing_settings.update")
    # The threshold, still the dollar default (50.00), became the franc default (40.00).
    assert entry.changes == {
        "before": {"currency": "usd", "recharge_threshold_minor": 5000,
                   "recharge_amount_minor": 10000},
        "after": {"currency": "chf", "recharge_threshold_minor": 4000,
                  "recharge_amount_minor": 3000},
    }  # fmt: skip


def test_staff_see_the_services_refusal_on_the_currency(staff_client, org):
    _held_money(org)
    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])

    response = staff_client.post(url, _admin_form(account, currency="eur"))

    assert response.context["adminform"].form.errors["currency"] == [
        "The billing currency (USD) can no longer be changed: reservations already hold money in "
        "it."
    ]
    account.refresh_from_db()
    assert account.currency == "usd"


# --- a change racing a booking -------------------------------------------------------------


@pytest.mark.django_db(transaction=True)  # the threads see committed rows
def test_a_currency_chosen_while_a_booking_is_decided_leaves_no_hold_in_another_currency(
    org, owner, monkeypatch
):
    """Postpaid, nothing held yet: the customer chooses euros while a dollar term is booked.
    The booking is let in right after the change's check and before its save: it must wait
    for the account's lock (the funding gate's), then see euros and be refused, never hold
    dollars on a euro account."""
    model = GpuModelFactory()
    make_rate(model, "2.5000")
    make_rate(GpuModelFactory(slug="a100-euro"), "2.2000", currency="eur")
    make_policy()
    make_nodes(SiteFactory(), model, 1, gpus=8)
    BillingAccount.objects.filter(organization=org).update(mode=BillingMode.POSTPAID)
    checked = threading.Event()
    original_check = accounts.billing_currency_change_check

    def check_then_let_the_booking_in(**kwargs):
        original_check(**kwargs)
        checked.set()
        until_a_backend_waits_for_this_one()  # the booking waits for the lock: go on and save

    monkeypatch.setattr(accounts, "billing_currency_change_check", check_then_let_the_booking_in)
    client = key_client(org, scopes=(ApiKeyScope.READ, ApiKeyScope.BILLING))
    responses = []

    def book():
        assert checked.wait(10)
        reservation_create(organization=org, gpu_model=model.slug, gpu_count=1,
                           tier="reserved", term="1w", starts_at=tomorrow(24 * 8),
                           ends_at=tomorrow(24 * 8 + 168))  # fmt: skip

    def choose_euros():
        responses.append(client.patch(SETTINGS_URL, {"currency": "eur"}, format="json"))

    outcomes = run_together(choose_euros, book)

    assert outcomes == ["ok", "currency_mismatch"], outcomes
    assert responses[0].status_code == 200, responses[0].json()
    assert BillingAccount.objects.get(organization=org).currency == "eur"
    assert not Hold.objects.filter(organization=org, status=HoldStatus.OPEN).exists()
    assert not Reservation.objects.filter(organization=org).exists()


@pytest.mark.django_db(transaction=True)  # the threads see committed rows
def test_a_staff_credit_sent_while_the_currency_changes_is_refused_not_credited_in_another(
    org, monkeypatch
):
    """Staff credit 5.00 USD (the currency their form showed) while the customer switches to
    yen: the credit is let in after the change's check and before its save. It must wait for
    the account's lock, then see yen and be refused, never write a dollar line into a yen
    ledger (nor 5.00 read as 500 yen)."""
    from decimal import Decimal

    from billing.models import LedgerEntry
    from billing.services.credits import credit_issue

    checked = threading.Event()
    original_check = accounts.billing_currency_change_check

    def check_then_let_the_credit_in(**kwargs):
        original_check(**kwargs)
        checked.set()
        until_a_backend_waits_for_this_one()  # the credit waits for the lock: go on and save

    monkeypatch.setattr(accounts, "billing_currency_change_check", check_then_let_the_credit_in)

    def credit():
        assert checked.wait(10)
        credit_issue(organization=org, amount=Decimal("5.00"), reason="goodwill",
                     created_by=None, currency="usd")  # fmt: skip

    def choose_yen():
        accounts.billing_settings_update(organization=org, currency="jpy", any_currency=True)

    outcomes = run_together(choose_yen, credit)

    assert outcomes == ["ok", "currency_mismatch"], outcomes
    assert BillingAccount.objects.get(organization=org).currency == "jpy"
    assert not LedgerEntry.objects.filter(organization=org).exists()


def test_amounts_left_as_shown_become_the_new_currencys_defaults(org, owner_client, euros):
    """The page showed the dollar defaults (50.00 and 100.00) and they were sent back as they
    were: the euro defaults (43.00 and 86.00), not 50 and 100 euros; a changed one is kept."""
    shown = {**PORTAL_SETTINGS, "recharge_threshold": "50.00", "recharge_amount": "100.00"}

    response = owner_client.post("/billing/", {**shown, "currency": "eur"})

    assert response.status_code == 302
    account = BillingAccount.objects.get(organization=org)
    assert (account.recharge_threshold_minor, account.recharge_amount_minor) == (4300, 8600)

    BillingAccount.objects.filter(organization=org).update(
        currency="usd", recharge_threshold_minor=5000, recharge_amount_minor=10000
    )
    owner_client.post("/billing/", {**shown, "recharge_amount": "120.00", "currency": "eur"})
    account.refresh_from_db()
    assert (account.recharge_threshold_minor, account.recharge_amount_minor) == (4300, 12000)
