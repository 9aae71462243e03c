"""Staff keep the portal's rules on members: an organisation keeps an owner, and a member
removed in the admin leaves with their API keys, as in the portal."""

import pytest
from django.urls import reverse

from marketplace.models import ApiKey, Membership, Role
from marketplace.services.api_keys import api_key_create
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


def _memberships_form(org, rows) -> dict:
    """The organisation's change form with its membership rows as given: (membership, role,
    delete)."""
    form = {"name": org.name, "slug": org.slug, "memberships-TOTAL_FORMS": len(rows),
            "memberships-INITIAL_FORMS": len(rows), "memberships-MIN_NUM_FORMS": 0,
            "memberships-MAX_NUM_FORMS": 1000}  # fmt: skip
    for i, (membership, role, delete) in enumerate(rows):
        form |= {f"memberships-{i}-id": membership.pk, f"memberships-{i}-organization": org.pk,
                 f"memberships-{i}-user": membership.user_id, f"memberships-{i}-role": role}  # fmt: skip
        if delete:
            form[f"memberships-{i}-DELETE"] = "on"
    return form


def test_the_admin_cannot_leave_an_organisation_without_an_owner(admin_client):
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER)
    member = MembershipFactory(organization=org, role=Role.MEMBER)
    url = reverse("admin:marketplace_organization_change", args=[org.pk])

    for rows in (
        [(owner, Role.MEMBER, False), (member, Role.MEMBER, False)],  # demoted
        [(owner, Role.OWNER, True), (member, Role.MEMBER, False)],  # removed
    ):
        response = admin_client.post(url, _memberships_form(org, rows))
        assert response.status_code == 200  # the form again
        assert "keeps at least one owner" in response.content.decode()
    assert Membership.objects.get(pk=owner.pk).role == Role.OWNER

    # Another owner first: then the first may go, and their keys go with them.
    _, secret = api_key_create(organization=org, name="ci", scopes=["read"], created_by=owner.user)
    rows = [(owner, Role.OWNER, True), (member, Role.OWNER, False)]
    assert admin_client.post(url, _memberships_form(org, rows)).status_code == 302
    assert not Membership.objects.filter(pk=owner.pk).exists()
    assert ApiKey.objects.get(organization=org).revoked_at is not None


def test_the_only_owner_of_an_organisation_is_not_deleted(admin_client):
    org = OrganizationFactory()
    sole = MembershipFactory(organization=org, role=Role.OWNER).user
    other = UserFactory()

    assert admin_client.get(reverse("admin:auth_user_delete", args=[sole.pk])).status_code == 403
    changelist = reverse("admin:auth_user_changelist")
    bulk = {"action": "delete_selected", "_selected_action": [sole.pk, other.pk], "post": "yes"}
    assert admin_client.post(changelist, bulk).status_code == 403  # not even with others
    assert type(sole).objects.filter(pk__in=[sole.pk, other.pk]).count() == 2
    bulk["_selected_action"] = [other.pk]
    assert admin_client.post(changelist, bulk).status_code == 302
    assert not type(other).objects.filter(pk=other.pk).exists()


def test_a_role_staff_lower_keeps_only_the_keys_that_role_could_make(admin_client):
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER)
    other = MembershipFactory(organization=org, role=Role.OWNER)
    plain, _ = api_key_create(organization=org, name="ci", scopes=["read"], created_by=owner.user)
    pay, _ = api_key_create(organization=org, name="pay", scopes=["billing"], created_by=owner.user)
    url = reverse("admin:marketplace_organization_change", args=[org.pk])

    rows = [(owner, Role.ADMIN, False), (other, Role.OWNER, False)]
    assert admin_client.post(url, _memberships_form(org, rows)).status_code == 302
    assert ApiKey.objects.get(pk=pay.pk).revoked_at is not None
    assert ApiKey.objects.get(pk=plain.pk).revoked_at is None


def test_staff_membership_changes_are_recorded_as_members_own_are(admin_client, admin_user):
    """Events (member.added, member.removed) and audit entries by staff:<name>, as the
    portal's and the API's changes."""
    from marketplace.models import AuditEntry, Event

    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER)
    leaver = MembershipFactory(organization=org, role=Role.MEMBER)
    url = reverse("admin:marketplace_organization_change", args=[org.pk])
    newcomer = UserFactory()
    form = _memberships_form(org, [(owner, Role.OWNER, False), (leaver, Role.MEMBER, True)])
    form |= {"memberships-TOTAL_FORMS": 3, "memberships-2-organization": org.pk,
             "memberships-2-user": newcomer.pk, "memberships-2-role": Role.ADMIN}  # fmt: skip
    assert admin_client.post(url, form).status_code == 302

    joined = Membership.objects.get(organization=org, user=newcomer)
    events = list(Event.objects.filter(organization=org).values_list("type", "object_id"))
    assert ("member.added", joined.public_id) in events
    assert ("member.removed", leaver.public_id) in events
    entries = AuditEntry.objects.filter(organization=org)
    assert {e.action for e in entries} >= {"member.add", "member.remove"}
    assert {e.actor for e in entries} == {f"staff:{admin_user.get_username()}"}


def test_staff_cannot_change_what_a_key_may_do_but_may_revoke_it(admin_client):
    from marketplace.models import AuditEntry

    org = OrganizationFactory()
    key, _ = api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)
    url = reverse("admin:marketplace_apikey_change", args=[key.pk])
    admin_client.post(url, {"name": "x", "scopes": "5", "_save": "Save"})
    key.refresh_from_db()
    assert (key.name, key.scopes) == ("ci", ["read"])

    changelist = reverse("admin:marketplace_apikey_changelist")
    for _ in range(2):
        done = admin_client.post(
            changelist, {"action": "revoke", "_selected_action": [key.pk]}, follow=True
        )
    assert "Revoked 0 key(s)." in done.content.decode()  # the second time: none was live
    assert AuditEntry.objects.filter(action="api_key.revoke", object_id=key.public_id).count() == 1


def test_staff_cannot_hand_a_membership_row_to_another_user(admin_client):
    """Swapping the user on a member's row would remove them unrecorded, with their API keys
    still live: the row's user is fixed (remove the row and add one instead)."""
    org = OrganizationFactory()
    owner = MembershipFactory(organization=org, role=Role.OWNER)
    leaver = MembershipFactory(organization=org, role=Role.ADMIN)
    key, _ = api_key_create(organization=org, name="ci", scopes=["read"], created_by=leaver.user)
    newcomer = UserFactory()
    url = reverse("admin:marketplace_organization_change", args=[org.pk])
    form = _memberships_form(org, [(owner, Role.OWNER, False), (leaver, Role.ADMIN, False)])
    form["memberships-1-user"] = newcomer.pk

    admin_client.post(url, form)

    assert Membership.objects.get(pk=leaver.pk).user == leaver.user
    assert not Membership.objects.filter(organization=org, user=newcomer).exists()
    assert ApiKey.objects.get(pk=key.pk).revoked_at is None  # still a member: still theirs


def _user_change_form(user, **changes) -> dict:
    """The admin's change form for `user`, as it stands, with `changes`."""
    form = {"username": user.username, "email": user.email, "first_name": "", "last_name": "",
            "is_active": "on" if user.is_active else "", "date_joined_0": "2026-01-01",
            "date_joined_1": "00:00:00", "initial-date_joined_0": "2026-01-01",
            "initial-date_joined_1": "00:00:00"}  # fmt: skip
    form.update(changes)
    return {k: v for k, v in form.items() if v != ""}


def test_a_user_staff_deactivate_loses_their_keys_and_invitations_at_once(
    admin_client, admin_user, client
):
    """Django signs the account out; the API keys it made stop working, and its open
    invitations close, in every organisation, each recorded by staff:<name>."""
    from marketplace.models import AuditEntry, Invitation
    from marketplace.services.organizations import invitation_create

    org, other_org = OrganizationFactory(), OrganizationFactory()
    MembershipFactory(organization=org, role=Role.OWNER)
    leaver = MembershipFactory(organization=org, role=Role.ADMIN)
    MembershipFactory(organization=other_org, user=leaver.user, role=Role.OWNER)
    MembershipFactory(organization=other_org, role=Role.OWNER)  # not its only owner
    _, secret = api_key_create(organization=org, name="ci", scopes=["read"], created_by=leaver.user)
    api_key_create(organization=other_org, name="ci", scopes=["read"], created_by=leaver.user)
    invitation, _ = invitation_create(actor=leaver, email="new@example.com", role=Role.MEMBER)
    assert (
        client.get("/api/v1/organization", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200
    )

    url = reverse("admin:auth_user_change", args=[leaver.user.pk])
    assert admin_client.post(url, _user_change_form(leaver.user, is_active="")).status_code == 302

    leaver.user.refresh_from_db()
    assert leaver.user.is_active is False
    assert not ApiKey.objects.filter(created_by=leaver.user, revoked_at__isnull=True).exists()
    refused = client.get("/api/v1/organization", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "api_key_revoked")
    assert Invitation.objects.get(pk=invitation.pk).revoked_at is not None
    assert Membership.objects.filter(user=leaver.user).count() == 2  # listed until removed
    staff = f"staff:{admin_user.get_username()}"
    for o in (org, other_org):
        entries = AuditEntry.objects.filter(organization=o, actor=staff)
        assert {e.action for e in entries} >= {"member.deactivate", "api_key.revoke"}

    # Reactivated: recorded too; what was revoked stays revoked.
    form = _user_change_form(leaver.user, is_active="on")
    assert admin_client.post(url, form).status_code == 302
    assert AuditEntry.objects.filter(organization=org, action="member.reactivate").count() == 1
    assert not ApiKey.objects.filter(created_by=leaver.user, revoked_at__isnull=True).exists()


def test_a_user_staff_delete_is_removed_as_a_member_and_their_keys_stop_working(
    admin_client, admin_user, client
):
    """Deleting the account takes its memberships with it: each is recorded as a removal
    (event, audit entry), and the keys it made are revoked (not left working with no maker)."""
    from marketplace.models import AuditEntry, Event, Invitation
    from marketplace.services.organizations import invitation_create

    org = OrganizationFactory()
    MembershipFactory(organization=org, role=Role.OWNER)
    leaver = MembershipFactory(organization=org, role=Role.ADMIN)
    key, secret = api_key_create(
        organization=org, name="ci", scopes=["read"], created_by=leaver.user
    )
    invitation, _ = invitation_create(actor=leaver, email="new@example.com", role=Role.MEMBER)
    bulk_leaver = MembershipFactory(organization=org, role=Role.ADMIN)
    bulk_key, _ = api_key_create(
        organization=org, name="cd", scopes=["read"], created_by=bulk_leaver.user
    )

    url = reverse("admin:auth_user_delete", args=[leaver.user.pk])
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    changelist = reverse("admin:auth_user_changelist")
    bulk = {"action": "delete_selected", "_selected_action": [bulk_leaver.user.pk], "post": "yes"}
    assert admin_client.post(changelist, bulk).status_code == 302

    assert not Membership.objects.filter(pk__in=[leaver.pk, bulk_leaver.pk]).exists()
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    assert ApiKey.objects.get(pk=bulk_key.pk).revoked_at is not None
    refused = client.get("/api/v1/organization", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert (refused.status_code, refused.json()["error"]["code"]) == (401, "api_key_revoked")
    assert Invitation.objects.get(pk=invitation.pk).revoked_at is not None
    events = set(Event.objects.filter(organization=org).values_list("type", "object_id"))
    assert {
        ("member.removed", leaver.public_id),
        ("member.removed", bulk_leaver.public_id),
    } <= events
    removals = AuditEntry.objects.filter(organization=org, action="member.remove")
    assert {e.object_id for e in removals} == {leaver.public_id, bulk_leaver.public_id}
    assert {e.actor for e in removals} == {f"staff:{admin_user.get_username()}"}


def test_staff_find_a_key_by_its_id_or_by_the_whole_secret_a_customer_pasted(admin_client):
    org = OrganizationFactory()
    key, secret = api_key_create(organization=org, name="ci", scopes=["read"], created_by=None)
    other, _ = api_key_create(organization=org, name="deploy", scopes=["read"], created_by=None)
    changelist = reverse("admin:marketplace_apikey_changelist")

    def found(q: str) -> list:
        response = admin_client.get(changelist, {"q": q})
        assert response.status_code == 200
        return [k.pk for k in response.context["cl"].result_list]

    assert found(key.public_id) == [key.pk]
    assert found(secret) == [key.pk]  # the leaked secret itself
    assert found(f"{key.prefix}…") == [key.pk]  # as the portal and errors write it
    assert found(f"leaked: {secret[:20]}") == [key.pk]
    assert found(key.prefix) == [key.pk]
    assert found("sy_live_zzzzzzzz_nothing") == []
    assert sorted(found(org.public_id)) == sorted([key.pk, other.pk])
