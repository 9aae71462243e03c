"""The marketplace's question to whoever handles money: may this organisation commit this spend?

The marketplace knows nothing of billing (dependencies point billing → marketplace). Billing
registers its gate at start-up (billing.apps.BillingConfig.ready); until then, and in a
deployment without billing, the default gate allows everything.

Money committed is money held (DESIGN invariant 9). Inside the transaction that books or
lengthens a reservation, once the reservation and its GPUs are written, the marketplace asks:

    funding_gate().reservation_authorize(reservation=r)
    funding_gate().extension_authorize(reservation=r, old_ends_at=..., old_total=...)

The gate locks the organisation's money until the transaction ends, checks the commitment
against what is available (or the spend limit) and holds it; it raises
config.errors.PaymentRequired (HTTP 402, codes insufficient_funds, spend_limit_exceeded,
account_suspended), which rolls the whole booking back. When the customer cancels or stops a
reservation, `reservation_ended(reservation=r)` (same transaction) settles it and releases
what it still holds; the gate's owner releases holds of reservations that end otherwise.
Every move out of active or releasing (stop, end, preemption, failure, a move off a failed
GPU) calls `reservation_status_changed(...)` in the move's transaction, so the usage up to it
is booked there.
`billing_currency(organization_id=…)` is the currency its commitments must be in: quotes and
bookings that choose the site offer only that currency's prices.
`reservations_charged(reservation_ids=[…])` is what the API and the portal show as charged;
`resale_settled(listing_ids=[…])` what a seller of resold time has been credited so far.
"""

from datetime import datetime
from decimal import Decimal
from typing import Protocol

from marketplace.models import Reservation

__all__ = ["FundingGate", "AllowAllFundingGate", "funding_gate", "funding_gate_register"]


class FundingGate(Protocol):
    def reservation_authorize(
        self, *, reservation: Reservation, auto_recharge: bool = True
    ) -> None:
        """Hold a reservation's committed part; raise PaymentRequired if it is not funded.

        Without `auto_recharge`, a refusal that an automatic recharge could fund only says
        what it would charge (PaymentRequired.recharge), for the customer to confirm."""

    def extension_authorize(
        self,
        *,
        reservation: Reservation,
        old_ends_at: datetime,
        old_total: Decimal,
        auto_recharge: bool = True,
    ) -> None:
        """Hold (and charge what is due at once for) the extra time just written to
        `reservation` (its new end and total); raise PaymentRequired if it is not funded."""

    def reservation_ended(self, *, reservation: Reservation) -> None:
        """The customer cancelled or stopped `reservation`: settle it and release its holds."""

    def reservation_status_changed(
        self, *, reservation: Reservation, from_status: str, to_status: str, at: datetime
    ) -> None:
        """`reservation` (not a reserved term) just moved out of active or releasing at `at`,
        in the caller's transaction: book what it used up to then."""

    def billing_currency(self, *, organization_id: int) -> str | None:
        """The currency the organisation is billed in (lower case), which every commitment
        must be in; None: any."""

    def reservations_charged(self, *, reservation_ids: list[int]) -> dict[int, Decimal]:
        """What each reservation has been charged so far, in its currency's major units:
        usage and commitments less refunds and credits (absent: nothing)."""

    def resale_settled(self, *, listing_ids: list[int]) -> dict[int, tuple[Decimal, Decimal]]:
        """Per sold resale listing: (proceeds credited to the seller, fees taken) so far, in
        major units (absent: nothing yet)."""

    def resale_window_returned(
        self, *, seller: Reservation, listing_id: int, gpu_seconds: int
    ) -> None:
        """`seller`'s term has ended (cancelled, failed) and was refunded its unused rest less
        the windows it resold; `gpu_seconds` of listing `listing_id`'s window came back unused
        from its buyer, in the caller's transaction: refund them on the same terms, once."""


class AllowAllFundingGate:
    def reservation_authorize(self, **kwargs) -> None:
        return None

    def extension_authorize(self, **kwargs) -> None:
        return None

    def reservation_ended(self, **kwargs) -> None:
        return None

    def reservation_status_changed(self, **kwargs) -> None:
        return None

    def billing_currency(self, **kwargs) -> str | None:
        return None

    def reservations_charged(self, **kwargs) -> dict[int, Decimal]:
        return {}

    def resale_settled(self, **kwargs) -> dict[int, tuple[Decimal, Decimal]]:
        return {}

    def resale_window_returned(self, **kwargs) -> None:
        return None


_gate: FundingGate = AllowAllFundingGate()


def funding_gate() -> FundingGate:
    return _gate


def funding_gate_register(gate: FundingGate) -> None:
    global _gate
    _gate = gate
