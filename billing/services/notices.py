"""Funding notices: recorded for the portal and the admin, logged, and e-mailed to owners."""

import logging

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction

from billing.models import BillingNotice
from marketplace.models import Membership, Organization, Role

__all__ = ["notice_send"]

logger = logging.getLogger(__name__)


def notice_send(*, organization: Organization, kind: str, message: str) -> BillingNotice:
    notice = BillingNotice.objects.create(organization=organization, kind=kind, message=message)
    logger.info("billing notice %s for %s: %s", kind, organization.public_id, message)
    recipients = list(
        Membership.objects.filter(organization=organization, role__in=[Role.OWNER, Role.BILLING])
        .exclude(user__email="")
        .values_list("user__email", flat=True)
    )
    if recipients:
        transaction.on_commit(
            lambda: send_mail(
                f"Switchyard billing: {kind.replace('_', ' ')}",
                message,
                getattr(settings, "DEFAULT_FROM_EMAIL", None),
                recipients,
                fail_silently=True,
            )
        )
    return notice
