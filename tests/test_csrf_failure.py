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
