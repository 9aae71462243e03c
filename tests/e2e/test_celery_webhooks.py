"""Webhook delivery through a real Celery worker on Redis: an event committed in this process is
signed and POSTed by the worker to a real HTTP server, and a failing endpoint's delivery waits
for its retry without holding up another organisation's."""

import json

import pytest
from switchyard.webhooks import verify_signature

from config.celery import app
from marketplace.models import DeliveryStatus, WebhookDelivery
from marketplace.services.api_keys import api_key_create
from marketplace.services.webhooks import webhook_endpoint_create
from tests.factories import OrganizationFactory
from tests.provisioning_support import (  # noqa: F401 (the *_fixture names are fixtures)
    broker_fixture,
    driver_log_fixture,
    wait_for,
    worker_fixture,
)
from tests.webhook_receiver import receiver  # noqa: F401

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.celery_worker]


@pytest.fixture
def webhooks_to_test_queue(broker):
    """This process routes webhook sending to the test's queue, which the worker consumes."""
    previous = app.conf.task_routes
    app.conf.update(task_routes={"marketplace.tasks.webhook_endpoint_send": {"queue": broker}})
    yield
    app.conf.update(task_routes=previous)


def test_a_worker_delivers_signed_events_and_leaves_a_dead_endpoint_to_its_retry(
    worker,
    receiver,  # noqa: F811
    settings,
    webhooks_to_test_queue,  # noqa: F811
):
    settings.WEBHOOK_ALLOW_INSECURE = True
    worker.start(WEBHOOK_ALLOW_INSECURE="1", WEBHOOK_TIMEOUT_SECONDS="2")
    dead_org, live_org = OrganizationFactory(), OrganizationFactory()
    webhook_endpoint_create(organization=dead_org, url="http://127.0.0.1:9/gone", event_types=[])
    _, secret = webhook_endpoint_create(
        organization=live_org, url=receiver.url + "/hook", event_types=[]
    )

    api_key_create(organization=dead_org, name="first", scopes=["read"], created_by=None)
    key, _ = api_key_create(organization=live_org, name="ci", scopes=["read"], created_by=None)

    wait_for(lambda: len(receiver.received) == 1, timeout=20, what="the delivery to arrive")
    (request,) = receiver.received
    event = verify_signature(
        payload=request.body, header=request.headers["Switchyard-Signature"], secret=secret
    )
    assert event["type"] == "api_key.created"
    assert event["data"]["object"]["id"] == key.public_id
    assert json.loads(request.body)["organization"] == live_org.public_id
    wait_for(
        lambda: (
            WebhookDelivery.objects.filter(endpoint__organization=live_org).get().status
            == DeliveryStatus.SUCCEEDED
        ),
        timeout=10,
        what="the live endpoint's delivery to be recorded",
    )
    dead = WebhookDelivery.objects.get(endpoint__organization=dead_org)
    wait_for(
        lambda: WebhookDelivery.objects.get(pk=dead.pk).attempts == 1,
        timeout=10,
        what="the dead endpoint's first attempt",
    )
    dead.refresh_from_db()
    assert dead.status == DeliveryStatus.PENDING and dead.next_attempt_at is not None
    assert "could not connect" in dead.last_error
