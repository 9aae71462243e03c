"""Invitations by e-mail: create, accept, revoke, and every refusal (the services)."""

import hashlib
import threading
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from config.celery import app as celery_app
from config.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from marketplace.models import Invitation, MailMessage, Membership, Role
from marketplace.services.organizations import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    member_remove,
)
from tests.factories import MembershipFactory, OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def org():
    return OrganizationFactory(name="Ada Labs")


@pytest.fixture
def owner(org):
    return MembershipFactory(organization=org, role=Role.OWNER, user=UserFactory(username="ada"))


def invite(actor, email="grace@example.com", role=Role.MEMBER):
    return invitation_create(actor=actor, email=email, role=role)


def test_an_owner_invites_and_one_email_with_the_link_is_sent_on_commit(
    owner, org, settings, mailoutbox, django_capture_on_commit_callbacks
):
    settings.SITE_URL = "https://switchyard.example.com"
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        invitation, token = invite(owner, email="  Grace@Example.COM ", role=Role.ADMIN)
        assert mailoutbox == []  # nothing leaves before the transaction commits
    assert len(callbacks) == 1
    assert len(mailoutbox) == 1
    mail = mailoutbox[0]
    assert mail.to == ["grace@example.com"]
    assert mail.subject == "Join Ada Labs on Switchyard"
    assert f"https://switchyard.example.com/invitations/{token}\n" in mail.body
    assert "ada invited you to join Ada Labs on Switchyard as admin." in mail.body

    invitation.refresh_from_db()
    assert invitation.public_id.startswith("inv_")
    assert (invitation.organization, invitation.email, invitation.role) == (
        org,
        "grace@example.com",
        "admin",
    )
    assert invitation.invited_by == owner.user
    assert invitation.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert len(token) >= 40
    assert token not in {str(v) for v in Invitation.objects.values().get().values()}
    assert invitation.expires_at - invitation.created_at == pytest.approx(
        timedelta(days=7), abs=timedelta(seconds=1)
    )
    assert invitation.accepted_at is None and invitation.revoked_at is None


def test_the_token_is_not_handed_to_the_broker_only_the_invitations_id(
    owner, settings, mailoutbox, django_capture_on_commit_callbacks, monkeypatch
):
    """What goes through Celery sits in Redis and in its logs: the e-mail's link, with its
    token, is built by the worker from the invitation's id. The broker carries the mail
    outbox's row id, and the row the task's name and the invitation's id."""
    settings.SITE_URL = "https://switchyard.example.com"
    queued = []
    for task in celery_app.tasks.values():
        if task.name.startswith("marketplace."):
            send = task.apply_async

            def record(args=None, kwargs=None, _task=task, _send=send, **options):
                queued.append((_task.name, list(args or []), dict(kwargs or {})))
                return _send(args, kwargs, **options)

            monkeypatch.setattr(task, "apply_async", record)

    with django_capture_on_commit_callbacks(execute=True):
        invitation, token = invite(owner)

    message = MailMessage.objects.get()
    assert queued == [("marketplace.mail.mail_outbox_send", [message.pk], {})]
    assert (message.task, message.args) == (
        "marketplace.tasks.invitation_mail_send",
        [invitation.pk],
    )
    assert token not in repr(queued)
    assert token not in repr(MailMessage.objects.values().get())
    (sent,) = mailoutbox
    assert f"https://switchyard.example.com/invitations/{token}\n" in sent.body
    assert invitation_accept(token=token, user=UserFactory()).role == Role.MEMBER


def test_an_invitation_revoked_before_its_mail_went_out_is_not_sent(
    owner, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        invitation, _ = invite(owner)
    invitation_revoke(actor=owner, invitation=invitation)
    for callback in callbacks:
        callback()
    assert mailoutbox == []


def test_a_rolled_back_invitation_sends_nothing(
    owner, mailoutbox, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(RuntimeError), transaction.atomic():
            invite(owner)
            raise RuntimeError("the caller fails after inviting")
    assert callbacks == []
    assert mailoutbox == []
    assert Invitation.objects.count() == 0


def test_the_ttl_comes_from_settings(owner, settings):
    settings.INVITATION_TTL = timedelta(days=2)
    invitation, _ = invite(owner)
    assert invitation.expires_at - invitation.created_at == pytest.approx(
        timedelta(days=2), abs=timedelta(seconds=1)
    )


def test_an_admin_may_invite_admins_but_not_owners(org, owner, mailoutbox):
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    with pytest.raises(PermissionDenied) as refused:
        invite(admin, role=Role.OWNER)
    assert refused.value.code == "insufficient_role"
    assert Invitation.objects.count() == 0
    invitation, _ = invite(admin, role=Role.ADMIN)
    assert invitation.role == Role.ADMIN


@pytest.mark.parametrize("role", [Role.MEMBER, Role.BILLING])
def test_members_and_billing_cannot_invite(org, owner, role):
    someone = MembershipFactory(organization=org, role=role)
    with pytest.raises(PermissionDenied) as refused:
        invite(someone)
    assert refused.value.code == "insufficient_role"
    assert Invitation.objects.count() == 0


def test_an_unknown_role_and_a_bad_email_are_refused(owner):
    with pytest.raises(ValidationFailed) as refused:
        invite(owner, role="king")
    assert (refused.value.code, refused.value.field) == ("invalid_choice", "role")
    with pytest.raises(ValidationFailed) as refused:
        invite(owner, email="not-an-email")
    assert refused.value.field == "email"
    assert Invitation.objects.count() == 0


def test_inviting_someone_already_a_member_is_refused(org, owner, mailoutbox):
    MembershipFactory(organization=org, role=Role.MEMBER, user=UserFactory(email="bob@example.com"))
    with pytest.raises(Conflict) as refused:
        invite(owner, email="BOB@example.com")
    assert refused.value.code == "already_member"
    assert Invitation.objects.count() == 0
    assert mailoutbox == []


def test_a_second_open_invitation_for_the_same_address_is_refused(owner):
    first, _ = invite(owner)
    with pytest.raises(Conflict) as refused:
        invite(owner, email="GRACE@example.com", role=Role.ADMIN)
    assert refused.value.code == "invitation_exists"
    assert list(Invitation.objects.values_list("pk", "role")) == [(first.pk, "member")]


def test_the_database_itself_refuses_two_open_invitations_for_one_address(owner, org):
    invite(owner)
    duplicate = Invitation(
        organization=org, email="grace@example.com", token_hash="f" * 64,
        expires_at=timezone.now() + timedelta(days=1),
    )  # fmt: skip
    with pytest.raises(IntegrityError), transaction.atomic():
        duplicate.save()
    # Another organisation may invite the same address.
    other = MembershipFactory(role=Role.OWNER)
    assert invite(other)[0].organization == other.organization


def test_after_a_revocation_or_an_expiry_the_address_can_be_invited_again(owner):
    first, _ = invite(owner)
    invitation_revoke(actor=owner, invitation=first)
    second, _ = invite(owner)
    Invitation.objects.filter(pk=second.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    third, _ = invite(owner)
    second.refresh_from_db()
    assert second.revoked_at is not None  # the expired one was closed, not left open
    assert list(Invitation.objects.filter(revoked_at=None).values_list("pk", flat=True)) == [
        third.pk
    ]


def test_accepting_makes_a_membership_with_the_invited_role_whatever_the_users_email(owner, org):
    invitation, token = invite(owner, role=Role.BILLING)
    someone = UserFactory(email="another-address@example.org")
    membership = invitation_accept(token=token, user=someone)
    assert (membership.organization, membership.user, membership.role) == (org, someone, "billing")
    invitation.refresh_from_db()
    assert invitation.accepted_at is not None
    assert invitation.accepted_by == someone


def test_a_used_link_cannot_be_used_again(owner, org):
    _, token = invite(owner)
    invitation_accept(token=token, user=UserFactory())
    latecomer = UserFactory()
    with pytest.raises(Conflict) as refused:
        invitation_accept(token=token, user=latecomer)
    assert refused.value.code == "invitation_used"
    assert not Membership.objects.filter(user=latecomer).exists()


def test_an_expired_link_is_refused(owner):
    invitation, token = invite(owner)
    Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now())
    user = UserFactory()
    with pytest.raises(Conflict) as refused:
        invitation_accept(token=token, user=user)
    assert refused.value.code == "invitation_expired"
    assert not Membership.objects.filter(user=user).exists()
    invitation.refresh_from_db()
    assert invitation.accepted_at is None


def test_a_revoked_link_is_refused(owner):
    invitation, token = invite(owner)
    invitation_revoke(actor=owner, invitation=invitation)
    user = UserFactory()
    with pytest.raises(Conflict) as refused:
        invitation_accept(token=token, user=user)
    assert refused.value.code == "invitation_revoked"
    assert not Membership.objects.filter(user=user).exists()


def test_an_unknown_token_is_not_found(owner):
    invite(owner)
    with pytest.raises(NotFound) as refused:
        invitation_accept(token="not-a-real-token", user=UserFactory())
    assert refused.value.code == "invitation_not_found"
    assert Membership.objects.count() == 1


def test_a_member_accepting_is_refused_and_the_invitation_stays_open(owner, org):
    invitation, token = invite(owner, role=Role.ADMIN)
    bob = MembershipFactory(organization=org, role=Role.MEMBER)
    with pytest.raises(Conflict) as refused:
        invitation_accept(token=token, user=bob.user)
    assert refused.value.code == "already_member"
    bob.refresh_from_db()
    assert bob.role == Role.MEMBER
    invitation.refresh_from_db()
    assert (invitation.accepted_at, invitation.accepted_by) == (None, None)
    # Still usable by someone else.
    assert invitation_accept(token=token, user=UserFactory()).role == Role.ADMIN


def test_revoking_twice_is_harmless_but_a_used_invitation_cannot_be_revoked(owner):
    invitation, _ = invite(owner)
    revoked = invitation_revoke(actor=owner, invitation=invitation)
    assert revoked.revoked_at is not None
    again = invitation_revoke(actor=owner, invitation=invitation)
    assert again.revoked_at == revoked.revoked_at

    used, token = invite(owner, email="other@example.com")
    invitation_accept(token=token, user=UserFactory())
    with pytest.raises(Conflict) as refused:
        invitation_revoke(actor=owner, invitation=used)
    assert refused.value.code == "invitation_used"
    used.refresh_from_db()
    assert used.revoked_at is None


def test_only_managers_revoke_and_admins_not_an_owners_invitation(org, owner):
    for_owner, _ = invite(owner, role=Role.OWNER)
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    member = MembershipFactory(organization=org, role=Role.MEMBER)
    for actor in (admin, member):
        with pytest.raises(PermissionDenied):
            invitation_revoke(actor=actor, invitation=for_owner)
    for_owner.refresh_from_db()
    assert for_owner.revoked_at is None


def test_another_organisations_invitation_cannot_be_revoked(owner):
    invitation, _ = invite(owner)
    intruder = MembershipFactory(role=Role.OWNER)
    with pytest.raises(NotFound):
        invitation_revoke(actor=intruder, invitation=invitation)
    invitation.refresh_from_db()
    assert invitation.revoked_at is None


def test_an_actor_who_has_left_cannot_invite(org, owner):
    admin = MembershipFactory(organization=org, role=Role.ADMIN)
    member_remove(actor=admin, membership=admin)
    with pytest.raises(PermissionDenied) as refused:
        invite(admin)
    assert refused.value.code == "not_a_member"


@pytest.mark.django_db(transaction=True)
def test_two_people_accepting_one_link_at_once_make_one_membership(owner, org):
    """Real connections racing: the row lock lets exactly one acceptance through."""
    _, token = invite(owner)
    users = [UserFactory(), UserFactory()]
    start = threading.Barrier(2)
    outcomes = []

    def accept(user):
        try:
            start.wait(timeout=10)
            invitation_accept(token=token, user=user)
            outcomes.append("joined")
        except Conflict as exc:
            outcomes.append(exc.code)
        finally:
            connection.close()

    threads = [threading.Thread(target=accept, args=(u,)) for u in users]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(outcomes) == ["invitation_used", "joined"]
    assert Membership.objects.filter(organization=org).count() == 2


def test_staff_see_invitations_in_the_admin_but_never_the_token_and_do_not_edit(
    admin_client, owner
):
    invitation, _token = invite(owner)
    listing = admin_client.get("/admin/marketplace/invitation/")
    assert listing.status_code == 200 and "grace@example.com" in listing.content.decode()
    detail = admin_client.get(f"/admin/marketplace/invitation/{invitation.pk}/change/")
    assert detail.status_code == 200
    assert invitation.token_hash not in detail.content.decode()
    assert admin_client.get("/admin/marketplace/invitation/add/").status_code == 403
    response = admin_client.post(f"/admin/marketplace/invitation/{invitation.pk}/delete/")
    assert response.status_code == 403
    assert Invitation.objects.filter(pk=invitation.pk).exists()
