"""Enqueueing a reservation's provision or release task after commit: a leaf module (it
imports no service), so the services, the agent job queue and the drivers can all wake the
provisioning worker without importing one another. Tasks are sent by name."""

from django.db import transaction

from config.celery import task_send

__all__ = ["PROVISION_TASK", "RELEASE_TASK", "enqueue_now", "provisioning_kick", "release_kick"]

PROVISION_TASK = "marketplace.tasks.reservation_provision"
RELEASE_TASK = "marketplace.tasks.reservation_release"


def enqueue_now(task_name: str, reservation_id: int) -> bool:
    """Send the task to the broker; a broker outage is logged, not raised (the sweeper and
    the dispatcher pick the reservation up from the database later)."""
    return task_send(
        task_name,
        [reservation_id],
        about=f"reservation {reservation_id}",
        then="(the sweeper will retry)",
    )


def provisioning_kick(reservation_id: int) -> None:
    """Provision this reservation as soon as the current transaction commits.

    Call it where a reservation becomes due now (created starting now, or an agent reported);
    it is harmless for one that is not due or already active. Outside a transaction it sends
    at once.
    """
    transaction.on_commit(lambda: enqueue_now(PROVISION_TASK, reservation_id))


def release_kick(reservation_id: int) -> None:
    """Release this reservation (it went to releasing, e.g. cancelled early) after commit."""
    transaction.on_commit(lambda: enqueue_now(RELEASE_TASK, reservation_id))
