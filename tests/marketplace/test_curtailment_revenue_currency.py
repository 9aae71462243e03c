"""A curtailment's revenue forgone is money in its victims' currency: rounded to that
currency's minor unit (the whole yen, the cent) by the one money rule, and shown by the admin
and the staff dashboard in that currency's decimals with its code."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse
from django.utils import timezone

from marketplace.models import CurtailmentVictim, Reservation
from marketplace.services.curtailment import curtailment_announce
from marketplace.services.reservations import reservation_create
from tests.clients import HttpsClient
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory, UserFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]

# Two GPUs for 8 hours that never start (preempted when planned): 16 GPU-hours forgone at the
# price paid. 16 × 1234.5678 = 19,753.0848 yen; 16 × 1.2345 = 19.752 dollars.
YEN = {"currency": "jpy", "price": "1234.5678", "forgone": "19753", "shown": "19,753 JPY",
       "wrong": "19753.08"}  # fmt: skip
DOLLARS = {"currency": "usd", "price": "1.2345", "forgone": "19.75", "shown": "19.75 USD",
           "wrong": "19.752"}  # fmt: skip
CURRENCIES = [pytest.param(YEN, id="jpy"), pytest.param(DOLLARS, id="usd")]


def _text(response) -> str:
    html = re.sub(r"<script.*?</script>", "", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _curtailed(shown: dict):
    """An interruptible booking of 2 GPUs for 8 hours from 3 hours ahead, priced in the
    currency, shed by an all-flexible-load curtailment from 1 hour ahead (so never started)."""
    model = GpuModelFactory()
    make_policy()
    site = SiteFactory()
    make_rate(
        model, "2" if shown["currency"] == "usd" else "3000", site=site, currency=shown["currency"]
    )
    make_nodes(site, model, 1)
    start = timezone.now().replace(microsecond=0) + timedelta(hours=3)
    reservation = reservation_create(
        organization=OrganizationFactory(), gpu_model=model.slug, gpu_count=2, site=site.slug,
        tier="interruptible", starts_at=start, ends_at=start + timedelta(hours=8),
    )  # fmt: skip
    # The price paid, set apart from the rate card (the interruptible tier's discount aside).
    Reservation.objects.filter(pk=reservation.pk).update(price_per_gpu_hour=Decimal(shown["price"]))
    shed_at = timezone.now() + timedelta(hours=1)
    curtailment = curtailment_announce(
        site=site, shed_at=shed_at, until=shed_at + timedelta(hours=12), target_mw=None,
        reason="grid operator's call",
    )  # fmt: skip
    return curtailment, reservation


@pytest.mark.parametrize("shown", CURRENCIES)
def test_revenue_forgone_is_rounded_to_the_reservations_currency(shown):
    curtailment, reservation = _curtailed(shown)

    victim = CurtailmentVictim.objects.get(curtailment=curtailment)
    assert victim.reservation_id == reservation.pk
    assert Reservation.objects.get(pk=reservation.pk).status == "preempted"
    assert victim.gpu_hours_forgone == Decimal("16.000")
    assert victim.revenue_forgone == Decimal(shown["forgone"])
    assert curtailment.revenue_forgone == Decimal(shown["forgone"])
    assert curtailment.currency == shown["currency"]
    curtailment.refresh_from_db()
    assert (curtailment.revenue_forgone, curtailment.currency) == (
        Decimal(shown["forgone"]),
        shown["currency"],
    )


@pytest.mark.parametrize("shown", CURRENCIES)
def test_the_admin_and_the_dashboard_show_revenue_forgone_in_its_currency(shown):
    curtailment, _ = _curtailed(shown)
    user = UserFactory(is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(codename__in=["view_curtailment", "view_curtailmentvictim"])
    )
    staff = HttpsClient()
    staff.force_login(user)

    listing = _text(staff.get(reverse("admin:marketplace_curtailment_changelist")))
    page = _text(staff.get(reverse("admin:marketplace_curtailment_change", args=[curtailment.pk])))

    assert shown["shown"] in listing
    assert f"Revenue forgone: {shown['shown']}" in page  # the record's total
    assert page.count(shown["shown"]) == 2  # and its one victim's line
    assert shown["wrong"] not in listing + page
    superuser = HttpsClient()
    superuser.force_login(UserFactory(is_staff=True, is_superuser=True))
    dashboard = _text(superuser.get("/staff/"))
    assert shown["shown"] in dashboard
