"""Names people read (an organisation's, an API key's) hold no control or formatting
characters: a line break in an organisation's name made every invitation to it unsendable
(the name is in the e-mail's subject), and bidi overrides or invisible characters let a name
read as something it is not."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import re

import pytest
from django.contrib.auth import get_user_model

from marketplace.models import ApiKey, Organization, PendingSignup, Role
from marketplace.services.organizations import invitation_create, organization_create
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    session_client,
)

pytestmark = pytest.mark.django_db

UNPRINTABLE = [
    "Acme\r\nBcc: someone@example.com",  # a line break: the subject could not be sent
    "Acme\tLabs",
    "\u202egro.emca",  # right-to-left override: reads "acme.org"
    "Ac\u200bme",  # zero-width space
    "Acme\u2028Labs",  # line separator
]


@pytest.mark.parametrize("name", UNPRINTABLE)
def test_an_organisation_name_with_control_or_format_characters_is_refused(name):
    user = UserFactory()
    with pytest.raises(Exception) as refused:
        organization_create(name=name, owner=user)
    assert (refused.value.code, refused.value.field) == ("invalid_characters", "name")
    assert not Organization.objects.filter(memberships__user=user).exists()


def test_ordinary_names_in_any_script_are_kept():
    for name in ("Ada Labs", "Zürich Compute AG", "東京ラボ", "مختبر", "O'Neil & Co."):
        assert organization_create(name=f"  {name} ", owner=UserFactory()).name == name


def test_the_portal_refuses_such_a_name_for_a_new_organisation_and_creates_nothing():
    user = UserFactory()
    client = HttpsClient()
    client.force_login(user)
    page = client.get("/organizations/new").content.decode()
    once = re.search(r'name="once" value="([^"]+)"', page).group(1)
    response = client.post("/organizations/new", {"name": UNPRINTABLE[0], "once": once})
    assert response.status_code == 400
    assert "control or formatting characters" in response.content.decode()
    assert not Organization.objects.filter(memberships__user=user).exists()


def test_signing_up_with_such_an_organisation_name_creates_no_account():
    response = HttpsClient().post(
        "/signup",
        {
            "username": "mallory",
            "email": "mallory@example.com",
            "password1": "a-long-passphrase-1",
            "password2": "a-long-passphrase-1",
            "organization": "Evil\nCorp",
        },
    )
    assert response.status_code == 400
    assert "control or formatting characters" in response.content.decode()
    assert not get_user_model().objects.filter(username="mallory").exists()
    assert not PendingSignup.objects.exists()


@pytest.mark.parametrize("name", UNPRINTABLE)
def test_an_api_key_name_with_control_or_format_characters_is_refused(name):
    owner = MembershipFactory(organization=OrganizationFactory(), role=Role.OWNER)
    response = session_client(owner).post(
        "/api/v1/api-keys", {"name": name, "scopes": ["read"]}, format="json"
    )
    assert_error(response, 400, "invalid_characters", "name")
    assert not ApiKey.objects.exists()


def test_an_invitation_to_an_organisation_renamed_with_a_line_break_is_still_sent(
    mailoutbox, django_capture_on_commit_callbacks
):
    """A name edited in the admin does not go through organization_create: the subject is
    made one line rather than the message failing to send."""
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER)
    Organization.objects.filter(pk=org.pk).update(name="Ada\r\nLabs")
    with django_capture_on_commit_callbacks(execute=True):
        invitation_create(actor=owner, email="grace@example.com", role=Role.MEMBER)
    (mail,) = mailoutbox
    assert mail.subject == "Join Ada Labs on Switchyard"
    assert mail.to == ["grace@example.com"]


@pytest.mark.parametrize("name", UNPRINTABLE[:3])
def test_ssh_key_names_and_webhook_descriptions_are_held_to_the_same_rule(name):
    from config.errors import ValidationFailed
    from marketplace.models import SshKey, WebhookEndpoint
    from marketplace.services.ssh_keys import ssh_key_create
    from marketplace.services.webhooks import webhook_endpoint_create

    org = OrganizationFactory()
    with pytest.raises(ValidationFailed) as refused:
        ssh_key_create(organization=org, user=None, name=name, public_key="ssh-ed25519 AAAA x")
    assert (refused.value.code, refused.value.field) == ("invalid_characters", "name")
    with pytest.raises(ValidationFailed) as refused:
        webhook_endpoint_create(
            organization=org,
            url="https://hooks.example.com/x",
            event_types=["reservation.created"],
            description=name,
        )
    assert (refused.value.code, refused.value.field) == ("invalid_characters", "description")
    assert not SshKey.objects.exists() and not WebhookEndpoint.objects.exists()


def test_staff_renaming_an_organisation_in_the_admin_are_held_to_the_rule():
    org = OrganizationFactory(name="Acme")
    staff = UserFactory(username="staff", is_staff=True, is_superuser=True)
    client = HttpsClient()
    client.force_login(staff)
    url = f"/admin/marketplace/organization/{org.pk}/change/"
    form = {
        "name": "Acme\r\nBcc: x@example.com",
        "slug": org.slug,
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
    }

    response = client.post(url, form)

    assert response.status_code == 200  # the form again, with the error
    assert "control or formatting characters" in response.content.decode()
    org.refresh_from_db()
    assert org.name == "Acme"
