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


def _verified(source_name: str, secret: str, *, now=None) -> bool:
    import time

    from marketplace.services.demand_response import (
        SignatureRefused,
        demand_response_signature,
        demand_response_verify,
    )

    timestamp, body = str(int(time.time())), b'{"event_id": "e1"}'
    signed = demand_response_signature(secret=secret, timestamp=timestamp, body=body)
    try:
        demand_response_verify(source_name=source_name, timestamp=timestamp,
                               signature=f"sha256={signed}", body=body, now=now)  # fmt: skip
    except SignatureRefused:
        return False
    return True


def test_a_changed_secret_keeps_the_old_one_accepted_for_the_overlap(admin_client, settings):
    """Changing the secret refused the operator's calls at once, mid-event: their systems
    switch over in their own time. For DEMAND_RESPONSE_SECRET_OVERLAP the old one still
    verifies, then it does not."""
    from datetime import timedelta

    from django.utils import timezone

    settings.DEMAND_RESPONSE_SECRET_OVERLAP = timedelta(hours=24)
    source = DemandResponseSource.objects.create(name="ande", secret=SECRET)
    url = reverse("admin:marketplace_demandresponsesource_change", args=[source.pk])
    new = "drs_" + "n" * 43

    assert admin_client.post(url, _form(secret=new)).status_code == 302

    source.refresh_from_db()
    assert (source.secret, source.previous_secret) == (new, SECRET)
    assert _verified("ande", new) and _verified("ande", SECRET)
    later = timezone.now() + timedelta(hours=24, seconds=1)
    assert not _verified("ande", SECRET, now=later)
    # Saved again without a change, the overlap goes on; said to have leaked, it ends.
    assert admin_client.post(url, _form(secret=new, description="x")).status_code == 302
    assert _verified("ande", SECRET)
    leaked = _form(secret=new, end_previous_secret="on")
    assert admin_client.post(url, leaked).status_code == 302
    source.refresh_from_db()
    assert (source.previous_secret, source.previous_secret_until) == ("", None)
    assert not _verified("ande", SECRET) and _verified("ande", new)


def test_a_secret_changed_as_leaked_is_refused_at_once(admin_client):
    source = DemandResponseSource.objects.create(name="ande", secret=SECRET)
    url = reverse("admin:marketplace_demandresponsesource_change", args=[source.pk])

    changed = _form(secret="drs_" + "m" * 43, end_previous_secret="on")
    assert admin_client.post(url, changed).status_code == 302

    assert not _verified("ande", SECRET)
