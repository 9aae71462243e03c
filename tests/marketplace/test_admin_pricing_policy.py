"""A saved pricing policy is a record in the admin: staff change prices by adding a newer
policy, never by editing or deleting one in place (the history of what was in force stays)."""

from decimal import Decimal

import pytest
from django.forms.models import model_to_dict
from django.urls import reverse

from marketplace.models import PricingPolicy
from marketplace.services.pricing import current_policy
from tests.marketplace.market_helpers import make_policy

pytestmark = pytest.mark.django_db


def _form(policy: PricingPolicy, **changes) -> dict:
    data = {k: v for k, v in model_to_dict(policy).items() if k != "id" and v is not None}
    return {**data, **changes}


def test_a_saved_policy_is_not_edited_in_place(admin_client):
    policy = make_policy(discount_1w_pct=Decimal("10.00"), note="launch")
    url = reverse("admin:marketplace_pricingpolicy_change", args=[policy.pk])

    response = admin_client.post(url, _form(policy, discount_1w_pct="90.00"))

    assert response.status_code == 403
    policy.refresh_from_db()
    assert policy.discount_1w_pct == Decimal("10.00")


def test_a_saved_policy_is_not_deleted(admin_client):
    policy = make_policy(note="launch")
    url = reverse("admin:marketplace_pricingpolicy_delete", args=[policy.pk])

    response = admin_client.post(url, {"post": "yes"})

    assert response.status_code == 403
    assert PricingPolicy.objects.filter(pk=policy.pk).exists()


def test_staff_change_prices_by_adding_a_newer_policy(admin_client):
    old = make_policy(discount_1w_pct=Decimal("10.00"), note="launch")
    page = admin_client.get(reverse("admin:marketplace_pricingpolicy_change", args=[old.pk]))
    assert page.status_code == 200  # still readable

    response = admin_client.post(
        reverse("admin:marketplace_pricingpolicy_add"),
        _form(old, discount_1w_pct="12.00", note="winter"),
    )

    assert response.status_code == 302
    assert PricingPolicy.objects.count() == 2
    assert current_policy().discount_1w_pct == Decimal("12.00")
    old.refresh_from_db()
    assert old.discount_1w_pct == Decimal("10.00")
