"""Automatic recharge is opt-in and bounded: off for new accounts, on only with a saved card,
capped like a top-up, every charge e-mailed with its reason, and a reservation that would
trigger one says how much first (the portal asks before charging)."""

import importlib
from decimal import Decimal

import pytest
from django.core import mail

from billing.models import BillingAccount, BillingNotice, LedgerKind, TopUp
from billing.services.accounts import billing_account_get_or_create, billing_settings_update
from billing.services.ledger import ledger_entry_add
from billing.services.topups import auto_recharge_check
from config.celery import app
from config.errors import PaymentRequired, ValidationFailed
from marketplace.models import Reservation, Role
from marketplace.services.quotes import quote_create
from tests.clients import HttpsClient
from tests.factories import GpuModelFactory, MembershipFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import make_nodes, make_policy, make_rate, tomorrow

pytestmark = pytest.mark.django_db


def _settings(org) -> tuple:
    a = BillingAccount.objects.get(organization=org)
    return (a.auto_recharge_enabled, a.recharge_threshold_minor, a.recharge_amount_minor)


def test_a_new_account_has_automatic_recharge_off():
    account = billing_account_get_or_create(organization=OrganizationFactory())
    assert account.auto_recharge_enabled is False


def test_a_new_account_gets_the_deployments_recharge_defaults_in_its_currency(settings):
    """Sized to the currency (a VND account's amount used to be 10,000 minor units: VND
    10,000, under the 30,000 Stripe's minimum makes its smallest top-up)."""
    settings.CURRENCY = "vnd"
    settings.BILLING_DEFAULT_RECHARGE_THRESHOLD = Decimal("1300000")
    settings.BILLING_DEFAULT_RECHARGE_AMOUNT = Decimal("2600000")

    account = billing_account_get_or_create(organization=OrganizationFactory())

    assert (account.currency, account.recharge_threshold_minor, account.recharge_amount_minor) == (
        "vnd", 1_300_000, 2_600_000
    )  # fmt: skip


def test_turning_automatic_recharge_on_needs_a_saved_card(org):
    before = _settings(org)
    with pytest.raises(ValidationFailed) as error:
        billing_settings_update(organization=org, auto_recharge_enabled=True,
                                recharge_amount=Decimal("50.00"))  # fmt: skip
    assert (error.value.code, error.value.field) == ("no_payment_method", "auto_recharge_enabled")
    assert _settings(org) == before

    BillingAccount.objects.filter(organization=org).update(default_payment_method_id="pm_saved")
    billing_settings_update(organization=org, auto_recharge_enabled=True)
    assert _settings(org)[0] is True


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("recharge_amount", "100000.01"),
        ("recharge_amount", "9999999.99"),
        ("recharge_amount", "4.99"),
        ("recharge_threshold", "100000.01"),
        ("recharge_threshold", "9999999.99"),
        ("recharge_threshold", "-1.00"),
    ],
)
def test_the_api_caps_recharge_amount_and_threshold_like_a_top_up(org, field, value):
    client = HttpsClient()
    client.force_login(
        MembershipFactory(organization=org, role=Role.OWNER, user__password="!").user
    )
    before = _settings(org)

    response = client.patch("/api/v1/billing/settings", {field: value},
                            content_type="application/json")  # fmt: skip

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["field"]) == ("amount_out_of_range", field)
    assert _settings(org) == before
    ok = client.patch("/api/v1/billing/settings", {field: "100000.00"},
                      content_type="application/json")  # fmt: skip
    assert ok.status_code == 200 and ok.json()[field] == "100000.00"


def test_removing_the_last_card_turns_automatic_recharge_off(org):
    from billing.models import PaymentMethod
    from billing.services.payment_methods import payment_method_mark_detached

    PaymentMethod.objects.create(organization=org, stripe_payment_method_id="pm_only")
    BillingAccount.objects.filter(organization=org).update(
        default_payment_method_id="pm_only", auto_recharge_enabled=True
    )

    payment_method_mark_detached(stripe_payment_method_id="pm_only")

    account = BillingAccount.objects.get(organization=org)
    assert (account.default_payment_method_id, account.auto_recharge_enabled) == ("", False)


def test_an_automatic_recharge_is_emailed_to_the_owners_with_its_reason(
    org, django_capture_on_commit_callbacks
):
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, stripe_customer_id="cus_x", default_payment_method_id="pm_x",
        recharge_threshold_minor=5000, recharge_amount_minor=10000,
    )  # fmt: skip
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=1234, currency="usd",
                     idempotency_key="c1")  # fmt: skip

    # The callbacks are run by hand below: only the e-mail, not the Stripe call (no Stripe here).
    with django_capture_on_commit_callbacks() as callbacks:
        top_up = auto_recharge_check(organization=org)
    for callback in callbacks:
        if getattr(callback, "__name__", "") == "<lambda>":
            callback()

    assert (top_up.automatic, top_up.amount_minor) == (True, 10000)
    reason = "your balance (12.34 USD) fell below your recharge threshold (50.00 USD)"
    assert top_up.reason == reason
    notice = BillingNotice.objects.get(organization=org, kind="automatic_recharge")
    assert notice.message.startswith(
        f"We are charging 100.00 USD to your saved card because {reason}."  # pm_x: not saved
    )
    (sent,) = [m for m in mail.outbox if "automatic recharge" in m.subject]
    assert sent.to == ["owner@example.com"] and reason in sent.body


def test_an_automatic_recharge_never_charges_more_than_a_top_up_may(org):
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, stripe_customer_id="cus_x", default_payment_method_id="pm_x",
        recharge_threshold_minor=5000, recharge_amount_minor=10000,
    )  # fmt: skip
    ledger_entry_add(organization=org, kind=LedgerKind.ADJUSTMENT, amount_minor=-50_000_000,
                     currency="usd", idempotency_key="debt")  # fmt: skip

    top_up = auto_recharge_check(organization=org)

    assert top_up.amount_minor == 10_000_000  # 100,000.00, not the 500,050.00 the debt asks


def test_existing_accounts_without_a_card_are_switched_off_and_amounts_capped():
    migration = importlib.import_module("billing.migrations.0006_auto_recharge_opt_in")
    no_card = billing_account_get_or_create(organization=OrganizationFactory())
    with_card = billing_account_get_or_create(organization=OrganizationFactory())
    BillingAccount.objects.filter(pk=no_card.pk).update(auto_recharge_enabled=True)
    BillingAccount.objects.filter(pk=with_card.pk).update(
        auto_recharge_enabled=True, default_payment_method_id="pm_x",
        recharge_amount_minor=999_999_999, recharge_threshold_minor=7000,
    )  # fmt: skip
    from django.apps import apps

    migration.opt_in_and_cap(apps, None)

    assert _settings(no_card.organization)[0] is False
    assert _settings(with_card.organization) == (True, 7000, 10_000_000)


# --- a reservation that would trigger one -------------------------------------------------


@pytest.fixture
def quote(org):
    model = GpuModelFactory()
    make_rate(model, "2.5000")
    make_policy()
    make_nodes(SiteFactory(), model, 1)
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, stripe_customer_id="cus_x", default_payment_method_id="pm_x",
        recharge_threshold_minor=500, recharge_amount_minor=2000,
    )  # fmt: skip
    return quote_create(organization=org, gpu_model=model.slug, gpu_count=2,
                        starts_at=tomorrow(), ends_at=tomorrow(10), tier="on_demand")  # fmt: skip


@pytest.fixture
def sent_tasks(monkeypatch):
    """The tasks sent to the broker, recorded instead of sent."""
    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, args=(), **kw: sent.append((name, args)))
    return sent


def test_the_portal_asks_before_an_automatic_recharge_and_charges_only_when_told(
    org, quote, sent_tasks
):
    client = HttpsClient()
    client.force_login(
        MembershipFactory(organization=org, role=Role.OWNER, user__password="!").user
    )
    form = {"image": "", "ssh_public_keys": "", "without_ssh": "on"}

    asked = client.post(f"/quotes/{quote.public_id}", form)

    html = asked.content.decode()
    assert asked.status_code == 402
    assert "Automatic recharge would charge <strong>20.00 USD</strong> to your saved card" in html
    assert 'name="confirm_recharge" value="yes"' in html
    assert sent_tasks == [] and not TopUp.objects.exists() and not Reservation.objects.exists()

    confirmed = client.post(f"/quotes/{quote.public_id}", {**form, "confirm_recharge": "yes"})

    assert confirmed.status_code == 402
    assert "an automatic recharge of 20.00 USD to your saved card has started" in (
        confirmed.content.decode()
    )
    assert sent_tasks == [("billing.tasks.auto_recharge_for_reservation", [org.pk, 500, 2000])]
    assert not Reservation.objects.exists()


def test_the_api_402_states_the_automatic_recharge_it_started(org, quote, sent_tasks):
    client = HttpsClient()
    client.force_login(
        MembershipFactory(organization=org, role=Role.OWNER, user__password="!").user
    )

    response = client.post("/api/v1/reservations", {"quote": quote.public_id},
                           content_type="application/json")  # fmt: skip

    assert response.status_code == 402
    error = response.json()["error"]
    assert error["code"] == "insufficient_funds"
    assert error["recharge"] == {"amount": "20.00", "currency": "usd", "status": "started"}
    assert "automatic recharge of 20.00 USD" in error["message"]
    assert sent_tasks == [("billing.tasks.auto_recharge_for_reservation", [org.pk, 500, 2000])]


def test_without_confirmation_the_service_only_states_the_recharge(org, quote, sent_tasks):
    from marketplace.services.reservations import reservation_create

    with pytest.raises(PaymentRequired) as error:
        reservation_create(organization=org, quote=quote, auto_recharge=False)

    assert error.value.recharge == {"amount": "20.00", "currency": "usd", "status": "confirm"}
    assert sent_tasks == []


def test_the_portal_asks_before_an_extension_triggers_an_automatic_recharge(org, sent_tasks):
    from marketplace.services.reservations import reservation_create

    model = GpuModelFactory()
    make_rate(model, "2.5000")
    make_policy()
    make_nodes(SiteFactory(), model, 1)
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=500, currency="usd",
                     idempotency_key="c1")  # fmt: skip
    booked = reservation_create(organization=org, gpu_model=model.slug, gpu_count=2,
                                tier="on_demand", starts_at=tomorrow(), ends_at=tomorrow(2))  # fmt: skip
    BillingAccount.objects.filter(organization=org).update(
        auto_recharge_enabled=True, stripe_customer_id="cus_x", default_payment_method_id="pm_x",
        recharge_threshold_minor=500, recharge_amount_minor=2000,
    )  # fmt: skip
    client = HttpsClient()
    client.force_login(
        MembershipFactory(organization=org, role=Role.OWNER, user__password="!").user
    )
    new_end = tomorrow(5).strftime("%Y-%m-%dT%H:%M:%S")
    url = f"/reservations/{booked.public_id}/extend"

    asked = client.post(url, {"ends_at": new_end, "confirm": "on"})

    assert asked.status_code == 402
    assert "Automatic recharge would charge <strong>20.00 USD</strong>" in asked.content.decode()
    assert sent_tasks == []
    booked.refresh_from_db()
    assert booked.ends_at == tomorrow(2)

    client.post(url, {"ends_at": new_end, "confirm": "on", "confirm_recharge": "yes"})

    assert sent_tasks == [("billing.tasks.auto_recharge_for_reservation", [org.pk, 500, 2000])]
    booked.refresh_from_db()
    assert booked.ends_at == tomorrow(2)


def test_a_refused_booking_does_not_charge_again_a_card_that_was_just_declined(
    org, quote, sent_tasks
):
    """Each retry of a refused booking started another automatic recharge on the card whose
    last one was declined: charged, declined and e-mailed every time the 402 said to retry."""
    from billing.services.topups import auto_recharge_for_reservation

    TopUp.objects.create(organization=org, amount_minor=2000, currency="usd", automatic=True,
                         payment_method_id="pm_x", status="failed",
                         failure_reason="Your card was declined.")  # fmt: skip
    client = HttpsClient()
    client.force_login(
        MembershipFactory(organization=org, role=Role.OWNER, user__password="!").user
    )

    def book():
        return client.post("/api/v1/reservations", {"quote": quote.public_id},
                           content_type="application/json")  # fmt: skip

    refused = book()

    assert refused.status_code == 402
    error = refused.json()["error"]
    assert error["code"] == "insufficient_funds" and "recharge" not in error
    assert error["message"] == (
        "The balance (0.00 USD, of which 0.00 USD is used or held for bookings) does not cover "
        "this reservation's committed part (5.00 USD): the last charge to your saved card "
        "failed (Your card was declined), so no automatic recharge is started on it; top up or "
        "save another card, and try again."
    )
    assert sent_tasks == []
    # A recharge the gate asked for before the decline, run after it: nothing is charged.
    assert auto_recharge_for_reservation(organization=org, needed_minor=500) is None
    assert TopUp.objects.count() == 1 and not Reservation.objects.exists()
    assert not BillingNotice.objects.filter(organization=org).exists()

    # Another card made the default: a recharge on it is started again.
    BillingAccount.objects.filter(organization=org).update(default_payment_method_id="pm_y")
    assert book().json()["error"]["recharge"]["status"] == "started"
    # The declined card charged with success since (a top-up): it is tried again too.
    BillingAccount.objects.filter(organization=org).update(default_payment_method_id="pm_x")
    TopUp.objects.create(organization=org, amount_minor=500, currency="usd",
                         payment_method_id="pm_x", status="succeeded")  # fmt: skip
    assert book().json()["error"]["recharge"]["status"] == "started"
    assert sent_tasks == [("billing.tasks.auto_recharge_for_reservation", [org.pk, 500, 2000])] * 2
