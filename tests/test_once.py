"""config.once: a form sent twice at once acts once (threads, each on its own connection to
real PostgreSQL: the idempotency records' unique constraint decides, not Python)."""

import threading
from types import SimpleNamespace

import pytest
from django.db import connection

from config.once import once_or_refused
from tests.factories import MembershipFactory

pytestmark = pytest.mark.django_db(transaction=True)


def _send_twice_at_once(organization, request, first_action, second_action):
    """The first send claims and is still running its action when the second arrives."""
    claimed, results = threading.Event(), {}

    def send(name, action):
        try:
            results[name] = once_or_refused(request, organization, "k1", action)
        except RuntimeError as exc:
            results[name] = exc
        finally:
            connection.close()

    def slow_first():
        claimed.set()
        threading.Event().wait(0.5)  # the second send waits on the key meanwhile
        return first_action()

    first = threading.Thread(target=send, args=("first", slow_first))
    first.start()
    assert claimed.wait(10)
    second = threading.Thread(target=send, args=("second", second_action))
    second.start()
    first.join(10)
    second.join(10)
    return results


def test_of_two_sends_at_once_one_acts_and_the_other_is_told_so():
    membership = MembershipFactory()
    request = SimpleNamespace(user=membership.user)
    ran = []

    results = _send_twice_at_once(
        membership.organization, request,
        lambda: ran.append("first") or "done", lambda: ran.append("second") or "done",
    )  # fmt: skip

    assert ran == ["first"]
    assert results == {"first": "done", "second": None}


def test_a_send_whose_action_fails_leaves_the_key_to_the_next():
    membership = MembershipFactory()
    request = SimpleNamespace(user=membership.user)

    def refused():
        raise RuntimeError("refused")

    results = _send_twice_at_once(
        membership.organization, request, refused, lambda: "done"
    )  # fmt: skip

    assert isinstance(results["first"], RuntimeError)
    assert results["second"] == "done"  # the first's claim rolled back with its action
