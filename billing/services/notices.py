"""Funding notices: recorded for the portal and the admin, logged, and e-mailed to owners."""

import logging

from billing.models import BillingNotice
from marketplace.mail import mail_send_on_commit, portal_link
from marketplace.models import Membership, Organization, Role

__all__ = ["notice_send"]

logger = logging.getLogger(__name__)
# The portal page a notice's e-mail links to: the billing overview unless named here.
_NOTICE_PAGES = {"invoice_past_due": "portal-billing:invoices"}


def notice_send(*, organization: Organization, kind: str, message: str) -> BillingNotice:
    notice = BillingNotice.objects.create(organization=organization, kind=kind, message=message)
    logger.info("billing notice %s for %s: %s", kind, organization.public_id, message)
    recipients = list(
        # A deactivated account has lost its access: it is told nothing more.
        Membership.objects.filter(
            organization=organization, role__in=[Role.OWNER, Role.BILLING], user__is_active=True
        )
        .exclude(user__email="")
        .values_list("user__email", flat=True)
    )
    page = portal_link(_NOTICE_PAGES.get(kind, "portal-billing:overview"))
    body = f"{message}\n\nBilling of {organization.name} in the portal:\n{page}\n"
    mail_send_on_commit(
        subject=f"Switchyard billing: {kind.replace('_', ' ')}", body=body, recipients=recipients
    )
    return notice
