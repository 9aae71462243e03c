"""python manage.py reconcile_billing — compare our ledger, top-ups and refunds with Stripe.

Prints every difference and exits non-zero if there is any (see billing.services.reconcile);
with Stripe unreachable, or refusing one of its reads, it says so in one line and exits
non-zero.
"""

from django.core.management.base import BaseCommand, CommandError

from billing.services.reconcile import billing_reconcile
from billing.stripe_gateway import (
    PermanentStripeError,
    StripeNotConfigured,
    TransientStripeError,
)


class Command(BaseCommand):
    help = "Compare the billing ledger, top-ups and refunds with Stripe; exit 1 on any difference."

    def handle(self, *args, **options):
        try:
            differences = billing_reconcile()
        except TransientStripeError as exc:
            # One line, not a traceback: whoever runs it (cron, a person) needs the cause.
            reason = _reason(str(exc))
            raise CommandError(f"Stripe is unreachable, nothing was compared: {reason}") from None
        except PermanentStripeError as exc:
            # Stripe answered but refused a read (a key without that permission, an endpoint
            # the account or a test double lacks): the same one line, naming what it said.
            raise CommandError(
                f"Stripe refused a request, nothing was compared: {_reason(str(exc))}"
            ) from None
        except StripeNotConfigured as exc:
            raise CommandError(f"Stripe is not configured: {exc}") from None
        for line in differences:
            self.stdout.write(line)
        if differences:
            raise CommandError(f"{len(differences)} difference(s) between our records and Stripe")
        self.stdout.write(self.style.SUCCESS("Billing matches Stripe."))


def _reason(text: str) -> str:
    """The network error's own words (e.g. "[Errno 111] Connection refused"), on one line."""
    text = " ".join(text.split())
    for marker in ("Failed to establish a new connection:", "Network error:"):
        if marker in text:
            text = text.split(marker, 1)[1].strip(" ()\"'")
            break
    return text[:300] or "no answer"
