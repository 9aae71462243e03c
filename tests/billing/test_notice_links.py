"""A billing notice's e-mail links to the portal page it concerns, on SITE_URL."""

import pytest

from billing.services.notices import notice_send
from marketplace.models import Role
from tests.factories import MembershipFactory, OrganizationFactory

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("kind", "page"),
    [
        ("low_balance", "billing/"),
        ("receipt", "billing/"),
        ("invoice_past_due", "billing/invoices"),
    ],
)
def test_a_notice_mail_links_to_its_billing_page_on_the_site_url(
    kind, page, settings, mailoutbox, django_capture_on_commit_callbacks
):
    settings.SITE_URL = "https://example.com/switchyard/"
    org = OrganizationFactory(name="Ada Labs")
    owner = MembershipFactory(organization=org, role=Role.OWNER)

    with django_capture_on_commit_callbacks(execute=True):
        notice_send(organization=org, kind=kind, message="Something about money.")

    (mail,) = mailoutbox
    assert mail.to == [owner.user.email]
    assert mail.body == (
        "Something about money.\n\n"
        f"Billing of Ada Labs in the portal:\nhttps://example.com/switchyard/{page}\n"
    )
