"""May an organisation commit a spend, and what happens when a prepaid balance runs out.

Committed part of a new reservation (what the balance must cover before it is accepted):
- reserved tier: the whole term's total (charged up front as a reserved_charge);
- on-demand and interruptible: the first BILLING_ON_DEMAND_COMMIT_HOURS hours (default 1) of
  the reservation, or the whole period if shorter; the rest is drawn down as it is used.
Postpaid organisations need no balance, but are refused new commitments once an invoice of
theirs has been past due (unpaid after a failed payment, overdue or uncollectible) for longer
than BILLING_POSTPAID_PAST_DUE_GRACE, until it is paid. Every organisation with a monthly
spend limit is refused a reservation whose committed part would take this month's charges
over it.

When funds run out (prepaid), the policy is explicit, and every step sends a notice:
1. warning — the balance is below the recharge threshold: notice, and an automatic recharge
   if one is set up (once per drop);
2. grace — the balance is at or below zero while on-demand or interruptible reservations are
   running or booked (otherwise it stays a warning): notice with the deadline, they
   keep running for BILLING_LOW_BALANCE_GRACE and keep accruing usage (the balance goes
   negative; that debt is owed and the next top-up settles it first — nothing runs free);
3. suspended — the grace period is over and the balance is still ≤ 0: notice, running
   on-demand and interruptible reservations are released (billed up to that instant, not
   through the teardown) and not-yet-started ones cancelled through the marketplace's state
   machine; reserved terms, already paid for, keep running.
A top-up that brings the balance back above zero ends grace or suspension.
"""

import logging
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from billing.models import BillingAccount, BillingMode, FundingState, Invoice
from billing.money import from_minor_units, hold_minor_units, to_minor_units
from billing.selectors import (
    billing_currency_for_org,
    invoice_past_due,
    month_start,
    reservations_charged,
    spend_minor,
)
from billing.services.accounts import billing_account_get_or_create
from billing.services.credits import cancellation_settle, resale_window_return_refund
from billing.services.events import balance_event_record
from billing.services.holds import hold_add, holds_charge, holds_release, money_position
from billing.services.notices import notice_send
from billing.services.resale import resale_settled
from billing.services.topups import (
    auto_recharge_check,
    recharge_declined,
    reservation_recharge_amount,
)
from billing.services.usage import reservations_book_now, reserved_extension_charge
from config.celery import task_send
from config.db import model_columns, model_from_row
from config.errors import Conflict, InvalidTransition, PaymentRequired
from marketplace.models import EventType, Organization, Reservation, ReservationStatus, Tier
from marketplace.provisioning.kicks import release_kick
from marketplace.services.transitions import reservation_transition

__all__ = [
    "committed_amount",
    "committed_hold_minor",
    "commitment_authorize",
    "billing_account_lock",
    "BillingFundingGate",
    "funding_state_update",
]

logger = logging.getLogger(__name__)


def committed_amount(
    *,
    tier: str,
    gpu_count: int,
    price_per_gpu_hour: Decimal,
    total_amount: Decimal,
    starts_at: datetime,
    ends_at: datetime,
) -> Decimal:
    if isinstance(price_per_gpu_hour, float) or isinstance(total_amount, float):
        raise TypeError("money must be Decimal, not float")
    if tier == Tier.RESERVED:
        return Decimal(total_amount)
    hours = Decimal(getattr(settings, "BILLING_ON_DEMAND_COMMIT_HOURS", 1))
    period_hours = Decimal(int((ends_at - starts_at).total_seconds())) / 3600
    return Decimal(price_per_gpu_hour) * gpu_count * min(hours, period_hours)


def committed_hold_minor(*, currency: str, **commitment) -> int:
    """What a booking (or an extension, given its extra time and amount) holds, in minor units:
    its committed_amount rounded up to the minor unit (billing.money.hold_minor_units)."""
    return hold_minor_units(committed_amount(**commitment), currency)


# The gate's lock: every money decision for an organisation (a booking, an extension, a
# refund) takes its billing account row first, so they happen one after another. A plain
# statement, because compiling the ORM's query cost more CPU than running it (the create path
# runs it every time).
_LOCK_ACCOUNT_SQL = f"""
SELECT {model_columns(BillingAccount, "a")}
FROM billing_billingaccount a WHERE a.organization_id = %s FOR UPDATE
"""


def billing_account_lock(organization_id: int) -> BillingAccount:
    """The organisation's billing account, locked until the transaction ends (created first,
    in settings.CURRENCY, if it has none): whatever moves its available money takes it."""
    with connection.cursor() as cur:
        cur.execute(_LOCK_ACCOUNT_SQL, [organization_id])
        row = cur.fetchone()
        if row is None:
            billing_account_get_or_create(organization=Organization(pk=organization_id))
            cur.execute(_LOCK_ACCOUNT_SQL, [organization_id])
            row = cur.fetchone()
    return model_from_row(BillingAccount, row)


def _money(amount_minor: int, currency: str) -> str:
    return f"{from_minor_units(amount_minor, currency)} {currency.upper()}"


def _past_due_text(invoice: Invoice) -> str:
    """A past-due invoice as a refusal names it: which, how much is owed, since when, and
    where to pay it."""
    owed = _money(invoice.amount_due_minor - invoice.amount_paid_minor, invoice.currency)
    pay = (
        f"pay it at {invoice.hosted_invoice_url}"
        if invoice.hosted_invoice_url
        else "pay it from the invoice Stripe sent you"
    )
    return (
        f"invoice {invoice.stripe_invoice_id} ({owed} due) has been past due since "
        f"{invoice.payment_failed_at:%Y-%m-%d %H:%M} UTC: {pay}."
    )


def commitment_authorize(
    *,
    organization_id: int,
    commit_minor: int,
    currency: str,
    what: str = "reservation",
    auto_recharge: bool = True,
) -> None:
    """Lock the organisation's billing account (until the transaction ends) and check that it
    may commit `commit_minor` more; raise PaymentRequired if not.

    The commitment must be in the account's currency (Conflict `currency_mismatch` if not).
    An account has its currency from the start, money or none: settings.CURRENCY when it is
    created, which the customer (or staff) may change until money moves, under this lock
    (billing.services.accounts.billing_currency_change_check).

    Postpaid: no invoice past due for longer than the grace (402 `invoice_past_due`).
    Prepaid: the balance less open holds must cover it. Every organisation with a monthly spend
    limit: this month's charges, open holds and this must stay within it. The caller holds the
    commitment in the same transaction (hold_add), so the next decision counts it.

    A prepaid refusal that an automatic recharge could fund says how much it would charge;
    with `auto_recharge` it starts it (the API), without it asks first (the portal).
    """
    account = billing_account_lock(organization_id)
    if currency.lower() != account.currency.lower():
        # One currency per account: a commitment in another would hold and charge its minor
        # units against this balance as if they were the account's.
        raise Conflict(
            f"This {what} is priced in {currency.upper()}, but this organisation is billed in "
            f"{account.currency.upper()}: book at a price in {account.currency.upper()}.",
            code="currency_mismatch",
        )
    if account.funding_state == FundingState.SUSPENDED:
        raise PaymentRequired(
            "Billing is suspended for this organisation: top up to reserve or extend again.",
            code="account_suspended",
        )
    if account.mode == BillingMode.POSTPAID:
        # Invoiced later, so no balance to check: an invoice left unpaid past the grace is.
        overdue = invoice_past_due(organization_id=organization_id, past_grace=True)
        if overdue is not None:
            raise PaymentRequired(
                f"This {what} is refused: {_past_due_text(overdue)} New reservations "
                "and extensions are accepted again once it is paid (running ones keep "
                "running).",
                code="invoice_past_due",
            )
    # After the lock, in a statement of its own: a snapshot taken now sees every hold that
    # the decisions before this one committed.
    position = money_position(organization_id=organization_id, fold=True)
    balance, held = position.balance, position.accrued + position.held
    if account.monthly_spend_limit_minor is not None:
        spent = spend_minor(
            organization=Organization(pk=organization_id), since=month_start(timezone.now())
        )
        if spent + held + commit_minor > account.monthly_spend_limit_minor:
            raise PaymentRequired(
                f"This {what} would take this month's spend over the limit of "
                f"{_money(account.monthly_spend_limit_minor, currency)} (charged "
                f"{_money(spent, currency)}, accrued and held for bookings "
                f"{_money(held, currency)}, "
                f"this needs {_money(commit_minor, currency)}).",
                code="spend_limit_exceeded",
            )
    if account.mode == BillingMode.POSTPAID:
        return
    available = balance - held
    if available >= commit_minor:
        return
    message = (
        f"The balance ({_money(balance, currency)}, of which {_money(held, currency)} is used "
        f"or held for bookings) does not cover this {what}'s committed part "
        f"({_money(commit_minor, currency)})"
    )
    shortfall = commit_minor - available
    recharge_minor = reservation_recharge_amount(account=account, shortfall_minor=shortfall)
    if recharge_minor is None:
        if account.auto_recharge_enabled and (declined := recharge_declined(account=account)):
            raise PaymentRequired(
                f"{message}: the last charge to your saved card failed "
                f"({declined.failure_reason.rstrip('.') or 'declined'}), so no automatic "
                "recharge is started on it; top up or save another card, and try again.",
                code="insufficient_funds",
            )
        raise PaymentRequired(f"{message}: top up and try again.", code="insufficient_funds")
    recharge = {"amount": str(from_minor_units(recharge_minor, currency)), "currency": currency}
    if not auto_recharge:
        raise PaymentRequired(
            f"{message}: automatic recharge would charge {_money(recharge_minor, currency)} "
            "to your saved card; confirm to charge it.",
            code="insufficient_funds",
            recharge={**recharge, "status": "confirm"},
        )
    if not _recharge_kick(account, commit_minor, recharge_minor):
        raise PaymentRequired(f"{message}: top up and try again.", code="insufficient_funds")
    raise PaymentRequired(
        f"{message}: an automatic recharge of {_money(recharge_minor, currency)} to your saved "
        "card has started; try again in a minute.",
        code="insufficient_funds",
        recharge={**recharge, "status": "started"},
    )


class BillingFundingGate:
    """Billing's implementation of marketplace.funding.FundingGate."""

    def reservation_authorize(
        self, *, reservation: Reservation, auto_recharge: bool = True
    ) -> None:
        commit_minor = committed_hold_minor(
            currency=reservation.currency,
            tier=reservation.tier,
            gpu_count=reservation.gpu_count,
            price_per_gpu_hour=reservation.price_per_gpu_hour,
            total_amount=reservation.total_amount,
            starts_at=reservation.starts_at,
            ends_at=reservation.ends_at,
        )
        commitment_authorize(
            organization_id=reservation.organization_id,
            commit_minor=commit_minor,
            currency=reservation.currency,
            auto_recharge=auto_recharge,
        )
        hold_add(
            reservation=reservation,
            amount_minor=commit_minor,
            idempotency_key=f"reservation:{reservation.pk}",
            description="committed part of the reservation",
        )

    def extension_authorize(
        self,
        *,
        reservation: Reservation,
        old_ends_at: datetime,
        old_total: Decimal,
        auto_recharge: bool = True,
    ) -> None:
        """The extra time of an extension, just written to `reservation`: the same gate and a
        hold for its committed part; a reserved term's difference is charged at once."""
        currency = reservation.currency
        extra_minor = to_minor_units(reservation.total_amount, currency) - to_minor_units(
            old_total, currency
        )
        commit_minor = committed_hold_minor(
            currency=currency,
            tier=reservation.tier,
            gpu_count=reservation.gpu_count,
            price_per_gpu_hour=reservation.price_per_gpu_hour,
            total_amount=from_minor_units(extra_minor, currency),
            starts_at=old_ends_at,
            ends_at=reservation.ends_at,
        )
        commitment_authorize(
            organization_id=reservation.organization_id,
            commit_minor=commit_minor,
            currency=currency,
            what="extension",
            auto_recharge=auto_recharge,
        )
        end = reservation.ends_at.isoformat()
        hold_add(
            reservation=reservation,
            amount_minor=commit_minor,
            idempotency_key=f"extension:{reservation.pk}:{end}",
            description=f"extension to {end}",
        )
        if reservation.tier == Tier.RESERVED:
            reserved_extension_charge(
                reservation=reservation,
                old_ends_at=old_ends_at,
                old_total=old_total,
                extra_minor=extra_minor,
            )
        elif reservation.activated_at is not None:
            # A line ends at the extension: what was used up to it, at the price it was used.
            reservations_book_now(reservation_ids=[reservation.pk], reason="extended")

    def reservation_ended(self, *, reservation: Reservation) -> None:
        """Cancelled or stopped by the customer: charge what is due up to now (a cancelled
        reserved term: its terms) and release what stays held, in the same transaction."""
        if reservation.tier == Tier.RESERVED:
            cancellation_settle(reservation_id=reservation.pk)
        elif reservation.activated_at is not None:
            reservations_book_now(reservation_ids=[reservation.pk], reason="stopped")
        holds_charge(reservation_ids=[reservation.pk])
        holds_release(reservation_ids=[reservation.pk])

    def reservation_status_changed(
        self, *, reservation: Reservation, from_status: str, to_status: str, at: datetime
    ) -> None:
        """A metered reservation that has run moved (stopped, ended, preempted, failed, moved
        off a failed GPU): its usage up to the move is booked in the move's transaction."""
        if reservation.tier == Tier.RESERVED or reservation.activated_at is None:
            return
        reservations_book_now(
            reservation_ids=[reservation.pk], now=at, reason=f"{from_status} → {to_status}"
        )

    def billing_currency(self, *, organization_id: int) -> str | None:
        return billing_currency_for_org(organization_id=organization_id)

    def reservations_charged(self, *, reservation_ids: list[int]) -> dict[int, Decimal]:
        return reservations_charged(reservation_ids=reservation_ids)

    def resale_settled(self, *, listing_ids: list[int]) -> dict[int, tuple[Decimal, Decimal]]:
        return resale_settled(listing_ids=listing_ids)

    def resale_window_returned(
        self, *, seller: Reservation, listing_id: int, gpu_seconds: int
    ) -> None:
        resale_window_return_refund(seller=seller, listing_id=listing_id, gpu_seconds=gpu_seconds)


def _recharge_kick(account: BillingAccount, needed_minor: int, amount_minor: int) -> bool:
    """Ask for the automatic recharge the refusal states; True if asked.

    The refused booking's transaction rolls back, so the recharge is not written here: a task
    is sent at once (not on commit) and records the top-up in its own transaction.
    """
    return task_send(
        "billing.tasks.auto_recharge_for_reservation",
        [account.organization_id, needed_minor, amount_minor],
        about=f"organisation {account.organization_id}",
        then="(the 402 asks for a top-up instead)",
    )


def _set_state(account: BillingAccount, state: str, *, grace_until: datetime | None = None) -> None:
    account.funding_state = state
    account.grace_until = grace_until
    account.funding_state_changed_at = timezone.now()
    account.save(update_fields=["funding_state", "grace_until", "funding_state_changed_at"])


@transaction.atomic
def funding_state_update(*, organization: Organization, now: datetime | None = None) -> str:
    """Move a prepaid account through ok → warning → grace → suspended (and back) by balance."""
    now = now or timezone.now()
    account = BillingAccount.objects.select_for_update().filter(organization=organization).first()
    if account is None or account.mode != BillingMode.PREPAID:
        return FundingState.OK
    # What is left once accrued usage and open holds are counted (money_position).
    balance = money_position(organization_id=organization.pk).available
    money = f"{from_minor_units(balance, account.currency)} {account.currency.upper()}"
    threshold = (
        f"{from_minor_units(account.recharge_threshold_minor, account.currency)} "
        f"{account.currency.upper()}"
    )
    state = account.funding_state
    if balance >= account.recharge_threshold_minor:
        if state != FundingState.OK:
            _set_state(account, FundingState.OK)
            if state in (FundingState.GRACE, FundingState.SUSPENDED):
                notice_send(
                    organization=organization,
                    kind="funding_restored",
                    message=f"Your available balance is {money}; billing is back to normal.",
                )
    elif balance > 0 or (state != FundingState.SUSPENDED and not _running_metered(organization)):
        # Nothing is drawing the balance down: a low (even empty) balance only warns.
        if state != FundingState.WARNING:
            _set_state(account, FundingState.WARNING)
            balance_event_record(organization=organization, type=EventType.BALANCE_LOW)
            notice_send(
                organization=organization,
                kind="low_balance",
                message=f"Your available balance is low: {money}, below your warning "
                f"threshold of {threshold} (what is left once usage not yet charged and what "
                "your bookings hold are counted). Top up or enable automatic recharge to keep "
                "your reservations running.",
            )
    elif state in (FundingState.OK, FundingState.WARNING):
        grace_until = now + settings.BILLING_LOW_BALANCE_GRACE
        _set_state(account, FundingState.GRACE, grace_until=grace_until)
        notice_send(
            organization=organization,
            kind="grace_started",
            message=f"Your available balance is {money}. Running on-demand reservations will be "
            f"released at {grace_until:%Y-%m-%d %H:%M} UTC unless you top up; usage "
            "until then is owed.",
        )
    elif state == FundingState.SUSPENDED:
        _release_unfunded(organization=organization)  # any left over by the last run
    elif state == FundingState.GRACE and account.grace_until and now >= account.grace_until:
        _set_state(account, FundingState.SUSPENDED)
        released = _release_unfunded(organization=organization)
        balance_event_record(organization=organization, type=EventType.FUNDING_SUSPENDED)
        notice_send(
            organization=organization,
            kind="suspended",
            message=f"Your available balance is {money} and the grace period is over: "
            f"{len(released)} reservation(s) released ({', '.join(released) or 'none'}). "
            "Top up to reserve again.",
        )
    auto_recharge_check(organization=organization)
    return account.funding_state


def _running_metered(organization: Organization) -> bool:
    S = ReservationStatus
    return Reservation.objects.filter(
        organization=organization,
        tier__in=[Tier.ON_DEMAND, Tier.INTERRUPTIBLE],
        status__in=[S.PENDING, S.SCHEDULED, S.PROVISIONING, S.ACTIVE],
    ).exists()


def _release_unfunded(*, organization: Organization) -> list[str]:
    S = ReservationStatus
    released = []
    # The account row is locked here; a reservation locked by someone else (an extension,
    # which takes the reservation, then the account) is left for the next run rather than
    # waited for, which could deadlock.
    candidates = (
        Reservation.objects.select_for_update(skip_locked=True)
        .filter(
            organization=organization,
            tier__in=[Tier.ON_DEMAND, Tier.INTERRUPTIBLE],
            status__in=[S.PENDING, S.SCHEDULED, S.PROVISIONING, S.ACTIVE],
        )
        .order_by("pk")
    )
    for reservation in candidates:
        was = reservation.status
        to_status = S.RELEASING if was == S.ACTIVE else S.CANCELLED
        # Released for billing now, as a customer's stop is: the site's teardown (releasing →
        # completed) is not charged to a balance that has run out.
        stopped = {"released_at": timezone.now()} if to_status == S.RELEASING else None
        try:
            reservation_transition(
                reservation=reservation,
                to_status=to_status,
                cause="Prepaid balance exhausted and the grace period is over.",
                actor_label="billing",
                fields=stopped,
            )
        except InvalidTransition:
            continue  # it moved on meanwhile (ended, failed): nothing left to release
        if to_status == S.RELEASING or was == S.PROVISIONING:
            # Stop the workload (or the provisioning under way) now, not at the sweeper's pace.
            release_kick(reservation.pk)
        released.append(reservation.public_id)
    return released
