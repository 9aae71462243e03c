"""The portal's cancel pages say what cancelling will credit: nothing for tiers charged as used
(nothing was charged ahead), the full rest for a reserved term the platform has not started
past its start allowance (docs/money.md)."""

from datetime import timedelta

import pytest
from django.utils import timezone

from marketplace.models import Reservation, ReservationStatus, Role
from marketplace.services.reservations import reservation_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    member_client,
    tomorrow,
)

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("allow_all_funding")]
S = ReservationStatus


@pytest.fixture
def org():
    make_policy()
    h100 = GpuModelFactory()
    make_nodes(SiteFactory(), h100, 1, gpus=8)
    make_rate(h100, "2.0000")
    return OrganizationFactory()


def _reserve(org, *, start, tier="on_demand", term="none", hours=24):
    return reservation_create(
        organization=org, gpu_model="h100-sxm-80gb", gpu_count=1, starts_at=start,
        ends_at=start + timedelta(hours=hours), tier=tier, term=term,
    )  # fmt: skip


def test_stopping_on_demand_promises_no_refund_and_the_page_after_says_none(org):
    client = member_client(org, Role.MEMBER)
    reservation = _reserve(org, start=tomorrow())
    start = timezone.now() - timedelta(hours=1)
    Reservation.objects.filter(pk=reservation.pk).update(
        status=S.ACTIVE, starts_at=start, ends_at=start + timedelta(hours=24), activated_at=start
    )
    path = f"/reservations/{reservation.public_id}/cancel"

    html = client.get(path).content.decode()
    assert 'id="refund"' not in html and "You get back" not in html
    assert "Nothing is refunded, because nothing was charged ahead" in html
    assert ">Stop now</button>" in html

    done = client.post(path, {"reason": "done", "confirm": "True"}, follow=True).content.decode()
    assert "Stopped. Charged only for the time it ran." in done
    assert "Refund" not in done.split('id="cancellation">')[1].split("</dd>")[0]


def test_the_cancel_page_names_the_plan_in_words_not_its_code(org):
    client = member_client(org, Role.MEMBER)
    reservation = _reserve(org, start=tomorrow(), tier="interruptible")
    path = f"/reservations/{reservation.public_id}/cancel"

    html = client.get(path).content.decode()
    assert "Interruptible: charged only for time used, by the second" in html
    assert "interruptible:" not in html

    client.post(path, {"reason": "", "confirm": "True"})
    reservation.refresh_from_db()
    assert reservation.status == S.CANCELLED
    assert reservation.cancellation["rule"].startswith("Interruptible: charged only")


def test_a_reserved_term_not_started_past_its_allowance_offers_the_full_rest(org, settings):
    settings.PROVISIONING_READINESS_TIMEOUT_SECONDS = 120
    client = member_client(org, Role.MEMBER)
    term = _reserve(org, start=tomorrow(), tier="reserved", term="1w", hours=24 * 7)
    start = (timezone.now() - timedelta(hours=3)).replace(microsecond=0)
    Reservation.objects.filter(pk=term.pk).update(
        status=S.PROVISIONING, starts_at=start, ends_at=start + timedelta(days=7)
    )

    html = client.get(f"/reservations/{term.public_id}/cancel").content.decode()

    assert "the delay is ours, the unused rest is refunded in full" in html
    assert "a fee of" not in html  # nothing is kept
    assert "Cancel, refund 0.00 USD" not in html and "Cancel, refund " in html


@pytest.mark.parametrize(("active", "said"), [(True, "stopped"), (False, "cancelled")])
def test_the_confirmation_sent_twice_does_it_once_and_says_so(org, active, said):
    """A double click on "Stop now" (or a reload of its answer): the second send said "A
    releasing reservation cannot be cancelled." beside the first's "Stopped.", as if it had
    failed. It says it was already done, changes nothing more, and is not an error."""
    client = member_client(org, Role.MEMBER)
    reservation = _reserve(org, start=tomorrow())
    if active:
        start = timezone.now() - timedelta(hours=1)
        Reservation.objects.filter(pk=reservation.pk).update(
            status=S.ACTIVE, starts_at=start, ends_at=start + timedelta(hours=24),
            activated_at=start,
        )  # fmt: skip
    path = f"/reservations/{reservation.public_id}/cancel"
    form = {"reason": "done", "confirm": "True", "refund_fraction": "1"}

    first = client.post(path, form)
    reservation.refresh_from_db()
    done = (reservation.status, reservation.cancellation, reservation.transitions.count())
    again = client.post(path, form, follow=True)
    reservation.refresh_from_db()

    assert first.status_code == 302
    assert done[0] == (S.RELEASING if active else S.CANCELLED)
    at = timezone.datetime.fromisoformat(done[1]["at"])
    html = again.content.decode()
    assert f"Already {said} at {at:%Y-%m-%d %H:%M} UTC; nothing more was done." in html
    assert "cannot be cancelled" not in html
    assert 'class="error"' not in html.split('class="messages"')[1].split("</ul>")[0]
    assert (reservation.status, reservation.cancellation, reservation.transitions.count()) == done
