"""The hourly purge of Idempotency-Key records past their life."""

from datetime import timedelta

import pytest
from django.utils import timezone

from config.api.idempotency import KEY_TTL
from config.celery import app
from marketplace.models import IdempotencyRecord
from marketplace.tasks import idempotency_records_purge
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def _record(org, key: str, age: timedelta) -> IdempotencyRecord:
    record = IdempotencyRecord.objects.create(
        organization=org,
        principal="user:1",
        key=key,
        request_hash="0" * 64,
        response_status=201,
        response_body=f'{{"id": "{key}"}}',
    )
    IdempotencyRecord.objects.filter(pk=record.pk).update(created_at=timezone.now() - age)
    return record


def test_it_purges_expired_records_and_keeps_fresh_ones():
    org = OrganizationFactory()
    _record(org, "old", KEY_TTL + timedelta(minutes=1))
    _record(org, "older", KEY_TTL * 3)
    _record(org, "fresh", timedelta(minutes=5))
    _record(org, "nearly-expired", KEY_TTL - timedelta(minutes=1))

    deleted = idempotency_records_purge.apply().get()

    assert deleted == 2
    assert sorted(IdempotencyRecord.objects.values_list("key", flat=True)) == [
        "fresh",
        "nearly-expired",
    ]


def test_the_purge_runs_hourly_from_beat():
    entries = [
        e for e in app.conf.beat_schedule.values() if e["task"] == idempotency_records_purge.name
    ]

    assert entries == [{"task": "marketplace.tasks.idempotency_records_purge", "schedule": 3600.0}]
    assert idempotency_records_purge.name in app.tasks
