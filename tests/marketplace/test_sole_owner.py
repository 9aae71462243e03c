"""An organisation always keeps an owner who can act: one whose account is active. Neither a
member leaving or demoted (portal, API) nor staff deactivating, deleting or editing members
(admin) may leave it with none, and two changes at once cannot both get past the rule."""
# ruff: noqa: F811 - pytest fixtures are imported by name and then requested as arguments

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.urls import reverse

from marketplace.models import ApiKey, Membership, Role
from marketplace.services.api_keys import api_key_create
from marketplace.services.organizations import member_remove, user_staff_change_record
from tests.factories import MembershipFactory, OrganizationFactory
from tests.marketplace.api_fixtures import (  # noqa: F401
    assert_error,
    fresh_rate_limits,
    session_client,
)
from tests.marketplace.test_admin_owners import _memberships_form, _user_change_form
from tests.races import run_together

User = get_user_model()


@pytest.mark.django_db
def test_staff_cannot_deactivate_the_only_owner_and_are_told_the_fix(admin_client):
    org = OrganizationFactory(name="Acme")
    sole = MembershipFactory(organization=org, role=Role.OWNER)
    key, _ = api_key_create(organization=org, name="ci", scopes=["read"], created_by=sole.user)
    url = reverse("admin:auth_user_change", args=[sole.user.pk])

    response = admin_client.post(url, _user_change_form(sole.user, is_active=""))

    assert response.status_code == 200  # the form again, with why
    assert (
        f"{sole.user.username} is the only owner of Acme: make another member owner first"
        in response.content.decode()
    )
    sole.user.refresh_from_db()
    assert sole.user.is_active is True
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None

    # With another owner who can act, they may go.
    MembershipFactory(organization=org, role=Role.OWNER)
    assert admin_client.post(url, _user_change_form(sole.user, is_active="")).status_code == 302
    sole.user.refresh_from_db()
    assert sole.user.is_active is False


@pytest.mark.django_db
def test_an_owner_whose_account_is_deactivated_does_not_count(admin_client):
    """With the other owner's account deactivated, the last owner who can act can neither
    leave (API), be demoted (admin page), be deactivated nor be deleted (admin)."""
    org = OrganizationFactory(name="Acme")
    active = MembershipFactory(organization=org, role=Role.OWNER)
    inactive = MembershipFactory(organization=org, role=Role.OWNER, user__is_active=False)

    client = session_client(active)
    assert_error(
        client.delete(f"/api/v1/organization/members/{active.public_id}"), 409, "last_owner"
    )
    assert_error(
        client.patch(
            f"/api/v1/organization/members/{active.public_id}", {"role": "admin"}, format="json"
        ),
        409,
        "last_owner",
    )
    page = reverse("admin:marketplace_organization_change", args=[org.pk])
    rows = [(active, Role.ADMIN, False), (inactive, Role.OWNER, False)]
    response = admin_client.post(page, _memberships_form(org, rows))
    assert "keeps at least one owner with an active account" in response.content.decode()
    user_page = reverse("admin:auth_user_change", args=[active.user.pk])
    response = admin_client.post(user_page, _user_change_form(active.user, is_active=""))
    assert "is the only owner of Acme" in response.content.decode()
    delete = reverse("admin:auth_user_delete", args=[active.user.pk])
    assert admin_client.post(delete, {"post": "yes"}).status_code == 403

    assert Membership.objects.get(pk=active.pk).role == Role.OWNER
    assert User.objects.get(pk=active.user.pk).is_active is True

    # Removing the owner who cannot act is fine: one who can remains.
    assert client.delete(f"/api/v1/organization/members/{inactive.public_id}").status_code == 204


@pytest.mark.django_db(transaction=True)
def test_two_owners_removing_each_other_at_once_leave_one_owner():
    org = OrganizationFactory()
    first = MembershipFactory(organization=org, role=Role.OWNER)
    second = MembershipFactory(organization=org, role=Role.OWNER)

    outcomes = run_together(
        lambda: member_remove(actor=first, membership=second),
        lambda: member_remove(actor=second, membership=first),
    )

    # The one that waited finds its author removed: not both go.
    assert sorted(outcomes) == ["not_a_member", "ok"]
    assert Membership.objects.filter(organization=org, role=Role.OWNER).count() == 1


@pytest.mark.django_db(transaction=True)
def test_an_owner_leaving_while_staff_deactivate_the_other_leaves_one_who_can_act():
    org = OrganizationFactory()
    leaving = MembershipFactory(organization=org, role=Role.OWNER)
    other = MembershipFactory(organization=org, role=Role.OWNER)

    def deactivate_other():
        # As the admin's user page saves it: the account, then the record (one transaction).
        with transaction.atomic():
            User.objects.filter(pk=other.user.pk).update(is_active=False)
            user_staff_change_record(User.objects.get(pk=other.user.pk), change="deactivate")

    outcomes = run_together(
        lambda: member_remove(actor=leaving, membership=leaving), deactivate_other
    )

    assert sorted(outcomes) == ["last_owner", "ok"]
    owners = Membership.objects.filter(organization=org, role=Role.OWNER, user__is_active=True)
    assert owners.count() == 1
