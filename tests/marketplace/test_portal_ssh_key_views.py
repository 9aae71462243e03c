"""The portal's SSH key page without a browser: roles, isolation, nothing written on refusal.

The browser tests (tests/portal/test_portal_ssh_keys.py) drive the same pages end to end.
"""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

from datetime import timedelta

import pytest

from marketplace.models import Allocation, Reservation, Role, SshKey
from marketplace.services.quotes import quote_create
from marketplace.services.ssh_keys import ssh_key_create
from tests.factories import GpuModelFactory, OrganizationFactory, SiteFactory
from tests.marketplace.market_helpers import (  # noqa: F401 - a fixture, requested by name
    allow_all_funding,
    make_nodes,
    make_policy,
    make_rate,
    member_client,
    tomorrow,
)
from tests.marketplace.ssh_key_helpers import key_bytes, ssh_key

pytestmark = pytest.mark.django_db


@pytest.fixture
def market():
    make_policy()
    h100 = GpuModelFactory()
    site = SiteFactory(slug="abilene-1", region="us-central")
    make_nodes(site, h100, 1, gpus=8)
    make_rate(h100, "2.00")
    return site, h100


def quote_for(organization):
    start = tomorrow()
    return quote_create(
        organization=organization,
        gpu_model="h100-sxm-80gb",
        gpu_count=1,
        starts_at=start,
        ends_at=start + timedelta(hours=2),
        tier="on_demand",
    )


@pytest.fixture
def org():
    return OrganizationFactory(name="Ada Labs")


@pytest.fixture
def theirs():
    return ssh_key_create(
        organization=OrganizationFactory(name="Elsewhere"),
        user=None,
        name="their laptop",
        public_key=ssh_key(body=key_bytes(9)),
    )


def test_a_billing_member_sees_the_keys_but_cannot_add_or_delete(org):
    key = ssh_key_create(organization=org, user=None, name="laptop", public_key=ssh_key())
    client = member_client(org, Role.BILLING)

    page = client.get("/ssh-keys")
    assert page.status_code == 200
    html = page.content.decode()
    assert key.fingerprint in html
    assert "Add key" not in html and "Delete…" not in html
    added = client.post("/ssh-keys", {"name": "b", "public_key": ssh_key(body=key_bytes(1))})
    assert added.status_code == 403
    assert client.post(f"/ssh-keys/{key.public_id}/delete").status_code == 403
    assert list(SshKey.objects.values_list("pk", flat=True)) == [key.pk]


def test_a_member_adds_a_key(org):
    client = member_client(org, Role.MEMBER)
    response = client.post("/ssh-keys", {"name": "m", "public_key": ssh_key()})
    assert response.status_code == 302
    assert SshKey.objects.get().organization == org


def test_bad_input_is_shown_on_the_form_and_writes_nothing(org):
    client = member_client(org, Role.OWNER)
    response = client.post("/ssh-keys", {"name": "", "public_key": "ssh-rsa AAAA"})
    assert response.status_code == 400
    errors = response.context["form"].errors
    assert set(errors) == {"name"}  # the form's own check comes first
    response = client.post("/ssh-keys", {"name": "x", "public_key": "ssh-rsa AAAA"})
    assert response.status_code == 400
    assert "not valid base64 key data" in response.context["form"].errors["public_key"][0]
    assert SshKey.objects.count() == 0


def test_another_organisations_key_is_not_found(org, theirs):
    client = member_client(org, Role.OWNER)
    assert client.get(f"/ssh-keys/{theirs.public_id}/delete").status_code == 404
    assert client.post(f"/ssh-keys/{theirs.public_id}/delete").status_code == 404
    assert theirs.fingerprint not in client.get("/ssh-keys").content.decode()
    assert SshKey.objects.filter(pk=theirs.pk).exists()


def test_another_organisations_key_cannot_be_ticked_when_reserving(
    org, theirs, market, allow_all_funding
):
    mine = ssh_key_create(organization=org, user=None, name="mine", public_key=ssh_key())
    client = member_client(org, Role.OWNER)
    quote = quote_for(org)
    page = client.get(f"/quotes/{quote.public_id}").content.decode()
    assert mine.public_id in page and theirs.public_id not in page

    response = client.post(
        f"/quotes/{quote.public_id}",
        {"image": "", "ssh_public_keys": "", "ssh_key_ids": [mine.public_id, theirs.public_id]},
    )

    assert response.status_code == 400
    assert "ssh_key_ids" in response.context["form"].errors
    assert not Reservation.objects.exists() and not Allocation.objects.exists()


def test_with_more_saved_keys_than_a_reservation_takes_none_is_ticked_at_first(
    org, market, allow_all_funding
):
    """All ticked, 17 saved keys made every booking from the quote page a too_many_ssh_keys
    error until the customer unticked some."""
    keys = [
        ssh_key_create(
            organization=org, user=None, name=f"k{n}", public_key=ssh_key(body=key_bytes(n))
        )
        for n in range(17)
    ]
    client = member_client(org, Role.OWNER)
    quote = quote_for(org)

    form = client.get(f"/quotes/{quote.public_id}").context["form"]

    assert form["ssh_key_ids"].initial in (None, [])
    assert "Tick at most 16" in form.fields["ssh_key_ids"].help_text
    assert len(form.fields["ssh_key_ids"].choices) == 17
    picked = client.post(f"/quotes/{quote.public_id}", {"image": "", "ssh_public_keys": "",
                         "ssh_key_ids": [k.public_id for k in keys[:16]]})  # fmt: skip
    assert picked.status_code == 302
    assert len(Reservation.objects.get().workload["ssh_public_keys"]) == 16
