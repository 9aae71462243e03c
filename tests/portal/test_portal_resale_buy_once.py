"""Reserving resold time from its page is done once, however often the form is sent (a double
click on "Reserve", a reload of the answer): the second send books nothing more and says the
time is booked, not that the listing is gone. Without a browser."""

from datetime import timedelta

import pytest
from django.urls import reverse

from marketplace.models import Reservation
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import member_client
from tests.marketplace.resale_helpers import fund, listing, market

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)


def test_the_buy_form_sent_twice_books_the_resold_time_once():
    m = market()
    lst = listing(m, gpus=4)
    buyer = member_client(m.buyer, "member")
    start = m.start + 24 * H
    params = {
        "gpu_count": 2,
        "starts_at": start.isoformat(),
        "ends_at": (start + 6 * H).isoformat(),
    }
    url = reverse("portal:resale-buy", args=[lst.public_id])
    page = buyer.get(url, params)
    once = page.context["form"]["once"].value()
    assert f'name="once" value="{once}"' in page.content.decode()
    sent = {**params, "without_ssh": "on", "once": once}

    first = buyer.post(url, sent)
    second = buyer.post(url, sent, follow=True)

    assert first.status_code == 302
    assert second.status_code == 200
    assert "the resold time was booked once" in second.content.decode()
    bought = Reservation.objects.get(organization=m.buyer)
    assert first["Location"] == reverse("portal:reservation", args=[bought.public_id])


def test_a_booking_refused_for_money_leaves_the_form_usable_again():
    m = market()
    lst = listing(m, gpus=4)
    poor = OrganizationFactory()  # nothing on its balance yet
    buyer = member_client(poor, "member")
    start = m.start + 24 * H
    params = {
        "gpu_count": 2,
        "starts_at": start.isoformat(),
        "ends_at": (start + 6 * H).isoformat(),
    }
    url = reverse("portal:resale-buy", args=[lst.public_id])
    sent = {**params, "without_ssh": "on"}
    sent["once"] = buyer.get(url, params).context["form"]["once"].value()

    refused = buyer.post(url, sent)
    assert refused.status_code == 402
    assert not Reservation.objects.filter(organization=poor).exists()
    fund(poor)

    booked = buyer.post(url, sent)

    assert booked.status_code == 302
    assert Reservation.objects.filter(organization=poor).count() == 1
