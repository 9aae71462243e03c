"""Cancelling from the portal applies the refund its confirmation page stated: a page left
open across a boundary of the refund rule (7 days' or 24 hours' notice of a reserved term)
is shown again with the new refund when confirmed, and nothing is cancelled. Without a
browser."""

import re
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from marketplace.models import ReservationStatus
from tests.marketplace.market_helpers import member_client
from tests.marketplace.resale_helpers import market, time_passes

pytestmark = pytest.mark.django_db

H = timedelta(hours=1)


def _fields(page) -> dict:
    """The confirmation form's fields as the browser sends them."""
    html = page.content.decode()
    form = html[html.index('id="cancel"') :]
    return {
        name: value
        for name, value in re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', form)
        if name != "csrfmiddlewaretoken"
    }


def _term_starting_in(delta: timedelta):
    """The resale market's reserved term (1 week, 8 GPUs), moved to start `delta` from now."""
    m = market()
    time_passes(m.term.starts_at - (timezone.now() + delta))
    m.term.refresh_from_db()
    return m


def test_a_confirmation_left_open_past_seven_days_notice_cancels_nothing_and_restates():
    m = _term_starting_in(7 * 24 * H + 10 * 60 * timedelta(seconds=1))
    client = member_client(m.seller, "member")
    path = f"/reservations/{m.term.public_id}/cancel"
    page = client.get(path)
    sent = _fields(page)
    assert 'id="refund">' in page.content.decode() and sent["refund_fraction"] == "1"

    time_passes(20 * timedelta(minutes=1))  # now under 7 days' notice: a 50 % refund
    again = client.post(path, sent)

    assert again.status_code == 409
    html = again.content.decode()
    assert "The refund has changed since that page was shown" in html
    m.term.refresh_from_db()
    assert m.term.status == ReservationStatus.PENDING
    assert m.term.cancellation in (None, {})
    resent = _fields(again)
    assert Decimal(resent["refund_fraction"]) == Decimal("0.5")

    done = client.post(path, resent)

    assert done.status_code == 302
    m.term.refresh_from_db()
    assert m.term.status == ReservationStatus.CANCELLED
    assert m.term.cancellation["refund_fraction"] == "0.5"


def test_a_confirmation_whose_refund_still_holds_cancels_at_once():
    m = _term_starting_in(3 * 24 * H)
    client = member_client(m.seller, "member")
    path = f"/reservations/{m.term.public_id}/cancel"
    sent = _fields(client.get(path))
    assert Decimal(sent["refund_fraction"]) == Decimal("0.5")

    done = client.post(path, sent)

    assert done.status_code == 302
    m.term.refresh_from_db()
    assert m.term.status == ReservationStatus.CANCELLED


def test_the_service_checks_the_refund_shown_under_the_reservations_lock():
    from config.errors import Conflict
    from marketplace.services.reservations import reservation_cancel

    m = _term_starting_in(3 * 24 * H)  # under 7 days' notice: 50 %
    with pytest.raises(Conflict) as refused:
        reservation_cancel(
            reservation=m.term, actor_label="customer", expected_refund_fraction=Decimal("1")
        )
    assert refused.value.code == "refund_changed"
    m.term.refresh_from_db()
    assert m.term.status == ReservationStatus.PENDING and not m.term.cancellation

    done = reservation_cancel(
        reservation=m.term, actor_label="customer", expected_refund_fraction=Decimal("0.5")
    )
    assert done.status == ReservationStatus.CANCELLED
