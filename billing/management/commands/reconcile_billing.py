"""python manage.py reconcile_billing — compare our ledger, top-ups and refunds with Stripe.

Prints every difference and exits non-zero if there is any (see billing.services.reconcile).
"""

from django.core.management.base import BaseCommand, CommandError

from billing.services.reconcile import billing_reconcile


class Command(BaseCommand):
    help = "Compare the billing ledger, top-ups and refunds with Stripe; exit 1 on any difference."

    def handle(self, *args, **options):
        differences = billing_reconcile()
        for line in differences:
            self.stdout.write(line)
        if differences:
            raise CommandError(f"{len(differences)} difference(s) between our records and Stripe")
        self.stdout.write(self.style.SUCCESS("Billing matches Stripe."))
