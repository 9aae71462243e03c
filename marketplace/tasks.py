"""Celery tasks of the marketplace. Each takes ids, loads fresh rows and calls a service.

All are idempotent and acknowledged late (config/celery.py): a duplicate delivery, or a
redelivery after a worker died, does no harm. Retries are short countdowns (at most a
minute, far below the broker's visibility timeout); the reservation schedule itself lives
in PostgreSQL (see marketplace.provisioning.scheduler).
"""

import logging
from importlib import import_module

from celery import shared_task
from django.conf import settings
from redis import Redis

from config.api.idempotency import idempotency_records_purge as _idempotency_records_purge
from marketplace.mail import mail_outbox_send, mail_outbox_sweep_task  # noqa: F401 (registered)
from marketplace.provisioning import scheduler, services
from marketplace.services.accounts import email_change_mail_send as _email_change_mail_send
from marketplace.services.events import events_prune as _events_prune
from marketplace.services.gpu_failures import gpu_failures_handle as _gpu_failures_handle
from marketplace.services.organizations import invitation_mail_send as _invitation_mail_send
from marketplace.services.organizations import (
    password_reset_mail_send as _password_reset_mail_send,
)
from marketplace.services.organizations import signup_mail_send as _signup_mail_send
from marketplace.services.organizations import (
    signup_taken_mail_send as _signup_taken_mail_send,
)
from marketplace.services.reliability import reliability_compute as _reliability_compute
from marketplace.services.resale import listings_expire_begun as _listings_expire
from marketplace.services.resale import listings_withdraw_for_ended_terms as _listings_withdraw
from marketplace.services.retention import history_prune as _history_prune
from marketplace.services.webhook_sending import webhook_endpoint_send as _webhook_endpoint_send
from marketplace.services.webhook_sending import webhook_endpoints_due

logger = logging.getLogger(__name__)


@shared_task(bind=True, max_retries=None, name="marketplace.tasks.reservation_provision")
def reservation_provision(self, reservation_id: int) -> str:
    result = services.reservation_provision_step(reservation_id=reservation_id)
    if result.retry_in is not None:
        raise self.retry(countdown=result.retry_in)
    return result.outcome


@shared_task(bind=True, max_retries=None, name="marketplace.tasks.reservation_release")
def reservation_release(self, reservation_id: int) -> str:
    result = services.reservation_release_step(reservation_id=reservation_id)
    if result.retry_in is not None:
        raise self.retry(countdown=result.retry_in)
    return result.outcome


@shared_task(name="marketplace.tasks.reservations_dispatch_due")
def reservations_dispatch_due() -> dict:
    return scheduler.reservations_dispatch_due()


@shared_task(name="marketplace.tasks.reservations_sweep_stuck")
def reservations_sweep_stuck() -> dict:
    return scheduler.reservations_sweep_stuck()


@shared_task(name="marketplace.tasks.reservation_outages_reconcile")
def reservation_outages_reconcile() -> tuple[int, int]:
    return services.reservation_outages_reconcile()


@shared_task(name="marketplace.tasks.gpu_failures_handle")
def gpu_failures_handle() -> dict:
    """Every 30 s and after a GPU fails: move or end the work on failed GPUs (idempotent)."""
    return _gpu_failures_handle()


@shared_task(name="marketplace.tasks.reliability_compute")
def reliability_compute() -> dict:
    """Hourly: every GPU's, node's and site's 30-day reliability (recomputed whole)."""
    return _reliability_compute()


@shared_task(name="marketplace.tasks.idempotency_records_purge")
def idempotency_records_purge() -> int:
    """Hourly: forget Idempotency-Key records past their 24-hour life (claims ignore them)."""
    return _idempotency_records_purge()


@shared_task(name="marketplace.tasks.events_prune")
def events_prune() -> int:
    """Daily: delete events past EVENT_RETENTION_DAYS."""
    return _events_prune()


@shared_task(name="marketplace.tasks.history_prune")
def history_prune() -> dict[str, int]:
    """Daily: provisioning and reservation history of long-finished reservations, in batches
    (docs/retention.md); idempotent."""
    return _history_prune().as_dict()


@shared_task(name="marketplace.tasks.invitation_mail_send")
def invitation_mail_send(invitation_id: int) -> int:
    """E-mail an invitation its link, built here from its id: the token never sits in the
    broker. Run by the mail outbox, which retries it (marketplace.mail)."""
    return _invitation_mail_send(invitation_id=invitation_id)


@shared_task(name="marketplace.tasks.password_reset_mail_send")
def password_reset_mail_send(user_id: int) -> int:
    """E-mail an account its password reset link, built here from its id (the token never
    sits in the broker). Run by the mail outbox, which retries it (marketplace.mail)."""
    return _password_reset_mail_send(user_id=user_id)


@shared_task(name="marketplace.tasks.email_change_mail_send")
def email_change_mail_send(user_id: int, email: str) -> int:
    """E-mail a new address the link that confirms it for the account, built here (the token
    never sits in the broker). Run by the mail outbox, which retries it."""
    return _email_change_mail_send(user_id=user_id, email=email)


@shared_task(name="marketplace.tasks.signup_mail_send")
def signup_mail_send(pending_signup_id: int) -> int:
    """E-mail a pending sign-up the link that finishes it, built here from its id (neither the
    token nor the password's hash sits in the broker). Run by the mail outbox, which retries it."""
    return _signup_mail_send(pending_signup_id=pending_signup_id)


@shared_task(name="marketplace.tasks.signup_taken_mail_send")
def signup_taken_mail_send(user_id: int) -> int:
    """Tell an account that someone tried to sign up with its e-mail address."""
    return _signup_taken_mail_send(user_id=user_id)


@shared_task(name="marketplace.tasks.sessions_clear_expired")
def sessions_clear_expired() -> None:
    """Daily: delete the portal's expired sessions (what `manage.py clearsessions` does)."""
    import_module(settings.SESSION_ENGINE).SessionStore.clear_expired()


@shared_task(name="marketplace.tasks.webhook_endpoint_send")
def webhook_endpoint_send(endpoint_id: int) -> dict:
    """Send one endpoint's due deliveries (queue "webhooks"); queues itself again if it had
    to hand over with work left."""
    result = _webhook_endpoint_send(endpoint_id=endpoint_id)
    if result["more"]:
        webhook_endpoint_send.delay(endpoint_id)
    return result


@shared_task(name="marketplace.tasks.webhooks_sweep")
def webhooks_sweep() -> int:
    """Every 30 s: queue a sender for every endpoint with a due delivery (retries, lost kicks)."""
    due = webhook_endpoints_due()
    for endpoint_id in due:
        webhook_endpoint_send.delay(endpoint_id)
    return len(due)


_counter_client = None


@shared_task(name="marketplace.tasks.noop")
def noop(counter_key: str = "") -> None:
    """Does nothing but count itself: the baseline of bench/bench_provisioning.py."""
    global _counter_client
    if counter_key:
        if _counter_client is None:
            _counter_client = Redis.from_url(settings.REDIS_URL)
        _counter_client.incr(counter_key)


@shared_task(name="marketplace.tasks.resale_listings_withdraw_ended")
def resale_listings_withdraw_ended() -> int:
    return _listings_withdraw()


@shared_task(name="marketplace.tasks.resale_listings_expire_begun")
def resale_listings_expire_begun() -> int:
    return _listings_expire()
