"""One currency per billing account: a booking, an extension or a resale purchase priced in
another currency is refused (409 currency_mismatch) before any money is held or charged."""

from datetime import timedelta
from decimal import Decimal

import pytest

from billing.models import BillingAccount, Hold, LedgerEntry, LedgerKind, TopUp
from billing.services.holds import money_position
from billing.services.ledger import ledger_entry_add
from config.errors import Conflict
from marketplace.models import Allocation, ResaleListing, Reservation, Role
from marketplace.services.resale import listing_create
from marketplace.services.reservations import reservation_create, reservation_extend
from tests.clients import HttpsClient
from tests.factories import GpuModelFactory, MembershipFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow
from tests.marketplace.resale_helpers import market

pytestmark = pytest.mark.django_db


@pytest.fixture
def eur_site():
    """A site whose rate card is in euros: 9.00 EUR per GPU-hour."""
    model = GpuModelFactory()
    make_policy()
    site = SiteFactory()
    make_rate(model, "9.0000", site=site, currency="eur")
    make_nodes(site, model, 1)
    return site, model


def account(org, currency: str, credit_minor: int = 0) -> BillingAccount:
    BillingAccount.objects.create(organization=org, currency=currency)
    if credit_minor:
        ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=credit_minor,
                         currency=currency, idempotency_key=f"credit:{org.pk}")  # fmt: skip
    return BillingAccount.objects.get(organization=org)


def book(org, site, model, hours: int = 4) -> Reservation:
    return reservation_create(organization=org, gpu_model=model.slug, gpu_count=1,
                              tier="on_demand", site=site.slug, starts_at=tomorrow(),
                              ends_at=tomorrow(hours))  # fmt: skip


def test_a_booking_priced_in_another_currency_is_refused_and_nothing_is_written(eur_site):
    site, model = eur_site
    org = OrganizationFactory()
    account(org, "usd", credit_minor=1000)  # 10.00 USD: enough for 9.00, were it dollars

    with pytest.raises(Conflict) as error:
        book(org, site, model)

    assert error.value.code == "currency_mismatch"
    assert error.value.status_code == 409
    assert "priced in EUR, but this organisation is billed in USD" in error.value.message
    assert not Reservation.objects.exists()
    assert not Allocation.objects.exists()
    assert not Hold.objects.exists()
    assert money_position(organization_id=org.pk) == (1000, 0, 0)
    assert list(LedgerEntry.objects.values_list("currency", "amount_minor")) == [("usd", 1000)]


def test_an_account_with_no_money_yet_has_its_currency_from_the_start(eur_site, settings):
    """No account row and no money: the gate opens the account in settings.CURRENCY, so a
    booking in euros is a currency mismatch, not a want of funds (and, rolled back with the
    booking, leaves no account behind)."""
    site, model = eur_site
    settings.CURRENCY = "usd"
    org = OrganizationFactory()

    with pytest.raises(Conflict) as error:
        book(org, site, model)

    assert error.value.code == "currency_mismatch"
    assert "billed in USD" in error.value.message
    assert not BillingAccount.objects.filter(organization=org).exists()
    assert not Reservation.objects.exists() and not Hold.objects.exists()


def test_an_account_in_the_rate_cards_currency_books_and_holds_in_it(eur_site):
    site, model = eur_site
    org = OrganizationFactory()
    account(org, "eur", credit_minor=1000)

    reservation = book(org, site, model)

    assert reservation.currency == "eur"
    assert list(Hold.objects.values_list("amount_minor", "currency")) == [(900, "eur")]
    assert money_position(organization_id=org.pk).available == 100


def test_the_api_answers_409_currency_mismatch(eur_site):
    site, model = eur_site
    org = OrganizationFactory()
    account(org, "usd", credit_minor=1000)
    client = HttpsClient()
    client.force_login(MembershipFactory(organization=org, role=Role.OWNER,
                                         user__password="!").user)  # fmt: skip

    response = client.post("/api/v1/reservations", {
        "gpu_model": model.slug, "gpu_count": 1, "tier": "on_demand", "site": site.slug,
        "starts_at": tomorrow().isoformat(), "ends_at": tomorrow(4).isoformat(),
    }, content_type="application/json")  # fmt: skip

    assert response.status_code == 409
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("conflict_error", "currency_mismatch")
    assert not Reservation.objects.exists()
    assert money_position(organization_id=org.pk) == (1000, 0, 0)


def test_an_extension_of_a_reservation_in_another_currency_is_refused(eur_site):
    """A euro reservation on a dollar account (booked before the gate checked currencies)
    cannot be extended: the extra time would be held in euros against dollars."""
    site, model = eur_site
    org = OrganizationFactory()
    account(org, "eur", credit_minor=5000)
    booked = book(org, site, model)
    # As if booked before the gate compared currencies (the account is in dollars).
    BillingAccount.objects.filter(organization=org).update(currency="usd")
    holds_before = list(Hold.objects.values_list("amount_minor", "currency"))

    with pytest.raises(Conflict) as error:
        reservation_extend(reservation=booked, new_ends_at=booked.ends_at + timedelta(hours=2),
                           actor_label="user:test")  # fmt: skip

    assert error.value.code == "currency_mismatch"
    assert "This extension is priced in EUR" in error.value.message
    booked.refresh_from_db()
    assert (booked.ends_at, booked.total_amount) == (tomorrow(4), Decimal("36.00"))
    assert {a.period.upper for a in Allocation.objects.filter(reservation=booked)} == {tomorrow(4)}
    assert list(Hold.objects.values_list("amount_minor", "currency")) == holds_before


def test_resold_time_in_another_currency_is_not_bought(db):
    m = market()  # the seller's term and listing are in dollars
    listing = listing_create(organization=m.seller, reservation=m.term, gpu_count=2,
                             starts_at=m.start + timedelta(hours=24),
                             ends_at=m.start + timedelta(hours=48),
                             price_per_gpu_hour=Decimal("1.5000"))  # fmt: skip
    buyer = OrganizationFactory()
    account(buyer, "eur", credit_minor=1_000_000)
    listing_before = ResaleListing.objects.filter(pk=listing.pk).values().get()

    with pytest.raises(Conflict) as error:
        reservation_create(organization=buyer, listing=listing, gpu_count=2,
                           starts_at=listing.starts_at, ends_at=listing.ends_at)  # fmt: skip

    assert error.value.code == "currency_mismatch"
    assert not Reservation.objects.filter(organization=buyer).exists()
    assert not Hold.objects.filter(reservation__organization=buyer).exists()
    assert ResaleListing.objects.filter(pk=listing.pk).values().get() == listing_before
    assert not Allocation.objects.filter(reservation__organization=buyer).exists()
    assert money_position(organization_id=buyer.pk) == (1_000_000, 0, 0)


def test_an_amount_finer_than_the_currencys_unit_is_refused_not_rounded(api_client):
    """5.50 in yen would be charged as 6: another amount than the one asked for. A 400 on the
    field, and nothing is started or changed."""
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER, user__password="!").user
    BillingAccount.objects.create(organization=org, currency="jpy", stripe_customer_id="cus_1",
                                  default_payment_method_id="pm_1")  # fmt: skip
    before = BillingAccount.objects.filter(organization=org).values().get()
    api_client.force_authenticate(owner)

    top_up = api_client.post("/api/v1/billing/top-ups", {"amount": "5000.50"}, format="json")
    settings_refused = [
        api_client.patch("/api/v1/billing/settings", {field: "1000.5"}, format="json")
        for field in ("recharge_threshold", "recharge_amount", "monthly_spend_limit")
    ]
    whole = api_client.post("/api/v1/billing/top-ups", {"amount": "5000.00"}, format="json")

    assert top_up.status_code == 400
    assert top_up.json()["error"] | {"message": None} == {
        "type": "invalid_request_error", "code": "amount_precision", "field": "amount",
        "message": None,
    }  # fmt: skip
    assert top_up.json()["error"]["message"] == "Amounts in JPY are whole numbers."
    assert [(r.status_code, r.json()["error"]["field"]) for r in settings_refused] == [
        (400, "recharge_threshold"), (400, "recharge_amount"), (400, "monthly_spend_limit"),
    ]  # fmt: skip
    assert BillingAccount.objects.filter(organization=org).values().get() == before
    assert whole.status_code == 202 and whole.json()["amount"] == "5000"
    assert list(TopUp.objects.filter(organization=org).values_list("amount_minor", flat=True)) == [
        5000
    ]
