"""Portal forms sent twice act once, one account per e-mail address, and an ended reservation
shows the GPUs it held at its end."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import secrets
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from inventory import telemetry
from marketplace.models import (
    Membership,
    Organization,
    PendingSignup,
    ResaleListing,
    ReservationStatus,
)
from marketplace.services.gpu_failures import reservation_gpu_failure_handle
from marketplace.services.transitions import reservation_transition
from tests.clients import HttpsClient
from tests.factories import UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    allow_all_funding,
    book_at_market,
    market,
    org,
)
from tests.marketplace.market_helpers import member_client
from tests.marketplace.resale_helpers import market as resale_market
from tests.marketplace.signup_helpers import confirm_path, signup_form, signup_post

pytestmark = pytest.mark.django_db
H = timedelta(hours=1)


def test_a_listing_sent_twice_lists_once():
    m = resale_market()
    seller = member_client(m.seller, "member")
    at = lambda t: t.strftime("%Y-%m-%dT%H:%M")  # noqa: E731
    form = {"resale-once": secrets.token_urlsafe(8), "resale-gpu_count": "4",
            "resale-starts_at": at(m.start + 24 * H), "resale-ends_at": at(m.start + 48 * H),
            "resale-price_per_gpu_hour": "1.5000", "resale-tier": "on_demand"}  # fmt: skip
    url = reverse("portal:reservation-resale", args=[m.term.public_id])
    first, second = seller.post(url, form), seller.post(url, form, follow=True)
    assert first.status_code == 302
    assert "already sent" in second.content.decode()
    assert ResaleListing.objects.count() == 1


def test_an_organisation_sent_twice_is_created_once():
    user = UserFactory()
    client = HttpsClient()
    client.force_login(user)
    form = {"name": "Acme", "once": secrets.token_urlsafe(8)}
    first = client.post("/organizations/new", form)
    assert first.status_code == 302, first.content.decode()[-2000:]
    again = client.post("/organizations/new", form, follow=True)
    assert "already sent" in again.content.decode()
    assert Organization.objects.filter(memberships__user=user).count() == 1
    # A new form (a new key) makes another one, as asked.
    client.post("/organizations/new", {**form, "once": secrets.token_urlsafe(8)})
    assert Membership.objects.filter(user=user).count() == 2


def test_an_e_mail_address_has_one_account(mailoutbox):
    # Signing up with it mails its account a notice and creates nothing (the page answers as
    # for a new address: tests/marketplace/test_portal_signup_confirm.py).
    UserFactory(email="Grace@Example.com")
    response = signup_post(HttpsClient(), **signup_form(username="grace2", organization="Hopper"))
    assert response.status_code == 200
    (notice,) = mailoutbox
    assert notice.to == ["Grace@Example.com"]
    assert not PendingSignup.objects.exists()
    assert not Organization.objects.filter(name="Hopper").exists()
    assert get_user_model().objects.filter(email__iexact="grace@example.com").count() == 1


def test_an_ended_reservation_shows_the_gpus_it_held_at_its_end(market, org):
    r = book_at_market(org, start=timezone.now(), gpus=2, active=True)
    first = r.allocations.order_by("gpu__index").first()
    telemetry.gpu_mark_failed(gpu=first.gpu, actor=None, reason="xid 79")
    assert reservation_gpu_failure_handle(reservation_id=r.pk) == "moved"
    for to in (ReservationStatus.ACTIVE, ReservationStatus.RELEASING, ReservationStatus.COMPLETED):
        r = reservation_transition(reservation=r, to_status=to, cause="t", actor_label="t")

    page = member_client(org, "member").get(f"/reservations/{r.public_id}").content.decode()
    assert "(2 GPUs)" in page and "(3 GPUs)" not in page


@pytest.mark.parametrize(
    "username",
    ["p\u0430ypal", "\u0391dmin", "admin\u200b", "ad\u202emin", "gr\u00e4ce", "a b"],
    ids=["cyrillic-a", "greek-alpha", "zero-width", "rtl-override", "umlaut", "space"],
)
def test_a_user_name_that_could_pass_for_another_is_refused(username):
    UserFactory(username="paypal")
    response = HttpsClient().post("/signup", {
        "username": username, "email": "new@example.com", "organization": "Lookalike",
        "password1": "a-long-passphrase-1", "password2": "a-long-passphrase-1",
    })  # fmt: skip
    assert response.status_code in (200, 400)
    assert not Organization.objects.filter(name="Lookalike").exists()
    assert not get_user_model().objects.filter(email="new@example.com").exists()
    assert not PendingSignup.objects.exists()


def test_a_plain_user_name_signs_up(mailoutbox):
    client = HttpsClient()
    signup_post(client, **signup_form(username="grace.hopper+ops@navy", email="new@example.com"))
    response = client.post(confirm_path(mailoutbox[0]), {"username": "grace.hopper+ops@navy"})
    assert response.status_code == 302, response.content.decode()[-1500:]
    assert get_user_model().objects.get(email="new@example.com").username == (
        "grace.hopper+ops@navy"
    )
