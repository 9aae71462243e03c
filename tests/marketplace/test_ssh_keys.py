"""Saved SSH keys: the services (create, delete, adding them to a workload) and the selectors."""

import shutil
import subprocess

import pytest

from config.errors import Conflict, NotFound, ValidationFailed
from marketplace.models import SshKey
from marketplace.selectors.ssh_keys import ssh_key_get_for_org, ssh_key_list_for_org
from marketplace.services.ssh_keys import (
    ssh_key_create,
    ssh_key_delete,
    workload_add_saved_ssh_keys,
)
from tests.factories import OrganizationFactory, UserFactory
from tests.marketplace.ssh_key_helpers import expected_fingerprint, key_bytes, ssh_key

pytestmark = pytest.mark.django_db


def test_it_saves_a_valid_key_normalised_with_its_fingerprint():
    org, user = OrganizationFactory(), UserFactory()
    line = ssh_key(body=key_bytes(1))

    saved = ssh_key_create(
        organization=org, user=user, name="  laptop ", public_key=f"  {line}  \n"
    )

    saved.refresh_from_db()
    assert (saved.organization, saved.created_by, saved.name) == (org, user, "laptop")
    assert saved.public_key == line
    assert saved.fingerprint == expected_fingerprint("ssh-ed25519", key_bytes(1))
    assert saved.public_id.startswith("ssh_") and len(saved.public_id) == 24


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs OpenSSH's ssh-keygen")
def test_the_fingerprint_is_the_one_ssh_keygen_prints(tmp_path):
    path = tmp_path / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@host", "-f", str(path)],
        check=True,
    )
    printed = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", f"{path}.pub"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[1]

    saved = ssh_key_create(
        organization=OrganizationFactory(),
        user=None,
        name="real",
        public_key=(tmp_path / "id_ed25519.pub").read_text(),
    )

    assert saved.fingerprint == printed


@pytest.mark.parametrize(
    ("name", "public_key", "code", "field"),
    [
        ("laptop", "ssh-ed25519 not*base64", "invalid_ssh_key", "public_key"),
        ("laptop", "ssh-dss AAAAB3NzaC1kc3MAAACBAP", "invalid_ssh_key", "public_key"),
        ("laptop", ssh_key(body=bytes(31)), "invalid_ssh_key", "public_key"),
        ("laptop", "", "invalid_ssh_key", "public_key"),
        ("   ", ssh_key(), "blank", "name"),
        ("x" * 101, ssh_key(), "max_length", "name"),
    ],
    ids=["bad-base64", "dsa", "short-ed25519", "empty-key", "blank-name", "long-name"],
)
def test_it_refuses_bad_input_and_saves_nothing(name, public_key, code, field):
    with pytest.raises(ValidationFailed) as error:
        ssh_key_create(
            organization=OrganizationFactory(), user=None, name=name, public_key=public_key
        )
    assert (error.value.code, error.value.field) == (code, field)
    assert SshKey.objects.count() == 0


def test_the_same_key_twice_is_a_conflict_even_with_another_comment():
    org = OrganizationFactory()
    first = ssh_key_create(organization=org, user=None, name="laptop", public_key=ssh_key())
    other_comment = ssh_key().replace("dev@laptop", "someone@else")

    with pytest.raises(Conflict) as error:
        ssh_key_create(organization=org, user=None, name="again", public_key=other_comment)

    assert (error.value.status_code, error.value.code) == (409, "ssh_key_exists")
    assert "'laptop'" in error.value.message
    assert list(SshKey.objects.values_list("pk", "name")) == [(first.pk, "laptop")]


def test_two_organisations_may_save_the_same_key():
    a, b = OrganizationFactory(), OrganizationFactory()
    ssh_key_create(organization=a, user=None, name="shared", public_key=ssh_key())
    ssh_key_create(organization=b, user=None, name="shared", public_key=ssh_key())
    assert SshKey.objects.filter(organization=a).count() == 1
    assert SshKey.objects.filter(organization=b).count() == 1


def test_an_organisation_reads_only_its_own_keys():
    a, b = OrganizationFactory(), OrganizationFactory()
    mine = ssh_key_create(organization=a, user=None, name="mine", public_key=ssh_key())
    theirs = ssh_key_create(
        organization=b, user=None, name="theirs", public_key=ssh_key(body=key_bytes(2))
    )

    assert list(ssh_key_list_for_org(organization=a)) == [mine]
    assert ssh_key_get_for_org(organization=a, public_id=mine.public_id) == mine
    with pytest.raises(NotFound) as error:
        ssh_key_get_for_org(organization=a, public_id=theirs.public_id)
    assert error.value.code == "ssh_key_not_found"


def test_delete_removes_only_that_key():
    org = OrganizationFactory()
    gone = ssh_key_create(organization=org, user=None, name="old", public_key=ssh_key())
    kept = ssh_key_create(
        organization=org, user=None, name="new", public_key=ssh_key(body=key_bytes(3))
    )
    ssh_key_delete(ssh_key=gone)
    assert list(SshKey.objects.all()) == [kept]


# --- saved keys into a reservation's workload ----------------------------------------------


def test_saved_keys_follow_the_workloads_own_keys_each_key_once():
    org = OrganizationFactory()
    a = ssh_key_create(organization=org, user=None, name="a", public_key=ssh_key())
    b = ssh_key_create(organization=org, user=None, name="b", public_key=ssh_key(body=key_bytes(4)))
    pasted = ssh_key(body=key_bytes(5))
    # The pasted copy of key a (another comment) is the same key: it is kept, once.
    pasted_a = ssh_key().replace("dev@laptop", "pasted")
    workload = {"image": "ubuntu", "ssh_public_keys": [pasted, pasted_a]}

    result = workload_add_saved_ssh_keys(
        organization=org, workload=workload, ssh_key_ids=[b.public_id, a.public_id, b.public_id]
    )

    assert result == {"image": "ubuntu", "ssh_public_keys": [pasted, pasted_a, b.public_key]}
    assert workload == {"image": "ubuntu", "ssh_public_keys": [pasted, pasted_a]}  # not mutated


def test_without_saved_keys_the_workload_is_unchanged():
    org = OrganizationFactory()
    assert workload_add_saved_ssh_keys(organization=org, workload={}, ssh_key_ids=[]) == {}
    workload = {"ssh_public_keys": [ssh_key()]}
    assert workload_add_saved_ssh_keys(organization=org, workload=workload, ssh_key_ids=[]) == (
        workload
    )


@pytest.mark.parametrize("whose", ["unknown", "another organisation's"])
def test_an_id_that_is_not_the_organisations_saved_key_is_refused(whose):
    org = OrganizationFactory()
    mine = ssh_key_create(organization=org, user=None, name="mine", public_key=ssh_key())
    if whose == "unknown":
        wrong = "ssh_doesnotexist"
    else:
        wrong = ssh_key_create(
            organization=OrganizationFactory(), user=None, name="x", public_key=ssh_key()
        ).public_id

    with pytest.raises(ValidationFailed) as error:
        workload_add_saved_ssh_keys(
            organization=org, workload={}, ssh_key_ids=[mine.public_id, wrong]
        )

    assert (error.value.code, error.value.field) == ("unknown_ssh_key", "ssh_key_ids")
    assert wrong in error.value.message


def test_more_than_sixteen_keys_in_all_is_refused():
    org = OrganizationFactory()
    pasted = [ssh_key(body=key_bytes(100 + i)) for i in range(16)]
    saved = ssh_key_create(organization=org, user=None, name="one more", public_key=ssh_key())
    with pytest.raises(ValidationFailed) as error:
        workload_add_saved_ssh_keys(
            organization=org,
            workload={"ssh_public_keys": pasted},
            ssh_key_ids=[saved.public_id],
        )
    assert (error.value.code, error.value.field) == ("too_many_ssh_keys", "ssh_key_ids")


def test_staff_see_saved_keys_in_the_admin_but_do_not_edit_them(admin_client):
    key = ssh_key_create(
        organization=OrganizationFactory(name="Ada Labs"), user=None, name="laptop",
        public_key=ssh_key(),
    )  # fmt: skip
    listing = admin_client.get("/admin/marketplace/sshkey/")
    assert listing.status_code == 200
    assert key.fingerprint in listing.content.decode()
    assert admin_client.get("/admin/marketplace/sshkey/add/").status_code == 403
    assert admin_client.post(f"/admin/marketplace/sshkey/{key.pk}/delete/").status_code == 403
    assert SshKey.objects.filter(pk=key.pk).exists()


def test_an_organisation_saves_a_bounded_number_of_keys(monkeypatch):
    from marketplace.services import ssh_keys

    monkeypatch.setattr(ssh_keys, "MAX_SAVED_KEYS", 3)
    org = OrganizationFactory()
    for n in range(3):
        ssh_key_create(
            organization=org, user=None, name=f"k{n}", public_key=ssh_key(body=key_bytes(n))
        )

    with pytest.raises(ValidationFailed) as refused:
        ssh_key_create(
            organization=org, user=None, name="k3", public_key=ssh_key(body=key_bytes(3))
        )

    assert (refused.value.status_code, refused.value.code) == (400, "too_many_ssh_keys_saved")
    assert SshKey.objects.filter(organization=org).count() == 3
    # Another organisation's keys do not count; one deleted frees its place.
    ssh_key_create(organization=OrganizationFactory(), user=None, name="x", public_key=ssh_key())
    ssh_key_delete(ssh_key=SshKey.objects.filter(organization=org).first())
    ssh_key_create(organization=org, user=None, name="k3", public_key=ssh_key(body=key_bytes(3)))
