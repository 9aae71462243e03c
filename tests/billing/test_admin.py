"""Staff move money only through the admin's service-backed forms, with a reason."""

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from billing.models import (
    BillingAccount,
    BillingMode,
    Hold,
    LedgerEntry,
    LedgerKind,
    Refund,
    TopUp,
)
from billing.selectors import balance_minor
from billing.services.accounts import billing_account_get_or_create
from billing.services.topups import top_up_create
from tests.billing.conftest import make_reservation, save_card
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, django_user_model):
    staff = django_user_model.objects.create(username="staff", is_staff=True, is_superuser=True)
    client.force_login(staff)
    return client


def test_the_account_page_shows_balance_and_history(staff_client, org):
    LedgerEntry.objects.create(organization=org, kind=LedgerKind.CREDIT, amount_minor=1234,
                               currency="usd", idempotency_key="c", description="welcome")  # fmt: skip
    account = BillingAccount.objects.get(organization=org)

    page = staff_client.get(reverse("admin:billing_billingaccount_change", args=[account.pk]))

    assert page.status_code == 200
    assert b"12.34 USD" in page.content and b"welcome" in page.content


def _settings_form(account, **changes) -> dict:
    form = {
        "currency": account.currency,
        "auto_recharge_enabled": "on" if account.auto_recharge_enabled else "",
        "recharge_threshold_minor": account.recharge_threshold_minor,
        "recharge_amount_minor": account.recharge_amount_minor,
        "monthly_spend_limit_minor": account.monthly_spend_limit_minor or "",
        **changes,
    }
    return {k: v for k, v in form.items() if v != ""}


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"monthly_spend_limit_minor": -100}, "monthly_spend_limit_minor"),
        ({"recharge_amount_minor": 500_000_000}, "recharge_amount_minor"),  # over a top-up's cap
        ({"recharge_threshold_minor": 20_000_000}, "recharge_threshold_minor"),
        ({"auto_recharge_enabled": "on"}, "auto_recharge_enabled"),  # no card saved
    ],
)
def test_staff_change_settings_only_within_the_customers_bounds(staff_client, org, changes, field):
    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])
    before = BillingAccount.objects.filter(pk=account.pk).values().get()

    response = staff_client.post(url, _settings_form(account, **changes))

    assert response.status_code == 200  # the form again, with the error
    assert field in response.context["adminform"].form.errors
    assert BillingAccount.objects.filter(pk=account.pk).values().get() == before


def test_staff_settings_are_audited_and_the_currency_stays_once_money_is_held(staff_client, org):
    from marketplace.models import AuditEntry

    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_change", args=[account.pk])
    staff_client.post(url, _settings_form(account, monthly_spend_limit_minor=50000))
    account.refresh_from_db()
    assert account.monthly_spend_limit_minor == 50000
    entry = AuditEntry.objects.get(organization=org, action="billing_settings.update")
    assert entry.changes["after"] == {"monthly_spend_limit_minor": 50000}

    LedgerEntry.objects.create(organization=org, kind=LedgerKind.CREDIT, amount_minor=100,
                               currency="usd", idempotency_key="c")  # fmt: skip
    staff_client.post(url, _settings_form(account, currency="eur"))
    account.refresh_from_db()
    assert account.currency == "usd"  # read-only now: the ledger holds dollars


def test_staff_issue_a_credit_with_a_reason(staff_client, org):
    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_credit", args=[account.pk])

    refused = staff_client.post(url, {"amount": "25.00", "reason": "", "once": "k1"})
    assert refused.status_code == 200 and balance_minor(organization=org) == 0
    done = staff_client.post(url, {"amount": "25.00", "reason": "outage goodwill", "once": "k1"})
    again = staff_client.post(url, {"amount": "25.00", "reason": "outage goodwill", "once": "k1"})

    assert done.status_code == 302
    assert again.status_code == 302  # sent twice (a double click): one credit
    entry = LedgerEntry.objects.get(organization=org)
    assert (entry.kind, entry.amount_minor, entry.description, entry.created_by.username) == (
        LedgerKind.CREDIT, 2500, "outage goodwill", "staff",
    )  # fmt: skip
    from marketplace.models import AuditEntry

    (audited,) = AuditEntry.objects.filter(organization=org, action="credit.issue")
    assert (audited.object_id, audited.changes["after"]["reason"]) == (
        entry.public_id, "outage goodwill"
    )  # fmt: skip


def test_a_credit_typed_in_a_currency_the_account_has_since_left_is_refused(staff_client, org):
    """The form showed "Amount (USD)"; the customer chose yen before staff sent it (no money
    had moved): 500.00 was credited as 500 yen. The form carries the currency it showed, and
    the service refuses a credit in any but the account's, under the account's lock."""
    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_credit", args=[account.pk])
    shown = staff_client.get(url).content.decode()
    assert 'name="currency" value="usd"' in shown and "Amount (USD)" in shown
    BillingAccount.objects.filter(pk=account.pk).update(currency="jpy")

    sent = staff_client.post(url, {"amount": "500.00", "reason": "goodwill", "once": "k1",
                                   "currency": "usd"})  # fmt: skip

    assert sent.status_code == 200
    assert "This credit is in USD, but" in sent.content.decode()
    assert not LedgerEntry.objects.filter(organization=org).exists()
    from billing.services.credits import credit_issue
    from config.errors import Conflict

    with pytest.raises(Conflict) as error:
        credit_issue(organization=org, amount=Decimal("500.00"), reason="shell", created_by=None,
                     currency="usd")  # fmt: skip
    assert error.value.code == "currency_mismatch"
    assert not LedgerEntry.objects.filter(organization=org).exists()

    done = staff_client.post(url, {"amount": "500", "reason": "goodwill", "once": "k2",
                                   "currency": "jpy"})  # fmt: skip

    assert done.status_code == 302
    entry = LedgerEntry.objects.get(organization=org)
    assert (entry.amount_minor, entry.currency) == (500, "jpy")


def test_the_ledger_cannot_be_edited_or_deleted_in_the_admin(staff_client, org):
    entry = LedgerEntry.objects.create(organization=org, kind=LedgerKind.CREDIT, amount_minor=100,
                                       currency="usd", idempotency_key="c")  # fmt: skip

    staff_client.post(
        reverse("admin:billing_ledgerentry_change", args=[entry.pk]), {"amount_minor": 1}
    )
    delete = staff_client.post(
        reverse("admin:billing_ledgerentry_delete", args=[entry.pk]), {"post": "yes"}
    )

    assert delete.status_code == 403
    assert LedgerEntry.objects.get().amount_minor == 100


def test_staff_approve_postpaid_once_they_confirm_it(staff_client, org):
    account = BillingAccount.objects.get(organization=org)
    LedgerEntry.objects.create(organization=org, kind=LedgerKind.CREDIT, amount_minor=1234,
                               currency="usd", idempotency_key="c")  # fmt: skip
    url = reverse("admin:billing_billingaccount_changelist")
    asked = {"action": "approve_postpaid", "_selected_action": [account.pk]}

    page = staff_client.post(url, asked)

    html = page.content.decode()
    assert page.status_code == 200 and 'id="consequence"' in html
    assert str(org) in html and "12.34 USD" in html and 'name="confirmed"' in html
    account.refresh_from_db()
    assert account.mode == BillingMode.PREPAID  # nothing before it is confirmed

    staff_client.post(url, {**asked, "confirmed": "yes"})

    account.refresh_from_db()
    assert account.mode == BillingMode.POSTPAID
    assert account.postpaid_approved_by.username == "staff"


def test_staff_who_may_only_view_accounts_do_not_approve_postpaid(client, django_user_model, org):
    from django.contrib.auth.models import Permission

    viewer = django_user_model.objects.create_user("support", password="x", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_billingaccount"))
    client.force_login(viewer)
    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_changelist")

    assert "Approve postpaid" not in client.get(url).content.decode()
    client.post(url, {"action": "approve_postpaid", "_selected_action": [account.pk]})

    account.refresh_from_db()
    assert account.mode == BillingMode.PREPAID and account.postpaid_approved_by is None


@pytest.mark.stripe
def test_staff_refund_a_top_up_through_the_refunds_api(
    staff_client, localstripe, org, eager_celery, django_capture_on_commit_callbacks
):
    save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)
    with django_capture_on_commit_callbacks(execute=True):
        top_up = top_up_create(organization=org, amount=Decimal("30.00"))

    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post(reverse("admin:billing_topup_refund", args=[top_up.pk]),
                                     {"amount": "30.00", "reason": "double booking",
                                      "once": "r1"})  # fmt: skip

    assert response.status_code == 302
    refund = Refund.objects.get()
    assert (refund.status, refund.amount_minor, refund.reason) == (
        "succeeded",
        3000,
        "double booking",
    )
    assert refund.stripe_refund_id.startswith("re_")
    assert balance_minor(organization=org) == 0


def test_staff_see_holds_and_cannot_change_them(staff_client, org):
    from billing.models import Hold
    from tests.billing.conftest import make_reservation

    reservation = make_reservation(org, gpu_count=1)
    hold = Hold.objects.create(organization=org, reservation=reservation, amount_minor=250,
                               currency="usd", idempotency_key="reservation:x")  # fmt: skip

    listed = staff_client.get(reverse("admin:billing_hold_changelist"))
    changed = staff_client.post(reverse("admin:billing_hold_change", args=[hold.pk]),
                                {"amount_minor": 1})  # fmt: skip

    assert listed.status_code == 200 and reservation.public_id in listed.content.decode()
    assert changed.status_code == 403
    hold.refresh_from_db()
    assert hold.amount_minor == 250


def test_staff_credit_in_yen_is_refused_unless_it_is_whole_yen(staff_client, org):
    BillingAccount.objects.filter(organization=org).update(currency="jpy")
    account = BillingAccount.objects.get(organization=org)
    url = reverse("admin:billing_billingaccount_credit", args=[account.pk])

    refused = staff_client.post(url, {"amount": "1000.50", "reason": "goodwill", "once": "y1"})

    assert refused.status_code == 200  # the form again: ¥1,000.50 would have been ¥1,001
    assert "Amounts in JPY are whole numbers." in refused.content.decode()
    assert not LedgerEntry.objects.filter(organization=org).exists()
    done = staff_client.post(url, {"amount": "1000", "reason": "goodwill", "once": "y2"})
    assert done.status_code == 302
    assert LedgerEntry.objects.get(organization=org).amount_minor == 1000


def test_staff_refund_in_yen_is_refused_unless_it_is_whole_yen(staff_client, org):
    from billing.models import TopUp

    top_up = TopUp.objects.create(organization=org, amount_minor=5000, currency="jpy",
                                  payment_method_id="pm_x", status="succeeded")  # fmt: skip
    BillingAccount.objects.filter(organization=org).update(currency="jpy")
    LedgerEntry.objects.create(organization=org, kind=LedgerKind.TOP_UP, amount_minor=5000,
                               currency="jpy", idempotency_key="t")  # fmt: skip
    url = reverse("admin:billing_topup_refund", args=[top_up.pk])

    response = staff_client.post(url, {"amount": "0.50", "reason": "double", "once": "r1"})

    assert response.status_code == 200
    assert "Amounts in JPY are whole numbers." in response.content.decode()
    assert not Refund.objects.exists()


def _listed(client, url: str, **params):
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url, params)
    assert response.status_code == 200
    return response, [q["sql"] for q in ctx.captured_queries]


@pytest.mark.parametrize("name", ["billing_ledgerentry", "billing_hold"])
def test_the_ledger_and_hold_lists_are_newest_first_by_their_indexed_id(staff_client, org, name):
    reservation = make_reservation(org, gpu_count=1)
    for n in range(2):
        LedgerEntry.objects.create(organization=org, kind=LedgerKind.CREDIT, amount_minor=100,
                                   currency="usd", idempotency_key=f"c{n}")  # fmt: skip
        Hold.objects.create(organization=org, reservation=reservation, amount_minor=250,
                            currency="usd", idempotency_key=f"h{n}")  # fmt: skip
    model = LedgerEntry if name == "billing_ledgerentry" else Hold
    url = reverse(f"admin:{name}_changelist")

    newest_first, queries = _listed(staff_client, url)
    by_created_column, clicked = _listed(staff_client, url, o="0")

    listed = [q for q in queries if f'FROM "{name}"' in q and "ORDER BY" in q]
    assert [q.split("ORDER BY")[1] for q in listed] == [f' "{name}"."id" DESC']
    assert list(newest_first.context["cl"].result_list) == list(model.objects.order_by("-pk"))
    # Its "created at" column sorts by id too: the same order, from the primary key's index.
    listed = [q for q in clicked if f'FROM "{name}"' in q and "ORDER BY" in q]
    assert [q.split("ORDER BY")[1] for q in listed] == [f' "{name}"."id" ASC']
    assert list(by_created_column.context["cl"].result_list) == list(model.objects.order_by("pk"))


def test_the_account_list_reads_balances_kept_by_the_ledger_not_the_ledger(staff_client, org):
    richer = OrganizationFactory(name="Richer Lab")
    billing_account_get_or_create(organization=richer)
    for who, amounts in ((org, (1234, -234)), (richer, (5000,))):
        for n, amount in enumerate(amounts):
            LedgerEntry.objects.create(organization=who, kind=LedgerKind.CREDIT,
                                       amount_minor=amount, currency="usd",
                                       idempotency_key=f"{who.pk}:{n}")  # fmt: skip
    url = reverse("admin:billing_billingaccount_changelist")

    listed, queries = _listed(staff_client, url)
    by_balance, sorted_queries = _listed(staff_client, url, o="4")  # after the checkbox

    assert not [q for q in queries + sorted_queries if "billing_ledgerentry" in q]
    assert [(a.organization, a.balance_minor) for a in by_balance.context["cl"].result_list] == [
        (org, 1000), (richer, 5000)
    ]  # fmt: skip
    page = listed.content.decode()
    assert "10.00 USD" in page and "50.00 USD" in page


def test_staff_who_may_only_view_get_no_credit_or_refund_links_and_a_403(
    client, django_user_model, org
):
    from django.contrib.auth.models import Permission

    from billing.models import TopUp

    viewer = django_user_model.objects.create_user("viewer", password="x", is_staff=True)
    viewer.user_permissions.set(
        Permission.objects.filter(codename__in=["view_billingaccount", "view_topup"])
    )
    client.force_login(viewer)
    account = billing_account_get_or_create(organization=org)
    top_up = TopUp.objects.create(organization=org, amount_minor=5000, currency="usd",
                                  payment_method_id="pm_x", status="succeeded")  # fmt: skip

    account_page = client.get(reverse("admin:billing_billingaccount_change", args=[account.pk]))
    top_ups = client.get(reverse("admin:billing_topup_changelist"))
    credit = client.post(reverse("admin:billing_billingaccount_credit", args=[account.pk]),
                         {"amount": "10.00", "reason": "x", "once": "c1"})  # fmt: skip
    refund = client.post(reverse("admin:billing_topup_refund", args=[top_up.pk]),
                         {"amount": "10.00", "reason": "x", "once": "r1"})  # fmt: skip

    assert (account_page.status_code, top_ups.status_code) == (200, 200)
    assert "Issue a credit" not in account_page.content.decode()
    assert "Refund…" not in top_ups.content.decode()
    assert (credit.status_code, refund.status_code) == (403, 403)  # was a silent redirect
    assert not LedgerEntry.objects.filter(organization=org).exists()
    assert not Refund.objects.exists()


def test_staff_find_money_records_by_the_ids_a_customer_pastes(staff_client, org):
    """A ticket quotes an organisation (org_…), a top-up (tu_…), a payment (pi_…), an invoice
    (in_…), a customer (cus_…), a refund (re_…) or a ledger entry (led_…): each finds its
    record on its list, and only it."""
    from billing.models import Invoice, PaymentMethod, TopUp

    other = OrganizationFactory(name="Other Lab")
    billing_account_get_or_create(organization=other)
    BillingAccount.objects.filter(organization=org).update(stripe_customer_id="cus_Mine")
    top_up = TopUp.objects.create(organization=org, amount_minor=500, currency="usd",
                                  payment_method_id="pm_1", stripe_payment_intent_id="pi_Mine",
                                  status="succeeded")  # fmt: skip
    TopUp.objects.create(organization=other, amount_minor=700, currency="usd",
                         payment_method_id="pm_2", stripe_payment_intent_id="pi_Other")  # fmt: skip
    refund = Refund.objects.create(organization=org, top_up=top_up, amount_minor=100,
                                   currency="usd", reason="r", stripe_refund_id="re_Mine")  # fmt: skip
    invoice = Invoice.objects.create(organization=org, stripe_invoice_id="in_Mine",
                                     stripe_customer_id="cus_Mine", status="open",
                                     currency="usd")  # fmt: skip
    Invoice.objects.create(organization=other, stripe_invoice_id="in_Other",
                           stripe_customer_id="cus_Other", status="open", currency="usd")  # fmt: skip
    card = PaymentMethod.objects.create(organization=org, stripe_payment_method_id="pm_Mine",
                                        brand="visa", last4="4242")  # fmt: skip
    entry = LedgerEntry.objects.create(organization=org, kind=LedgerKind.CREDIT, amount_minor=1,
                                       currency="usd", idempotency_key="k")  # fmt: skip
    LedgerEntry.objects.create(organization=other, kind=LedgerKind.CREDIT, amount_minor=1,
                               currency="usd", idempotency_key="k2")  # fmt: skip
    account = BillingAccount.objects.get(organization=org)

    def found(name: str, q: str) -> list:
        response = staff_client.get(reverse(f"admin:billing_{name}_changelist"), {"q": q})
        assert response.status_code == 200
        return [obj.pk for obj in response.context["cl"].result_list]

    assert found("billingaccount", org.public_id) == [account.pk]
    assert found("billingaccount", "cus_Mine") == [account.pk]
    assert found("topup", top_up.public_id) == [top_up.pk]
    assert found("topup", org.public_id) == [top_up.pk]
    assert found("topup", "pi_Mine") == [top_up.pk]
    assert found("refund", "re_Mine") == [refund.pk]
    assert found("refund", top_up.public_id) == [refund.pk]
    assert found("invoice", "in_Mine") == [invoice.pk]
    assert found("invoice", org.public_id) == [invoice.pk]
    assert found("paymentmethod", "pm_Mine") == [card.pk]
    assert found("ledgerentry", entry.public_id) == [entry.pk]
    assert found("ledgerentry", org.public_id) == [entry.pk]
    # The top-ups list shows the id customers see, never the sequential one.
    listed = staff_client.get(reverse("admin:billing_topup_changelist")).content.decode()
    assert top_up.public_id in listed


def test_money_lists_show_amounts_in_their_currency_not_minor_units(staff_client, org):
    """The ledger, holds, top-ups, refunds, invoices and usage lists show 12.34 USD and
    5,999 JPY, as the customer sees them, not 1234 and 5999 beside a currency code."""
    other = OrganizationFactory()
    LedgerEntry.objects.create(organization=org, kind=LedgerKind.CREDIT, amount_minor=123456,
                               currency="usd", idempotency_key="u")  # fmt: skip
    LedgerEntry.objects.create(organization=other, kind=LedgerKind.CREDIT, amount_minor=5999,
                               currency="jpy", idempotency_key="j")  # fmt: skip

    page = staff_client.get(reverse("admin:billing_ledgerentry_changelist"))

    html = page.content.decode()
    assert page.status_code == 200
    assert "1,234.56 USD" in html and "5,999 JPY" in html
    assert ">123456<" not in html
    by_amount = staff_client.get(reverse("admin:billing_ledgerentry_changelist"), {"o": "3"})
    assert by_amount.status_code == 200  # the column sorts by the amount
    assert by_amount.content.decode().index("5,999 JPY") < by_amount.content.decode().index(
        "1,234.56 USD"
    )
    TopUp.objects.create(organization=org, amount_minor=5000, currency="usd",
                         payment_method_id="pm_card_visa")  # fmt: skip
    top_ups = staff_client.get(reverse("admin:billing_topup_changelist")).content.decode()
    assert "50.00 USD" in top_ups and ">5000<" not in top_ups
    for name in ("hold", "refund", "invoice", "usageaggregate"):
        assert staff_client.get(reverse(f"admin:billing_{name}_changelist")).status_code == 200
