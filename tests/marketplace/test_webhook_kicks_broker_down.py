"""A commit that creates webhook deliveries kicks each endpoint's sender through the broker. With
the broker unreachable the first failed kick is the last: the sweeper
(marketplace.tasks.webhooks_sweep) sends every endpoint's deliveries, and a Redis that hangs costs
the request one send's timeout, not one per endpoint (up to MAX_ENDPOINTS)."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest

from marketplace.models import DeliveryStatus, WebhookDelivery
from marketplace.services.api_keys import api_key_create
from marketplace.services.webhooks import webhook_endpoint_create
from tests.marketplace.api_fixtures import org  # noqa: F401
from tests.provisioning_support import broker_url_for_this_process
from tests.webhook_receiver import receiver  # noqa: F401

pytestmark = pytest.mark.django_db
CLOSED_PORT_BROKER = "redis://127.0.0.1:1/0"
SEND_TASK = "marketplace.tasks.webhook_endpoint_send"


def test_with_the_broker_down_a_commit_stops_kicking_at_the_first_failure(
    org, receiver, settings, caplog, django_capture_on_commit_callbacks
):
    settings.WEBHOOK_ALLOW_INSECURE = True
    for n in range(3):
        webhook_endpoint_create(organization=org, url=f"{receiver.url}/hook{n}", event_types=[])
    caplog.set_level("WARNING", logger="config.celery")

    with broker_url_for_this_process(CLOSED_PORT_BROKER):
        with django_capture_on_commit_callbacks(execute=True):
            api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)

    refused = [m for m in caplog.messages if m.startswith(f"could not enqueue {SEND_TASK}")]
    assert len(refused) == 1
    pending = WebhookDelivery.objects.filter(
        endpoint__organization=org, status=DeliveryStatus.PENDING
    )
    assert pending.count() == 3  # every endpoint's delivery is kept for the sweeper
