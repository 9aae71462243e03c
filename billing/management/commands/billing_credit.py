"""python manage.py billing_credit <org-slug> <amount> "<reason>" — a staff credit from the shell.

The same service as the admin's "Issue a credit" (e.g. for demo accounts or support scripts);
--key makes it safe to run again (the same key never credits twice). The audit log names
the shell's user as the actor (`shell:<user>`), as it names staff for the admin's credits.
"""

import getpass
from decimal import Decimal

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from billing.services.accounts import billing_account_get_or_create
from billing.services.credits import credit_issue
from config.errors import ApplicationError
from marketplace.models import Organization
from marketplace.portal.fields import PortalAmountField

# Read as the admin's "Issue a credit" reads it (billing.admin.MoneyForm): ASCII digits with an
# optional point, so "1e3" or "１２" is refused, not credited as 1000 or 12.
_AMOUNT = PortalAmountField(max_digits=12, decimal_places=2, min_value=Decimal("0.01"))


class Command(BaseCommand):
    help = "Credit an organisation's prepaid balance, with a reason."

    def add_arguments(self, parser):
        parser.add_argument("organization", help="slug or public id (org_…)")
        parser.add_argument("amount", help='major units, e.g. "500.00"')
        parser.add_argument("reason")
        parser.add_argument("--key", help="idempotency key: the same key never credits twice")

    def handle(self, *args, organization, amount, reason, key=None, **options):
        org = (
            Organization.objects.filter(slug=organization).first()
            or Organization.objects.filter(public_id=organization).first()
        )
        if org is None:
            raise CommandError(f"No organisation {organization!r}.")
        try:
            value = _AMOUNT.clean(amount)
        except ValidationError as exc:
            raise CommandError(f"Not an amount: {amount!r} ({' '.join(exc.messages)})") from None
        account = billing_account_get_or_create(organization=org)
        try:
            entry = credit_issue(organization=org, amount=value, reason=reason, created_by=None,
                                 currency=account.currency, idempotency_key=key,
                                 actor=f"shell:{getpass.getuser()}")  # fmt: skip
        except ApplicationError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(f"{org.slug}: ledger entry {entry.pk}, {entry.amount_minor} minor units.")
