"""The portal's webhook pages and the admin's delivery view, without a browser."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest
from django.contrib.auth import get_user_model

from marketplace.models import DeliveryStatus, Role, WebhookDelivery, WebhookEndpoint
from marketplace.services.api_keys import api_key_create
from marketplace.services.webhook_sending import webhook_endpoint_send
from marketplace.services.webhooks import webhook_endpoint_create
from tests.factories import OrganizationFactory
from tests.marketplace.market_helpers import member_client
from tests.webhook_receiver import receiver  # noqa: F401

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def insecure_allowed(settings):
    settings.WEBHOOK_ALLOW_INSECURE = True


@pytest.fixture
def org():
    return OrganizationFactory()


def test_an_admin_adds_an_endpoint_and_sees_its_secret_once(org, receiver):
    client = member_client(org, Role.ADMIN)
    response = client.post(
        "/webhooks",
        {"url": receiver.url + "/h", "event_types": ["reservation.active", "api_key.created"],
         "once": "f1"},
    )  # fmt: skip
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]  # the secret is in it
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.event_types == ["api_key.created", "reservation.active"]
    assert endpoint.secret in response.content.decode()
    # The same form again (a reload of that page): no second endpoint, no secret shown.
    again = client.post("/webhooks", {"url": receiver.url + "/h", "once": "f1"})
    assert again.status_code == 409
    assert WebhookEndpoint.objects.count() == 1 and endpoint.secret not in again.content.decode()
    page = client.get(f"/webhooks/{endpoint.public_id}").content.decode()
    assert endpoint.secret not in page and endpoint.url in page


def test_a_bad_url_is_a_form_error_and_writes_nothing(org, settings):
    settings.WEBHOOK_ALLOW_INSECURE = False
    client = member_client(org, Role.OWNER)
    response = client.post("/webhooks", {"url": "https://127.0.0.1/h", "once": "f1"})
    assert response.status_code == 400
    assert "public address" in response.content.decode()
    assert not WebhookEndpoint.objects.exists()


def test_members_do_not_see_the_webhook_pages(org):
    client = member_client(org, Role.MEMBER)
    assert client.get("/webhooks").status_code == 403
    assert client.post("/webhooks", {"url": "http://127.0.0.1:1/h"}).status_code == 403
    assert not WebhookEndpoint.objects.exists()


def test_deliveries_show_with_their_attempts_and_resend_queues_again(org, receiver):
    endpoint, _ = webhook_endpoint_create(organization=org, url=receiver.url + "/h", event_types=[])
    api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)
    receiver.answer(500, b"nope")
    webhook_endpoint_send(endpoint_id=endpoint.pk)
    client = member_client(org, Role.OWNER)

    page = client.get(f"/webhooks/{endpoint.public_id}").content.decode()
    delivery = WebhookDelivery.objects.get()
    assert "api_key.created" in page and delivery.public_id in page and "500" in page

    receiver.answer(200)
    response = client.post(
        f"/webhooks/{endpoint.public_id}", {"action": "resend", "delivery": delivery.public_id}
    )
    assert response.status_code == 302
    webhook_endpoint_send(endpoint_id=endpoint.pk)
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.SUCCEEDED


def test_another_organisations_endpoint_is_not_found(org, receiver):
    theirs, _ = webhook_endpoint_create(
        organization=OrganizationFactory(), url=receiver.url + "/h", event_types=[]
    )
    client = member_client(org, Role.OWNER)
    assert client.get(f"/webhooks/{theirs.public_id}").status_code == 404
    assert client.post(f"/webhooks/{theirs.public_id}", {"action": "delete"}).status_code == 404
    assert WebhookEndpoint.objects.filter(pk=theirs.pk).exists()


def test_rotate_disable_and_delete_from_the_portal(org, receiver):
    endpoint, old = webhook_endpoint_create(
        organization=org, url=receiver.url + "/h", event_types=[]
    )
    client = member_client(org, Role.OWNER)
    url = f"/webhooks/{endpoint.public_id}"
    page = client.post(url, {"action": "rotate"}).content.decode()
    endpoint.refresh_from_db()
    assert endpoint.secret in page and [s for s, _ in endpoint.previous_secrets_signing()] == [old]
    assert "Replaced secrets also sign" in page
    page = client.post(url, {"action": "rotate", "expire_previous": "1"}).content.decode()
    endpoint.refresh_from_db()
    assert endpoint.secret in page and endpoint.previous_secrets == []
    client.post(url, {"action": "disable"})
    endpoint.refresh_from_db()
    assert endpoint.enabled is False
    client.post(url, {"action": "delete"})
    assert not WebhookEndpoint.objects.exists()


def test_deleting_an_endpoint_asks_first_and_says_what_is_lost(org, receiver):
    """The endpoint page has no one-click Delete: it links to a page that names the endpoint
    and the deliveries not yet made, whose form deletes it."""
    endpoint, _ = webhook_endpoint_create(organization=org, url=receiver.url + "/h", event_types=[])
    other, _ = webhook_endpoint_create(
        organization=OrganizationFactory(), url=receiver.url + "/o", event_types=[]
    )
    api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)
    pending = WebhookDelivery.objects.filter(endpoint=endpoint, status=DeliveryStatus.PENDING)
    client = member_client(org, Role.ADMIN)
    url = f"/webhooks/{endpoint.public_id}"

    page = client.get(url).content.decode()
    asked = client.get(f"{url}/delete")

    assert 'value="delete"' not in page and f'href="{url}/delete"' in page
    assert asked.status_code == 200
    confirm = asked.content.decode()
    assert endpoint.url in confirm and f'action="{url}"' in confirm
    assert f"including {pending.count()} deliver" in confirm
    assert WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()  # asking deletes nothing
    assert client.get(f"/webhooks/{other.public_id}/delete").status_code == 404
    assert member_client(org, Role.MEMBER).get(f"{url}/delete").status_code == 403
    client.post(url, {"action": "delete"})
    assert not WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()


def test_staff_resend_from_the_admin(org, receiver, client):
    endpoint, _ = webhook_endpoint_create(organization=org, url=receiver.url + "/h", event_types=[])
    api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)
    webhook_endpoint_send(endpoint_id=endpoint.pk)
    delivery = WebhookDelivery.objects.get()
    assert delivery.status == DeliveryStatus.SUCCEEDED
    staff = get_user_model().objects.create_superuser("staff", "s@example.com", "pw")
    client.force_login(staff)

    page = client.get(f"/admin/marketplace/webhookdelivery/{delivery.pk}/change/")
    assert page.status_code == 200
    endpoint_page = client.get(f"/admin/marketplace/webhookendpoint/{endpoint.pk}/change/")
    assert endpoint.secret not in endpoint_page.content.decode()
    client.post(
        "/admin/marketplace/webhookdelivery/",
        {"action": "resend", "_selected_action": [delivery.pk]},
    )
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.PENDING
    webhook_endpoint_send(endpoint_id=endpoint.pk)
    assert len(receiver.received) == 2


def test_a_delivery_is_resent_from_its_own_endpoints_page_only(org, receiver):
    from marketplace.models import WebhookDelivery
    from marketplace.services.api_keys import api_key_create

    one, _ = webhook_endpoint_create(organization=org, url=receiver.url + "/a", event_types=[])
    two, _ = webhook_endpoint_create(organization=org, url=receiver.url + "/b", event_types=[])
    api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)
    delivery = WebhookDelivery.objects.get(endpoint=one)
    client = member_client(org, Role.OWNER)
    other_page = client.post(
        f"/webhooks/{two.public_id}", {"action": "resend", "delivery": delivery.public_id}
    )
    assert other_page.status_code == 404
    own_page = client.post(
        f"/webhooks/{one.public_id}", {"action": "resend", "delivery": delivery.public_id}
    )
    assert own_page.status_code == 302
