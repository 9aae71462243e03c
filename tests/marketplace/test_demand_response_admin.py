"""Staff set up demand-response sources in the admin: the signing secret, which lets its
holder curtail the source's sites, is long (a short one typed is refused) and shown only to
staff who may change the source."""

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from marketplace.models import DemandResponseSource
from tests.clients import HttpsClient
from tests.factories import SiteFactory, UserFactory

pytestmark = pytest.mark.django_db

SECRET = "drs_" + "k" * 43


def _form(**overrides) -> dict:
    return {"name": "ande", "description": "", "secret": SECRET, "is_active": "on", **overrides}


@pytest.mark.parametrize("secret", ["x", "hunter2", "drs_" + "a" * 27, f"   {'b' * 30}   "])
def test_a_short_secret_is_refused_and_nothing_is_saved(admin_client, secret):
    response = admin_client.post(
        reverse("admin:marketplace_demandresponsesource_add"), _form(secret=secret)
    )

    assert response.status_code == 200
    assert "A signing secret is at least 32 characters" in response.content.decode()
    assert not DemandResponseSource.objects.exists()


def test_the_secret_offered_or_a_long_one_pasted_is_saved(admin_client):
    site = SiteFactory()
    add = reverse("admin:marketplace_demandresponsesource_add")
    offered = admin_client.get(add).context["adminform"].form["secret"].value()

    first = admin_client.post(add, _form(name="ercot-qse", secret=offered, sites=[site.pk]))
    second = admin_client.post(add, _form(name="ande"))

    assert first.status_code == second.status_code == 302
    assert len(offered) >= 32 and offered.startswith("drs_")
    assert dict(DemandResponseSource.objects.values_list("name", "secret")) == {
        "ercot-qse": offered,
        "ande": SECRET,
    }


def test_a_view_only_staff_member_does_not_see_the_secret():
    source = DemandResponseSource.objects.create(name="ande", secret=SECRET)
    url = reverse("admin:marketplace_demandresponsesource_change", args=[source.pk])
    viewer = UserFactory(username="support", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_demandresponsesource"))
    editor = UserFactory(username="grid-desk", is_staff=True)
    editor.user_permissions.set(
        Permission.objects.filter(
            codename__in=["view_demandresponsesource", "change_demandresponsesource"]
        )
    )
    client = HttpsClient()

    client.force_login(viewer)
    seen_by_viewer = client.get(url)
    client.force_login(editor)
    seen_by_editor = client.get(url)

    assert seen_by_viewer.status_code == seen_by_editor.status_code == 200
    assert "ande" in seen_by_viewer.content.decode()
    assert SECRET not in seen_by_viewer.content.decode()
    assert SECRET in seen_by_editor.content.decode()
