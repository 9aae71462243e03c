"""The marketplace's question to whoever handles money: may this organisation commit this spend?

The marketplace knows nothing of billing (dependencies point billing → marketplace). Billing
registers its gate at start-up (billing.apps.BillingConfig.ready); until then, and in a
deployment without billing, the default gate allows everything.

reservation_create calls, inside its transaction and before it writes anything:

    funding_gate().reservation_authorize(organization=org, tier=tier, gpu_count=n,
        price_per_gpu_hour=price, total_amount=total, currency=currency,
        starts_at=starts_at, ends_at=ends_at)

which returns None or raises config.errors.PaymentRequired (HTTP 402) with a clear code
(insufficient_funds, spend_limit_exceeded, account_suspended, no_payment_method).
"""

from datetime import datetime
from decimal import Decimal
from typing import Protocol

from marketplace.models import Organization

__all__ = ["FundingGate", "AllowAllFundingGate", "funding_gate", "funding_gate_register"]


class FundingGate(Protocol):
    def reservation_authorize(
        self,
        *,
        organization: Organization,
        tier: str,
        gpu_count: int,
        price_per_gpu_hour: Decimal,
        total_amount: Decimal,
        currency: str,
        starts_at: datetime,
        ends_at: datetime,
    ) -> None:
        """Return if the organisation may commit this spend; raise PaymentRequired if not."""


class AllowAllFundingGate:
    def reservation_authorize(self, **kwargs) -> None:
        return None


_gate: FundingGate = AllowAllFundingGate()


def funding_gate() -> FundingGate:
    return _gate


def funding_gate_register(gate: FundingGate) -> None:
    global _gate
    _gate = gate
