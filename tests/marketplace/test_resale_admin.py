"""Staff see listings and sales in the admin and set the resale fee there."""

from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse

from marketplace.models import ResaleFee
from marketplace.services.resale import listing_create, resale_fee_pct
from marketplace.services.reservations import reservation_create
from tests.marketplace.resale_helpers import market

pytestmark = pytest.mark.django_db


def test_staff_see_listings_and_sales_and_a_new_fee_applies_to_later_sales(
    admin_client, admin_user
):
    m = market()
    lst = listing_create(
        organization=m.seller,
        reservation=m.term,
        gpu_count=2,
        starts_at=m.start + timedelta(days=1),
        ends_at=m.start + timedelta(days=2),
        price_per_gpu_hour=Decimal("1.0000"),
    )
    assert resale_fee_pct() == Decimal("10")

    response = admin_client.post(
        reverse("admin:marketplace_resalefee_add"), {"fee_pct": "15.00", "note": "Q1"}
    )

    assert response.status_code == 302
    assert ResaleFee.objects.get().created_by == admin_user
    reservation_create(
        organization=m.buyer,
        listing=lst,
        gpu_count=2,
        starts_at=lst.starts_at,
        ends_at=lst.ends_at,
    )
    changelist = admin_client.get(reverse("admin:marketplace_resalelisting_changelist"))
    assert changelist.status_code == 200
    html = changelist.content.decode()
    assert lst.public_id in html and "15.00" in html
    assert (
        admin_client.get(
            reverse("admin:marketplace_resalelisting_change", args=[lst.pk])
        ).status_code
        == 200
    )
    # Records, not forms: staff cannot add or change listings, nor edit a saved fee.
    assert admin_client.get(reverse("admin:marketplace_resalelisting_add")).status_code == 403
    fee = ResaleFee.objects.get()
    edit = admin_client.post(
        reverse("admin:marketplace_resalefee_change", args=[fee.pk]), {"fee_pct": "1.00"}
    )
    assert edit.status_code == 403
    assert ResaleFee.objects.get().fee_pct == Decimal("15.00")
