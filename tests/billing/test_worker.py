"""The whole path with the real parts: a committed top-up → on_commit → Redis → a real Celery
worker process → localstripe → the ledger."""

from decimal import Decimal

import pytest
import redis
from django.conf import settings

from billing.models import BillingAccount, OutboxMessage, TopUp, TopUpStatus
from billing.selectors import balance_minor
from billing.services.accounts import billing_account_get_or_create
from billing.services.topups import top_up_create
from tests.billing.conftest import save_card
from tests.factories import MembershipFactory
from tests.provisioning_support import CeleryWorker, wait_for

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.celery_worker,
    pytest.mark.stripe,
]


@pytest.fixture
def worker(localstripe, tmp_path):
    # This suite's own Redis db (REDIS_URL), emptied of anything earlier tests left queued.
    redis.Redis.from_url(settings.REDIS_URL).flushdb()
    w = CeleryWorker(
        database=settings.DATABASES["default"],
        redis_url=settings.REDIS_URL,
        log_dir=tmp_path,
        env={
            "STRIPE_SECRET_KEY": settings.STRIPE_SECRET_KEY,
            "STRIPE_API_BASE": settings.STRIPE_API_BASE,
        },  # fmt: skip
    )
    yield w.start(concurrency=1)
    w.stop()
    redis.Redis.from_url(settings.REDIS_URL).flushdb()


def test_a_top_up_is_sent_by_the_worker_after_commit_and_credited_once(localstripe, worker):
    org = MembershipFactory(user__password="!").organization
    billing_account_get_or_create(organization=org)
    save_card(localstripe, org)
    BillingAccount.objects.filter(organization=org).update(auto_recharge_enabled=False)

    top_up = top_up_create(organization=org, amount=Decimal("55.00"))  # commits (autocommit)

    wait_for(lambda: TopUp.objects.get(pk=top_up.pk).status != TopUpStatus.PENDING, timeout=30,
             what="the worker to send the top-up")  # fmt: skip
    assert TopUp.objects.get(pk=top_up.pk).status == TopUpStatus.SUCCEEDED
    assert balance_minor(organization=org) == 5500
    assert OutboxMessage.objects.get().attempts == 1
