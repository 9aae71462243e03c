"""config.db.retried_on_deadlock: work PostgreSQL rolled back as a deadlock's victim or for
serialization is done again, in a savepoint, so what the failed attempt wrote is gone; any
other error is not retried. (A real deadlock: tests/marketplace/test_curtailment.py.)"""

import psycopg
import pytest
from django.db import OperationalError, transaction

from config.db import retried_on_deadlock
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def _failure(sqlstate: str) -> OperationalError:
    cause = psycopg.errors.lookup(sqlstate)("simulated")
    error = OperationalError(str(cause))
    error.__cause__ = cause
    return error


@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
def test_a_victims_work_is_rolled_back_and_done_again(sqlstate, django_capture_on_commit_callbacks):
    from marketplace.models import Organization

    calls = []

    @retried_on_deadlock()
    def work():
        calls.append(OrganizationFactory(name=f"attempt {len(calls) + 1}"))
        transaction.on_commit(lambda: None)
        if len(calls) == 1:
            raise _failure(sqlstate)
        return calls[-1]

    with django_capture_on_commit_callbacks() as callbacks:
        done = work()

    assert len(calls) == 2 and done == calls[1]
    assert list(Organization.objects.values_list("name", flat=True)) == ["attempt 2"]
    assert len(callbacks) == 1  # the failed attempt's callback was dropped with it


def test_other_errors_are_not_retried_and_the_last_attempts_error_propagates():
    calls = []

    @retried_on_deadlock(attempts=3)
    def unique_violation():
        calls.append(1)
        raise _failure("23505")

    with pytest.raises(OperationalError):
        unique_violation()
    assert len(calls) == 1

    @retried_on_deadlock(attempts=3)
    def always_deadlocked():
        calls.append(2)
        OrganizationFactory()
        raise _failure("40P01")

    with pytest.raises(OperationalError):
        always_deadlocked()
    assert calls.count(2) == 3
    from marketplace.models import Organization

    assert not Organization.objects.exists()


def test_it_pauses_longer_before_each_attempt_and_not_after_the_last(monkeypatch):
    """The winner has only just been woken: a retry at once could take its row first and
    close the same circle again."""
    import config.db

    pauses, calls = [], []
    monkeypatch.setattr(config.db.time, "sleep", pauses.append)

    @retried_on_deadlock(attempts=3)
    def always_deadlocked():
        calls.append(1)
        raise _failure("40P01")

    with pytest.raises(OperationalError):
        always_deadlocked()

    assert len(calls) == 3 and len(pauses) == 2
    first, second = pauses
    backoff = config.db.RETRY_BACKOFF_SECONDS
    assert backoff <= first <= 2 * backoff and 2 * backoff <= second <= 4 * backoff

    @retried_on_deadlock(attempts=3)
    def unique_violation():
        raise _failure("23505")

    with pytest.raises(OperationalError):
        unique_violation()
    assert len(pauses) == 2  # no pause for an error that is not retried
