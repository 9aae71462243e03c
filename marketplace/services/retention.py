"""Retention of the marketplace's history: what ended long ago goes, in batches.

Per table (docs/retention.md): provisioning attempts, agent jobs and dispatch markers of
reservations that reached a final status are kept PROVISIONING_HISTORY_RETENTION_DAYS (the
30-day reliability figure reads attempts); the allocations and history entries of
reservations that ended more than RESERVATION_HISTORY_RETENTION_DAYS ago are deleted, the
reservation row itself is kept (the ledger, invoices and SLA credits refer to it). A live
reservation's rows are never touched: its attempt numbers and agent jobs drive its work.
Quotes never booked go a day after they expired (a booked quote stays with its reservation);
pending sign-ups (confirmed or not) a day after their link expired; a grid operator's signatures
once their timestamps are stale (a call clears only its own source's, so a source that stopped
calling would keep its last ones for ever); e-mail sent more than MAIL_RETENTION_DAYS ago, and one
that failed MAIL_FAILED_RETENTION_DAYS after its last attempt (staff may send it again until
then); one pending is kept until it is sent.
"""

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from config.retention import delete_in_batches
from marketplace.models import (
    AgentJob,
    Allocation,
    DemandResponseNonce,
    MailMessage,
    MailStatus,
    PendingSignup,
    ProvisioningAttempt,
    ProvisioningDispatch,
    Quote,
    Reservation,
    ReservationTransition,
)
from marketplace.services.transitions import TERMINAL_STATUSES

__all__ = ["HistoryPruned", "history_prune"]

QUOTE_KEPT_AFTER_EXPIRY = timedelta(days=1)
# A day after its link expired, a sign-up link used or not says "unknown" instead.
SIGNUP_KEPT_AFTER_EXPIRY = timedelta(days=1)


@dataclass(frozen=True)
class HistoryPruned:
    provisioning_attempts: int
    agent_jobs: int
    dispatch_markers: int
    allocations: int
    transitions: int
    quotes: int
    pending_signups: int
    demand_response_signatures: int
    sent_mail: int
    failed_mail: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _ended_before(cutoff: datetime):
    """Reservations in a final status, over and untouched since before `cutoff`."""
    return Reservation.objects.filter(
        status__in=TERMINAL_STATUSES, ends_at__lt=cutoff, updated_at__lt=cutoff
    ).values("pk")


def history_prune(*, now: datetime | None = None, batch_size: int | None = None) -> HistoryPruned:
    """Delete the provisioning and reservation history past its window; idempotent."""
    now = now or timezone.now()
    work = now - timedelta(days=settings.PROVISIONING_HISTORY_RETENTION_DAYS)
    ended = _ended_before(work)
    attempts = delete_in_batches(
        ProvisioningAttempt.objects.filter(reservation__in=ended, started_at__lt=work),
        batch_size=batch_size,
    )
    jobs = delete_in_batches(
        AgentJob.objects.filter(reservation__in=ended, created_at__lt=work), batch_size=batch_size
    )
    markers = delete_in_batches(
        ProvisioningDispatch.objects.filter(reservation__in=ended, enqueued_at__lt=work),
        batch_size=batch_size,
    )
    history = now - timedelta(days=settings.RESERVATION_HISTORY_RETENTION_DAYS)
    old = _ended_before(history)
    allocations = delete_in_batches(
        Allocation.objects.filter(reservation__in=old, is_live=False), batch_size=batch_size
    )
    transitions = delete_in_batches(
        ReservationTransition.objects.filter(reservation__in=old, at__lt=history),
        batch_size=batch_size,
    )
    quotes = delete_in_batches(
        Quote.objects.filter(
            expires_at__lt=now - QUOTE_KEPT_AFTER_EXPIRY, reservation__isnull=True
        ),
        batch_size=batch_size,
    )
    signups = delete_in_batches(
        PendingSignup.objects.filter(expires_at__lt=now - SIGNUP_KEPT_AFTER_EXPIRY),
        batch_size=batch_size,
    )
    # As a call clears its own source's (marketplace.services.demand_response._nonce_take).
    signatures = delete_in_batches(
        DemandResponseNonce.objects.filter(
            seen_at__lt=now - 2 * settings.DEMAND_RESPONSE_SIGNATURE_TOLERANCE
        ),
        batch_size=batch_size,
    )
    sent_mail = delete_in_batches(
        MailMessage.objects.filter(
            status=MailStatus.SENT,
            sent_at__lt=now - timedelta(days=settings.MAIL_RETENTION_DAYS),
        ),
        batch_size=batch_size,
    )
    # A failed message's next_attempt_at is its last attempt's (its claim's lease end).
    failed_mail = delete_in_batches(
        MailMessage.objects.filter(
            status=MailStatus.FAILED,
            next_attempt_at__lt=now - timedelta(days=settings.MAIL_FAILED_RETENTION_DAYS),
        ),
        batch_size=batch_size,
    )
    return HistoryPruned(
        attempts,
        jobs,
        markers,
        allocations,
        transitions,
        quotes,
        signups,
        signatures,
        sent_mail,
        failed_mail,
    )
