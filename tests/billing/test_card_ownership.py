"""A card belongs to the organisation that set it up; it never moves to another one.

Two organisations on a real localstripe: B tries to take A's saved card by its id, with or
without a SetupIntent, through the API, the portal and a webhook.
"""

import pytest

from billing.models import BillingAccount, PaymentMethod
from billing.services.accounts import billing_account_get_or_create
from billing.services.payment_methods import payment_method_mirror
from billing.services.webhooks import _HANDLERS
from config.errors import NotFound
from marketplace.models import Role
from tests.billing.conftest import save_card, stripe_client
from tests.clients import HttpsClient
from tests.factories import MembershipFactory

pytestmark = [pytest.mark.django_db, pytest.mark.stripe]


@pytest.fixture
def two_orgs(localstripe, org):
    other = MembershipFactory(role=Role.OWNER, user__password="!")
    billing_account_get_or_create(organization=other.organization)
    card = save_card(localstripe, org)
    client = HttpsClient()
    client.force_login(other.user)
    return org, other.organization, card, client


def _state(org_a, org_b):
    return (
        list(PaymentMethod.objects.values_list("stripe_payment_method_id", "organization_id")),
        BillingAccount.objects.get(organization=org_a).default_payment_method_id,
        BillingAccount.objects.get(organization=org_b).default_payment_method_id,
    )


def _attach(client, body):
    return client.post("/api/v1/billing/payment-methods", body, content_type="application/json")


def test_another_organisations_card_cannot_be_taken_by_its_id(localstripe, two_orgs):
    org_a, org_b, card, client = two_orgs
    before = _state(org_a, org_b)
    assert before == ([(card, org_a.pk)], card, "")

    response = _attach(client, {"payment_method": card})

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_such_payment_method"
    assert response.json()["error"]["field"] == "payment_method"
    assert _state(org_a, org_b) == before
    customer_a = BillingAccount.objects.get(organization=org_a).stripe_customer_id
    stripe_pm = stripe_client(localstripe).v1.payment_methods.retrieve(card)
    assert stripe_pm.customer == customer_a  # not attached to B's customer either
    assert client.get("/api/v1/billing/payment-methods").json() == []


def test_naming_a_setup_intent_does_not_help_unless_it_is_ours_and_confirmed_that_card(
    localstripe, two_orgs
):
    org_a, org_b, card, client = two_orgs
    before = _state(org_a, org_b)
    # B's own SetupIntent, confirmed with another card.
    own = client.post("/api/v1/billing/payment-methods/setup-intent").json()
    confirmed = stripe_client(localstripe).v1.setup_intents.confirm(
        own["setup_intent_id"], {"payment_method": "pm_card_visa"}
    )
    # A's SetupIntent, which did confirm a card.
    a_intent = stripe_client(localstripe).v1.setup_intents.create(
        {"customer": BillingAccount.objects.get(organization=org_a).stripe_customer_id}
    )
    a_confirmed = stripe_client(localstripe).v1.setup_intents.confirm(
        a_intent.id, {"payment_method": "pm_card_visa"}
    )

    for body in (
        {"payment_method": card, "setup_intent": confirmed.id},
        {"payment_method": a_confirmed.payment_method, "setup_intent": a_confirmed.id},
    ):
        response = _attach(client, body)
        assert response.status_code == 404, body
        assert response.json()["error"]["code"] == "no_such_payment_method"
    assert _state(org_a, org_b) == before

    # Its own card, from its own SetupIntent, is saved.
    mine = _attach(
        client, {"payment_method": confirmed.payment_method, "setup_intent": confirmed.id}
    )
    assert mine.status_code == 201
    assert (
        PaymentMethod.objects.get(stripe_payment_method_id=confirmed.payment_method).organization_id
        == org_b.pk
    )


def test_the_portal_refuses_another_organisations_card(two_orgs):
    org_a, org_b, card, client = two_orgs
    before = _state(org_a, org_b)

    response = client.post("/billing/payment-methods", {"payment_method": card}, follow=True)

    [message] = [str(m) for m in response.context["messages"]]
    assert "was set up for this organisation" in message
    assert _state(org_a, org_b) == before


def test_a_stored_card_never_moves_to_another_organisation(two_orgs):
    org_a, org_b, card, _client = two_orgs
    before = _state(org_a, org_b)

    with pytest.raises(NotFound):
        payment_method_mirror(
            organization=org_b, stripe_payment_method={"id": card, "card": {"last4": "4242"}}
        )
    # A payment_method.attached event naming B's customer leaves it where it is, too.
    customer_b = BillingAccount.objects.get(organization=org_b).stripe_customer_id or "cus_b"
    BillingAccount.objects.filter(organization=org_b).update(stripe_customer_id=customer_b)
    _HANDLERS["payment_method.attached"]({"id": card, "customer": customer_b, "card": {}})

    assert _state(org_a, org_b) == before


def test_saving_ones_own_card_again_changes_nothing(localstripe, two_orgs):
    org_a, org_b, card, _client = two_orgs
    owner_a = HttpsClient()
    owner_a.force_login(org_a.memberships.get().user)

    response = _attach(owner_a, {"payment_method": card})

    assert response.status_code == 201
    assert PaymentMethod.objects.filter(stripe_payment_method_id=card).count() == 1
    assert BillingAccount.objects.get(organization=org_a).default_payment_method_id == card
