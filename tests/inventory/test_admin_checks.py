"""What staff record in the admin is checked as the rest of the product checks it."""

import pytest
from django.urls import reverse

from inventory.models import Outage, PriceZone
from tests.factories import NodeFactory

pytestmark = pytest.mark.django_db


def _outage_form(node, gpu, started_at="2026-12-01 10:00:00", ended_at=""):
    return {"node": node.pk, "gpu": gpu.pk if gpu else "", "started_at_0": started_at[:10],
            "started_at_1": started_at[11:], "ended_at_0": ended_at[:10],
            "ended_at_1": ended_at[11:], "cause": "hardware_failure", "detail": "fan"}  # fmt: skip


def test_an_outage_names_a_gpu_of_its_own_node_in_years_that_exist(admin_client):
    node, other = NodeFactory(gpus=2), NodeFactory(gpus=2)
    url = reverse("admin:inventory_outage_add")

    elsewhere = admin_client.post(url, _outage_form(node, other.gpus.first()))
    far = admin_client.post(url, _outage_form(node, None, started_at="9999-12-01 10:00:00"))

    assert "This GPU is on another node." in elsewhere.content.decode()
    assert "Pick a date from 2000 to 2099." in far.content.decode()
    assert not Outage.objects.exists()
    ended = _outage_form(node, node.gpus.first(), ended_at="2026-12-01 11:00:00")
    assert admin_client.post(url, ended).status_code == 302
    assert Outage.objects.get().gpu.node == node


def test_a_gpu_down_now_is_marked_failed_not_given_an_open_outage_by_hand(admin_client):
    """An open outage row alone would leave the GPU sold and its customer billed."""
    from inventory.models import GpuHealth

    node = NodeFactory(gpus=2)
    gpu = node.gpus.first()

    response = admin_client.post(reverse("admin:inventory_outage_add"), _outage_form(node, gpu))

    assert response.status_code == 200  # the form again
    assert "Mark selected GPUs failed" in response.content.decode()
    assert not Outage.objects.exists()
    gpu.refresh_from_db()
    assert gpu.health == GpuHealth.OK


def test_a_price_zone_has_an_iana_time_zone(admin_client):
    url = reverse("admin:inventory_pricezone_add")
    form = {"code": "mars-base", "name": "Mars", "currency": "usd", "timezone": "Mars/Base"}

    response = admin_client.post(url, form)

    assert "is not an IANA time zone" in response.content.decode()
    assert not PriceZone.objects.exists()
    assert admin_client.post(url, {**form, "timezone": "America/Chicago"}).status_code == 302


def test_a_price_zones_currency_stays_that_of_its_stored_prices(admin_client):
    """Pricing reads a zone's prices in the zone's currency: switched from EUR to USD in the
    admin, 30.00 EUR per MWh was priced as 30.00 USD."""
    from datetime import timedelta

    from django.utils import timezone

    from inventory.models import ZonePrice

    zone = PriceZone.objects.create(code="nord-no1", name="NO1", currency="eur",
                                    timezone="Europe/Oslo")  # fmt: skip
    url = reverse("admin:inventory_pricezone_change", args=[zone.pk])
    form = {"code": "nord-no1", "name": "NO1", "currency": "usd", "timezone": "Europe/Oslo"}
    assert admin_client.post(url, form).status_code == 302  # no prices yet: it may change
    zone.refresh_from_db()
    assert zone.currency == "usd"
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    ZonePrice.objects.create(zone=zone, starts_at=now, ends_at=now + timedelta(hours=1),
                             price_per_mwh="30.00", currency="usd", source="csv:ops",
                             received_at=now)  # fmt: skip

    refused = admin_client.post(url, {**form, "currency": "eur"})

    assert refused.status_code == 200
    assert (
        "This zone&#x27;s stored prices are in USD: delete them first, or create a zone for "
        "the new currency." in refused.content.decode()
    )
    zone.refresh_from_db()
    assert zone.currency == "usd"
    assert admin_client.post(url, {**form, "name": "Oslo"}).status_code == 302


def test_an_outage_is_a_record_of_what_happened_not_a_lever_on_bills(admin_client, admin_user):
    """Bills and SLA credits are computed from outages: staff record a fault that happened,
    never one in the future, never a heartbeat outage (the sweeper's), and delete none."""
    from datetime import timedelta

    from django.utils import timezone

    node = NodeFactory(gpus=2)
    url = reverse("admin:inventory_outage_add")
    future = (timezone.now() + timedelta(days=30)).strftime("%Y-%m-%d %H:%M:%S")
    ahead = admin_client.post(url, _outage_form(node, None, started_at=future))
    beat = admin_client.post(url, {**_outage_form(node, None), "cause": "heartbeat_missed"})
    assert "not in the future" in ahead.content.decode()
    assert "heartbeat_missed is not one of the available choices" in beat.content.decode()
    assert not Outage.objects.exists()

    assert admin_client.post(url, _outage_form(node, None)).status_code == 302
    outage = Outage.objects.get()
    delete = reverse("admin:inventory_outage_delete", args=[outage.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403
    change = reverse("admin:inventory_outage_change", args=[outage.pk])
    moved = {**_outage_form(node, None, started_at="2026-11-01 10:00:00"), "_save": "Save"}
    admin_client.post(change, moved)
    outage.refresh_from_db()
    assert outage.started_at.day == 1 and outage.started_at.month == 12  # the start stays
