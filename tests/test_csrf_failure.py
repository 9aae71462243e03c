"""A form Django refuses for its CSRF token (opened before its visitor last signed in or out,
or sent with cookies off) answers with a page that says nothing was done and what to do,
not Django's bare "CSRF verification failed. Request aborted."."""

import pytest

from marketplace.models import Role, SshKey
from tests.clients import HttpsClient
from tests.factories import MembershipFactory, OrganizationFactory
from tests.marketplace.ssh_key_helpers import ssh_key

pytestmark = pytest.mark.django_db


def _signed_in() -> HttpsClient:
    # As a browser sends a same-origin form over HTTPS: with its Referer.
    client = HttpsClient(
        enforce_csrf_checks=True, HTTP_HOST="testserver", HTTP_REFERER="https://testserver/ssh-keys"
    )
    member = MembershipFactory(organization=OrganizationFactory(), role=Role.OWNER)
    client.force_login(member.user)
    return client


def test_a_form_with_a_stale_token_is_refused_saying_nothing_changed():
    client = _signed_in()
    client.get("/ssh-keys")  # the page sets the CSRF cookie
    response = client.post(
        "/ssh-keys",
        {"name": "laptop", "public_key": ssh_key(), "csrfmiddlewaretoken": "x" * 64},
    )

    assert response.status_code == 403
    page = response.content.decode()
    assert "This form had expired" in page
    assert "before you last signed in or out" in page
    assert "Nothing was saved or changed." in page
    assert "CSRF verification failed" not in page
    assert not SshKey.objects.exists()


def test_a_form_sent_without_cookies_says_cookies_are_needed():
    client = _signed_in()
    client.cookies.pop("csrftoken", None)

    response = client.post("/ssh-keys", {"name": "laptop", "public_key": ssh_key()})

    assert response.status_code == 403
    assert "allow them for this site" in response.content.decode()
    assert not SshKey.objects.exists()


def _form_token(page) -> dict:
    """The CSRF token the page's forms carry, sent as a browser's form would send it."""
    return {"HTTP_X_CSRFTOKEN": str(page.context["csrf_token"])}


def test_a_form_opened_for_one_organisation_is_refused_once_another_tab_switched():
    """Tab 1 shows Ada's SSH keys; tab 2 switches to Bo's; tab 1's form is then refused, not
    saved in Bo's organisation (the one the session now acts for)."""
    client = HttpsClient(
        enforce_csrf_checks=True, HTTP_HOST="testserver", HTTP_REFERER="https://testserver/ssh-keys"
    )
    ada = MembershipFactory(organization=OrganizationFactory(name="Ada"), role=Role.OWNER)
    bo = MembershipFactory(user=ada.user, organization=OrganizationFactory(name="Bo"))
    client.force_login(ada.user)
    tab1 = _form_token(client.get("/ssh-keys"))
    assert client.get("/ssh-keys").context["portal_organization"] == ada.organization

    tab2 = _form_token(client.get("/dashboard"))
    switch = {"organization": bo.organization.public_id}
    assert client.post("/organizations/switch", switch, **tab2).status_code == 302
    response = client.post("/ssh-keys", {"name": "laptop", "public_key": ssh_key()}, **tab1)

    assert response.status_code == 403
    assert "changed the organisation" in response.content.decode()
    assert not SshKey.objects.exists()
    # A page opened after the switch acts for Bo's organisation, as it shows.
    page = client.get("/ssh-keys")
    assert page.context["portal_organization"] == bo.organization
    client.post("/ssh-keys", {"name": "laptop", "public_key": ssh_key()}, **_form_token(page))
    assert list(SshKey.objects.values_list("organization", flat=True)) == [bo.organization_id]
