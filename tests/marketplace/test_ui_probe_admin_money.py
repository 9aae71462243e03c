"""Probes of this round's changes through the admin, as staff with the right permissions and
as staff who may only view: reservations' and quotes' amounts in their currency's own
decimals (as the API and the portal write them), the cancel confirmation's refund as the
customer's page states it, restarts in place, billing settings and credits refused outside
the currency's rules with nothing changed, and burn-in results readable but not actionable by
view-only staff."""

import re
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from billing.models import BillingAccount, LedgerEntry, LedgerKind
from billing.services.ledger import ledger_entry_add
from inventory.burn_in import burn_in_request
from inventory.models import BurnIn, NodeStatus
from marketplace.models import Reservation, ReservationStatus, Role
from marketplace.services.quotes import quote_create
from marketplace.services.reservations import reservation_create
from tests.clients import HttpsClient
from tests.factories import (
    GpuModelFactory,
    MembershipFactory,
    NodeFactory,
    OrganizationFactory,
    SiteFactory,
    UserFactory,
)
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    tomorrow,
)
from tests.marketplace.test_agent_report_delivery import REPORT, _active_through_agent

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)
YEN = {
    "currency": "jpy", "price": "1500.0000", "term_total": "273,600 JPY",
    "api_term_total": "273600", "quote_total": "9,000 JPY", "refund": "136,800 JPY", "api_refund": "136800",
}  # fmt: skip
DOLLARS = {
    "currency": "usd", "price": "2.0000", "term_total": "364.80 USD",
    "api_term_total": "364.80", "quote_total": "12.00 USD", "refund": "182.40 USD", "api_refund": "182.40",
}  # fmt: skip
CURRENCIES = [pytest.param(YEN, id="jpy"), pytest.param(DOLLARS, id="usd")]


def _text(response) -> str:
    html = re.sub(r"<script.*?</script>", "", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&#x27;", "'")


def _staff(*codenames: str, superuser: bool = False) -> HttpsClient:
    user = UserFactory(is_staff=True, is_superuser=superuser)
    user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
    client = HttpsClient()
    client.force_login(user)
    return client


def _org(currency: str):
    org = OrganizationFactory()
    account = BillingAccount.objects.create(organization=org, currency=currency)
    ledger_entry_add(organization=org, kind=LedgerKind.CREDIT, amount_minor=10_000_000,
                     currency=currency, idempotency_key=f"fund:{org.pk}")  # fmt: skip
    return org, account


def _term(shown: dict):
    """A 1-week term of one GPU for 8 days from two days ahead (50 % back if cancelled now),
    and a held quote, priced in the currency."""
    model = GpuModelFactory()
    make_policy()
    site = SiteFactory()
    make_rate(model, shown["price"], site=site, currency=shown["currency"])
    make_nodes(site, model, 2)
    org, _ = _org(shown["currency"])
    start = tomorrow(48)
    term = reservation_create(
        organization=org, gpu_model=model.slug, gpu_count=1, site=site.slug, tier="reserved",
        term="1w", starts_at=start, ends_at=start + 192 * H,
    )  # fmt: skip
    quote = quote_create(
        organization=org, gpu_model=model.slug, gpu_count=2, site=site.slug,
        starts_at=tomorrow(2), ends_at=tomorrow(5), tier="on_demand",
    )  # fmt: skip
    return term, quote


@pytest.mark.parametrize("shown", CURRENCIES)
def test_reservation_and_quote_amounts_are_written_as_the_api_writes_them(shown):
    term, quote = _term(shown)
    staff = _staff("view_reservation", "view_quote")
    owner = HttpsClient()
    owner.force_login(MembershipFactory(organization=term.organization, role=Role.OWNER).user)

    page = _text(staff.get(reverse("admin:marketplace_reservation_change", args=[term.pk])))
    listing = _text(staff.get(reverse("admin:marketplace_reservation_changelist")))
    quotes = _text(staff.get(reverse("admin:marketplace_quote_changelist")))
    api = owner.get(f"/api/v1/reservations/{term.public_id}").json()

    assert api["total"] == shown["api_term_total"]
    assert f"Total amount: {shown['term_total']}" in page
    assert shown["term_total"] in listing
    assert shown["quote_total"] in quotes
    wrong = {"jpy": ["273600.00", "9000.00"], "usd": []}[shown["currency"]]
    assert not [w for w in wrong if w in page + listing + quotes]


@pytest.mark.parametrize("shown", CURRENCIES)
def test_a_quotes_page_and_an_accounts_ledger_write_amounts_with_their_currency(shown):
    term, quote = _term(shown)
    staff = _staff("view_quote", "view_billingaccount")

    page = _text(staff.get(reverse("admin:marketplace_quote_change", args=[quote.pk])))
    account = BillingAccount.objects.get(organization=term.organization)
    ledger = _text(staff.get(reverse("admin:billing_billingaccount_change", args=[account.pk])))

    assert f"Total amount: {shown['quote_total']}" in page
    assert "9000.00" not in page
    funded = {"jpy": "10,000,000 JPY", "usd": "100,000.00 USD"}[shown["currency"]]
    assert funded in ledger


@pytest.mark.parametrize("shown", CURRENCIES)
def test_the_cancel_confirmation_states_the_customers_refund_and_binds_it(shown):
    term, _ = _term(shown)
    url = reverse("admin:marketplace_reservation_changelist")
    asked = {"action": "cancel", "_selected_action": [term.pk], "index": 0}
    owner = HttpsClient()
    owner.force_login(MembershipFactory(organization=term.organization, role=Role.OWNER).user)
    customer_page = _text(owner.get(f"/reservations/{term.public_id}/cancel"))

    confirm = _staff("view_reservation", "change_reservation").post(url, asked)
    viewer = _staff("view_reservation")
    forged = viewer.post(url, {**asked, "confirmed": "yes", "reason": "forged",
                               f"refund_fraction_{term.pk}": "0.5"})  # fmt: skip

    assert f"You get back {shown['refund']}" in customer_page
    assert f"cancel {shown['refund']} (reserved, 24 hours' to 7 days' notice" in _text(confirm)
    assert "Cancel selected reservations" not in _text(viewer.get(url))
    assert forged.status_code in (200, 302)  # the list again ("No action selected")
    term.refresh_from_db()
    assert term.status == ReservationStatus.PENDING and not term.cancellation

    no_reason = _staff("view_reservation", "change_reservation").post(
        url, {**asked, "confirmed": "yes", "reason": " ", f"refund_fraction_{term.pk}": "0.5"}
    )
    assert "Say why: the customer reads it." in _text(no_reason)
    term.refresh_from_db()
    assert term.status == ReservationStatus.PENDING

    _staff("view_reservation", "change_reservation").post(
        url,
        {**asked, "confirmed": "yes", "reason": "ticket 7", f"refund_fraction_{term.pk}": "0.5"},
    )
    term.refresh_from_db()
    assert term.status == ReservationStatus.CANCELLED
    assert term.cancellation["refund_amount"] == shown["api_refund"]


@pytest.mark.usefixtures("allow_all_funding")
def test_a_restart_in_place_shows_in_the_reservations_admin_page():
    reservation, _node, agent, _ = _active_through_agent(tier="reserved")
    agent.post(REPORT, {"containers": []}, format="json")  # its container vanished
    staff = _staff("view_reservation")

    page = _text(staff.get(reverse("admin:marketplace_reservation_change", args=[reservation.pk])))

    assert "Status: Provisioning" in page
    assert "it restarts in place on the same GPUs (restart 1 of at most 3 within 1 h)" in page
    assert "Restarts in place: 1 in all; 1 within the last 1 h (at most 3)" in page


@pytest.mark.parametrize(
    ("currency", "typed", "error"),
    [
        ("jpy", "10.50", "Amounts in JPY are whole numbers."),
        ("jpy", "1e3", "Enter a number."),
        ("usd", "1e3", "Enter a number."),
        ("usd", "１００", "Enter a number."),
        ("usd", "0", "Ensure this value is greater than or equal to 0.01."),
    ],
)
def test_a_credit_outside_the_currencys_rules_is_refused_and_moves_nothing(currency, typed, error):
    org, account = _org(currency)
    url = reverse("admin:billing_billingaccount_credit", args=[account.pk])
    staff = _staff("view_billingaccount", "change_billingaccount")

    page = _text(staff.get(url))
    refused = staff.post(url, {"amount": typed, "reason": "goodwill", "once": "probe"})

    assert f"Amount ({currency.upper()})" in page
    assert refused.status_code == 200
    assert error in _text(refused)
    assert LedgerEntry.objects.filter(organization=org).count() == 1  # the funding only


def test_view_only_staff_cannot_issue_a_credit_or_change_billing_settings():
    org, account = _org("jpy")
    viewer = _staff("view_billingaccount")
    credit = viewer.post(
        reverse("admin:billing_billingaccount_credit", args=[account.pk]),
        {"amount": "1000", "reason": "goodwill", "once": "probe"},
    )
    change = viewer.post(
        reverse("admin:billing_billingaccount_change", args=[account.pk]),
        {"currency": "jpy", "recharge_threshold_minor": "100", "recharge_amount_minor": "5000"},
    )
    before = BillingAccount.objects.filter(pk=account.pk).values().get()

    assert credit.status_code == 403  # refused, not a silent redirect home
    assert change.status_code == 403
    assert LedgerEntry.objects.filter(organization=org).count() == 1
    assert BillingAccount.objects.filter(pk=account.pk).values().get() == before


@pytest.mark.parametrize(
    ("currency", "amount", "error"),
    [
        ("jpy", "49", "A recharge is between 50 and 10,000,000 JPY."),
        ("usd", "499", "A recharge is between 5.00 and 100,000.00 USD."),
    ],
)
def test_a_recharge_below_the_currencys_least_is_refused_in_the_admin(currency, amount, error):
    _, account = _org(currency)
    before = BillingAccount.objects.filter(pk=account.pk).values().get()
    staff = _staff("view_billingaccount", "change_billingaccount")

    response = staff.post(
        reverse("admin:billing_billingaccount_change", args=[account.pk]),
        {"currency": currency, "recharge_threshold_minor": account.recharge_threshold_minor,
         "recharge_amount_minor": amount, "monthly_spend_limit_minor": ""},
    )  # fmt: skip

    assert response.status_code == 200
    assert error in _text(response)
    assert BillingAccount.objects.filter(pk=account.pk).values().get() == before


def test_burn_in_results_are_read_by_view_only_staff_who_cannot_start_one():
    site = SiteFactory(burn_in_command="gpu-burn 60")
    node = NodeFactory(site=site, status=NodeStatus.MAINTENANCE)
    burn_in = burn_in_request(node=node, reason="after RMA", requested_by="ops")
    viewer = _staff("view_burnin", "view_node")
    nodes_url = reverse("admin:inventory_node_changelist")

    listing = viewer.get(reverse("admin:inventory_burnin_changelist"))
    page = viewer.get(reverse("admin:inventory_burnin_change", args=[burn_in.pk]))
    nodes = _text(viewer.get(nodes_url))
    viewer.post(nodes_url, {"action": "burn_in", "_selected_action": [node.pk], "index": 0})

    assert listing.status_code == 200 and node.hostname in _text(listing)
    assert page.status_code == 200 and "after RMA" in _text(page)
    assert "Burn in selected nodes" not in nodes
    assert BurnIn.objects.filter(node=node).count() == 1  # the forged action queued nothing
    assert Reservation.objects.count() == 0
