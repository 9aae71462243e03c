"""Organisations, their members, and invitations to join them by e-mail.

Rules: an organisation always keeps at least one owner; owners and admins manage members, but
only an owner may grant, change or remove the owner role. Members join only by accepting an
invitation (checked by the same rules when it is sent): adding an account by its e-mail would
tell the one adding whether the address has an account, and put people in an organisation
without asking them. Staff can still add members in the admin.
"""

import hashlib
import logging
import secrets
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import AbstractBaseUser
from django.contrib.auth.tokens import default_token_generator
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, connection, transaction
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.crypto import salted_hmac
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode
from django.utils.text import slugify

from config.errors import Conflict, Gone, NotFound, PermissionDenied, ValidationFailed
from marketplace import ids
from marketplace.mail import mail_send_on_commit, mail_task_on_commit
from marketplace.models import (
    MANAGER_ROLES,
    RESERVING_ROLES,
    SIGNUP_NEXT_MAX_LENGTH,
    EventType,
    Invitation,
    Membership,
    Organization,
    PendingSignup,
    Role,
)
from marketplace.rules import display_name_clean, email_address_plain
from marketplace.services.api_keys import api_keys_changed, api_keys_revoke_created_by
from marketplace.services.audit import audit_changes, audit_record
from marketplace.services.events import member_event_record
from marketplace.services.ssh_keys import ssh_keys_delete_created_by
from marketplace.services.suspension import (
    organization_active_check,
    organization_share_lock,
    organization_suspended_error,
    organization_unsuspended_lock,
)
from marketplace.services.webhooks import webhook_deliveries_release_held

__all__ = [
    # Declared with Role (marketplace/models/core.py, which the API plumbing reads too).
    "MANAGER_ROLES",
    "RESERVING_ROLES",
    "organization_create",
    "organization_suspend",
    "organization_unsuspend",
    "organization_active_check",
    "organization_share_lock",
    "organization_suspended_error",
    "owner_leaving_check",
    "organization_owner_kept_check",
    "member_change_role",
    "member_remove",
    "member_grants_revoke",
    "member_staff_change_record",
    "user_staff_change_record",
    "INVITATION_MAIL_TASK",
    "invitation_token",
    "invitation_token_hash",
    "invitation_mail_send",
    "invitation_check_open",
    "invitation_check_joinable",
    "invitation_create",
    "invitation_revoke",
    "invitation_accept",
    "SIGNUP_MAIL_TASK",
    "SIGNUP_TAKEN_MAIL_TASK",
    "signup_token",
    "signup_request",
    "signup_mail_send",
    "signup_taken_mail_send",
    "signup_pending_open",
    "signup_confirm",
]

logger = logging.getLogger(__name__)


def _unique_slug(name: str) -> str:
    base = slugify(name)[:50] or "org"
    if not Organization.objects.filter(slug=base).exists():
        return base
    return f"{base}-{secrets.token_hex(3)}"


@transaction.atomic
def organization_create(*, name: str, owner: AbstractBaseUser) -> Organization:
    """Create an organisation with `owner` as its first owner; the slug is derived from the name.

    Refused (403 organization_suspended) while `owner` is a member of an organisation staff
    suspended: a new one would carry on what the suspension stopped. Staff still create
    organisations and add members in the admin."""
    name = display_name_clean(name, what="An organisation")
    _creator_not_suspended_check(owner)
    # The unique constraint settles a race for the same slug; retry once with a random suffix.
    for attempt in range(3):
        slug = (
            _unique_slug(name) if attempt == 0 else f"{slugify(name)[:50]}-{secrets.token_hex(3)}"
        )
        try:
            with transaction.atomic():
                organization = Organization.objects.create(name=name, slug=slug)
            break
        except IntegrityError:
            continue
    else:  # pragma: no cover - three collisions in a row
        raise Conflict("Could not allocate a unique slug; try again.", code="slug_taken")
    Membership.objects.create(organization=organization, user=owner, role=Role.OWNER)
    return organization


# The organisations `user` is a member of, read FOR SHARE in id order (as organisations are
# locked one at a time by a suspension, no cycle): one suspended meanwhile is seen, one being
# suspended waits for the new organisation to be committed.
_MEMBER_ORGANIZATIONS_SHARE_SQL = """
SELECT o.name, o.suspended_at FROM marketplace_organization o
WHERE o.id IN (SELECT m.organization_id FROM marketplace_membership m WHERE m.user_id = %s)
ORDER BY o.id FOR SHARE
"""


def _creator_not_suspended_check(user: AbstractBaseUser) -> None:
    if user.pk is None:
        return
    with connection.cursor() as cur:
        cur.execute(_MEMBER_ORGANIZATIONS_SHARE_SQL, [user.pk])
        suspended = [_one_line(name) for name, suspended_at in cur.fetchall() if suspended_at]
    if suspended:
        raise PermissionDenied(
            f"You are a member of {', '.join(suspended)}, which Switchyard staff suspended: "
            "you cannot create another organisation until the suspension is lifted; contact "
            "support.",
            code="organization_suspended",
        )


# --- suspension by staff ----------------------------------------------------------------------
# A suspended organisation's API keys are refused (403 organization_suspended), its members read
# but change nothing (portal and API), nothing is booked, extended, topped up, listed or sold
# for resale, invited or joined, no API key, SSH key or webhook endpoint is added, and its
# members create no other organisation (checked under the organisation's row by the services
# that do it: services.suspension) and its webhooks wait. Its running reservations are kept or
# stopped as staff choose (reservations_stop_for_suspension).


@transaction.atomic
def organization_suspend(*, organization: Organization, reason: str, actor_label: str) -> bool:
    """Suspend `organization` (staff): audited, its keys refused at once in every process, its
    owners told. False if it was suspended already (nothing changes, the first reason stays)."""
    reason = " ".join((reason or "").split())
    if not reason:
        raise ValidationFailed("Say why: the customer reads it.", code="required", field="reason")
    locked = Organization.objects.select_for_update(no_key=True).get(pk=organization.pk)
    if locked.suspended_at is not None:
        return False
    locked.suspended_at = timezone.now()
    locked.suspension_reason = reason
    locked.save(update_fields=["suspended_at", "suspension_reason"])
    _audit_organization(
        locked,
        "organization.suspend",
        {"before": {"suspended": False}, "after": {"suspended": True, "reason": reason}},
        actor=actor_label,
    )
    _suspension_mail(
        locked,
        subject="Switchyard: your organisation is suspended",
        body=f"Switchyard staff suspended {_one_line(locked.name)} ({locked.public_id}): "
        f"{reason}\n\n"
        "Until the suspension is lifted its API keys are refused, nothing can be booked, "
        "extended, topped up or changed in the portal or the API, and webhooks are held "
        "(sent once it is lifted). Contact Switchyard support to resolve it.",
    )
    _keys_changed()
    return True


@transaction.atomic
def organization_unsuspend(*, organization: Organization, actor_label: str) -> bool:
    """Lift a suspension: everything works again (keys at once, held webhooks are sent, each
    with its full retry window from now), audited, owners told. False if it was not
    suspended."""
    locked = Organization.objects.select_for_update(no_key=True).get(pk=organization.pk)
    if locked.suspended_at is None:
        return False
    reason = locked.suspension_reason
    locked.suspended_at = None
    locked.suspension_reason = ""
    locked.save(update_fields=["suspended_at", "suspension_reason"])
    webhook_deliveries_release_held(organization_id=locked.pk)
    _audit_organization(
        locked,
        "organization.unsuspend",
        {"before": {"suspended": True, "reason": reason}, "after": {"suspended": False}},
        actor=actor_label,
    )
    _suspension_mail(
        locked,
        subject="Switchyard: your organisation's suspension is lifted",
        body=f"Switchyard staff lifted the suspension of {_one_line(locked.name)} "
        f"({locked.public_id}). "
        "Its API keys work again, and booking, extending, topping up and changes are open "
        "again; webhooks held meanwhile are being sent. Reservations stopped when it was "
        "suspended stay stopped.",
    )
    _keys_changed()
    return True


def _one_line(text: str) -> str:
    # A name staff renamed in the admin may hold a line break.
    return " ".join(text.split())


def _keys_changed() -> None:
    # A key is cached per process with its organisation: now, and again after the commit (as a
    # key's own change does), so no process keeps acting on the organisation as it was.
    api_keys_changed()
    transaction.on_commit(api_keys_changed)


def _suspension_mail(organization: Organization, *, subject: str, body: str) -> None:
    # Owners whose account is active (a deactivated account is told nothing more).
    recipients = list(
        Membership.objects.filter(organization=organization, role=Role.OWNER, user__is_active=True)
        .exclude(user__email="")
        .order_by("pk")
        .values_list("user__email", flat=True)
    )
    mail_send_on_commit(subject=subject, body=body, recipients=recipients)


def _audit_organization(
    organization: Organization, action: str, changes: dict, *, actor: str
) -> None:
    audit_record(
        organization_id=organization.pk,
        action=action,
        object_type="organization",
        object_id=organization.public_id,
        changes=changes,
        actor=actor,
    )


def _check_can_manage(*, actor: Membership, role_involved: str) -> None:
    if actor.role not in MANAGER_ROLES:
        raise PermissionDenied(
            "Only owners and admins can manage members.", code="insufficient_role"
        )
    if role_involved == Role.OWNER and actor.role != Role.OWNER:
        raise PermissionDenied(
            "Only an owner can grant, change or remove the owner role.", code="insufficient_role"
        )


def _check_role(role: str) -> None:
    if role not in Role.values:
        raise ValidationFailed(
            f"Unknown role {role!r}; expected one of {', '.join(Role.values)}.",
            code="invalid_choice",
            field="role",
        )


def _lock_with_owners(membership: Membership) -> tuple[Membership, list[int]]:
    """Lock the organisation's owner rows (in pk order), then the member's own row.

    Every change that could remove an owner takes the owner locks first and in the same order,
    so two owners demoting each other at once cannot both see "another owner remains" (and
    cannot deadlock); the second waits and then sees the first one's change.
    """
    owner_pks = list(
        Membership.objects.select_for_update()
        .filter(organization_id=membership.organization_id, role=Role.OWNER)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    locked = Membership.objects.select_for_update().filter(pk=membership.pk).first()
    if locked is None:
        raise NotFound("No such member.", code="member_not_found")
    return locked, owner_pks


def _is_last_owner(membership: Membership, owner_pks: list[int]) -> bool:
    """Whether no other owner who can act (an active account) would remain without it. An owner
    whose account staff deactivated cannot sign in: counting them would leave nobody."""
    if membership.role != Role.OWNER:
        return False
    others = [pk for pk in owner_pks if pk != membership.pk]
    return not Membership.objects.filter(pk__in=others, user__is_active=True).exists()


def _owners_lock(organization_ids: list[int]) -> list[Membership]:
    """Lock the owner rows of these organisations in pk order (the order _lock_with_owners
    takes them in, so the two never deadlock), with their accounts."""
    return list(
        Membership.objects.select_for_update(of=("self",))
        .filter(organization_id__in=organization_ids, role=Role.OWNER)
        .select_related("user", "organization")
        .order_by("pk")
    )


def owner_leaving_check(user: AbstractBaseUser) -> None:
    """Refuse (409 last_owner) to deactivate or delete `user` while they are the only owner with
    an active account of an organisation: nobody could administer it. Under the owner locks, so
    an owner leaving or demoted at the same time is seen (or waits, then sees this)."""
    organization_ids = list(
        Membership.objects.filter(user=user, role=Role.OWNER).values_list(
            "organization_id", flat=True
        )
    )
    owners = _owners_lock(organization_ids)
    stranded = sorted(
        {
            m.organization.name
            for m in owners
            if m.user_id == user.pk
            and not any(
                o.organization_id == m.organization_id and o.user_id != user.pk and o.user.is_active
                for o in owners
            )
        }
    )
    if stranded:
        raise Conflict(
            f"{user.get_username()} is the only owner of {', '.join(stranded)}: make another "
            "member owner first (on the organisation's page), then deactivate or delete them.",
            code="last_owner",
        )


def organization_owner_kept_check(organization_id: int) -> None:
    """After staff changed an organisation's members in the admin: refuse (409 last_owner) if
    it has members but no owner with an active account, under the owner locks."""
    owners = _owners_lock([organization_id])
    if any(o.user.is_active for o in owners):
        return
    if Membership.objects.filter(organization_id=organization_id).exists():
        raise Conflict(_LAST_OWNER, code="last_owner")


def _fresh(actor: Membership) -> Membership:
    """The actor's role now, not as the request began (it may have changed meanwhile)."""
    fresh = Membership.objects.filter(pk=actor.pk).first()
    if fresh is None:
        raise PermissionDenied("You are no longer a member.", code="not_a_member")
    return fresh


_LAST_OWNER = (
    "An organisation must keep at least one owner with an active account; make another member "
    "owner first."
)


def _membership_create(*, organization_id: int, user: AbstractBaseUser, role: str) -> Membership:
    """The one place a member joins (invitation_accept); unique per organisation."""
    _check_role(role)
    try:
        with transaction.atomic():
            membership = Membership.objects.create(
                organization_id=organization_id, user=user, role=role
            )
    except IntegrityError:
        raise Conflict(
            "This user is already a member of the organisation.", code="already_member"
        ) from None
    member_event_record(membership=membership, type=EventType.MEMBER_ADDED)
    _audit_member(membership, "member.add", {"after": {"user": user.get_username(), "role": role}})
    return membership


@transaction.atomic
def member_change_role(*, actor: Membership, membership: Membership, role: str) -> Membership:
    """Change a member's role; the last owner cannot be demoted. What they handed on with the
    role they had and no longer do (API keys, open invitations) is revoked: neither outlives
    its maker's access."""
    _check_role(role)
    if membership.organization_id != actor.organization_id:
        raise NotFound("No such member.", code="member_not_found")
    membership, owner_pks = _lock_with_owners(membership)
    actor = _fresh(actor)
    _check_can_manage(actor=actor, role_involved=membership.role)
    _check_can_manage(actor=actor, role_involved=role)
    if membership.role == role:
        return membership
    if _is_last_owner(membership, owner_pks):
        raise Conflict(_LAST_OWNER, code="last_owner", field="role")
    before = membership.role
    membership.role = role
    membership.save(update_fields=["role"])
    _audit_member(membership, "member.change_role", audit_changes({"role": before}, {"role": role}))
    member_grants_revoke(membership.organization_id, membership.user, role=role)
    return membership


@transaction.atomic
def member_remove(*, actor: Membership, membership: Membership) -> None:
    """Remove a member (or let a member leave); the last owner cannot be removed. The API keys
    they created in the organisation, and the invitations they sent that are still open, are
    revoked with them."""
    if membership.organization_id != actor.organization_id:
        raise NotFound("No such member.", code="member_not_found")
    membership, owner_pks = _lock_with_owners(membership)
    actor = _fresh(actor)
    if membership.pk != actor.pk:
        _check_can_manage(actor=actor, role_involved=membership.role)
    if _is_last_owner(membership, owner_pks):
        raise Conflict(_LAST_OWNER, code="last_owner")
    member_id = membership.pk
    _audit_member(
        membership,
        "member.remove",
        {"before": {"user": membership.user.get_username(), "role": membership.role}},
    )
    membership.delete()
    member_event_record(membership=membership, type=EventType.MEMBER_REMOVED, member_id=member_id)
    member_grants_revoke(membership.organization_id, membership.user, role=None)


def member_grants_revoke(organization_id: int, user: AbstractBaseUser, *, role: str | None) -> None:
    """Revoke the keys and open invitations `user` made that `role` (None: gone) could not make
    now: a manager's all once they manage no more, an owner's owner-only ones (billing keys,
    invitations as owner) once they are not an owner."""
    api_keys_revoke_created_by(organization_id=organization_id, user=user, role=role)
    if role is None:
        # Gone: the SSH keys they saved would be offered (ticked) for every new booking, and
        # put on the organisation's new machines for them.
        ssh_keys_delete_created_by(organization_id=organization_id, user=user)
    if role == Role.OWNER:
        return
    sent = Invitation.objects.select_for_update().filter(
        organization_id=organization_id,
        invited_by=user,
        accepted_at__isnull=True,
        revoked_at__isnull=True,
    )
    if role in MANAGER_ROLES:
        sent = sent.filter(role=Role.OWNER)
    for invitation in sent.order_by("pk"):
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        _audit_invitation(
            invitation,
            "invitation.revoke",
            {"before": {"email": invitation.email}, "reason": "its sender's access changed"},
        )


def member_staff_change_record(
    membership: Membership, *, change: str, before_role: str | None = None, member_id=None
) -> None:
    """Record a membership change staff made in the admin (change: add, remove, role) as the
    services record a member's: its event, its audit entry (the actor is staff:<name>), and
    what the member handed on that their access no longer covers, revoked."""
    user = membership.user
    if change == "add":
        member_event_record(membership=membership, type=EventType.MEMBER_ADDED)
        _audit_member(
            membership,
            "member.add",
            {"after": {"user": user.get_username(), "role": membership.role}},
        )
    elif change == "remove":
        _audit_member(
            membership,
            "member.remove",
            {"before": {"user": user.get_username(), "role": membership.role}},
        )
        member_event_record(
            membership=membership, type=EventType.MEMBER_REMOVED, member_id=member_id
        )
        member_grants_revoke(membership.organization_id, user, role=None)
    elif change == "role":
        _audit_member(
            membership,
            "member.change_role",
            audit_changes({"role": before_role}, {"role": membership.role}),
        )
        member_grants_revoke(membership.organization_id, user, role=membership.role)


@transaction.atomic
def user_staff_change_record(user: AbstractBaseUser, *, change: str) -> None:
    """Record an account staff deactivated, reactivated or are about to delete in the admin
    (change: deactivate, reactivate, delete) in each organisation it belongs to. A deactivated
    account is signed out by Django, and a deleted one's memberships go with it; what it handed
    on goes too (its API keys and open invitations revoked), so nothing outlives its access. A
    deletion is recorded as the member's removal (event, audit entry member.remove); a
    deactivation keeps the member listed (audit member.deactivate) until staff remove them or
    reactivate the account (member.reactivate; revoked keys stay revoked)."""
    if change in ("deactivate", "delete"):
        owner_leaving_check(user)
    memberships = Membership.objects.select_for_update().filter(user=user).order_by("pk")
    for membership in memberships.select_related("user"):
        if change == "delete":
            member_staff_change_record(membership, change="remove", member_id=membership.pk)
            continue
        active = change == "reactivate"
        _audit_member(
            membership,
            f"member.{change}",
            {"before": {"active": not active}, "after": {"active": active}},
        )
        if not active:
            member_grants_revoke(membership.organization_id, user, role=None)


def _audit_member(membership: Membership, action: str, changes: dict) -> None:
    audit_record(
        organization_id=membership.organization_id,
        action=action,
        object_type="member",
        object_id=membership.public_id,
        changes=changes,
    )


def _audit_invitation(invitation: Invitation, action: str, changes: dict) -> None:
    audit_record(
        organization_id=invitation.organization_id,
        action=action,
        object_type="invitation",
        object_id=invitation.public_id,
        changes=changes,
    )


# --- invitations ----------------------------------------------------------------------------


INVITATION_MAIL_TASK = "marketplace.tasks.invitation_mail_send"


def invitation_token(public_id: str) -> str:
    """The secret of an invitation's link, derived from its id with the site's SECRET_KEY (as
    Django's password-reset tokens are): the worker that mails it rebuilds it from the id, so
    it never passes through the broker, and the database keeps only its hash."""
    return salted_hmac("marketplace.invitation", public_id, algorithm="sha256").hexdigest()


def invitation_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invitation_check_open(invitation: Invitation, *, now=None) -> None:
    """Refuse an invitation that can no longer be accepted, saying why."""
    if invitation.revoked_at is not None:
        raise Conflict("This invitation was revoked.", code="invitation_revoked")
    if invitation.accepted_at is not None:
        raise Conflict("This invitation has already been used.", code="invitation_used")
    if invitation.expires_at <= (now or timezone.now()):
        raise Conflict("This invitation has expired; ask for a new one.", code="invitation_expired")


def invitation_check_joinable(invitation: Invitation) -> None:
    """Refuse an invitation that cannot be accepted now, saying why: closed
    (invitation_check_open), or its organisation suspended by staff (403
    organization_suspended; it stays open). Reads only, for the page an invitee opens:
    invitation_accept checks again under the locks."""
    invitation_check_open(invitation)
    if invitation.organization.suspended_at is not None:
        raise _invitation_suspended_error(invitation, invitation.organization)


def _invitation_suspended_error(
    invitation: Invitation, organization: Organization
) -> PermissionDenied:
    # The invitee is no member: told that it is suspended, not staff's reason.
    return PermissionDenied(
        f"{_one_line(organization.name)} is suspended by Switchyard staff: nobody can join "
        "it until the suspension is lifted. This invitation stays valid until "
        f"{invitation.expires_at.isoformat(timespec='seconds')}: open its link again "
        "once the suspension is lifted.",
        code="organization_suspended",
    )


def _normalised_email(email: str) -> str:
    email = email.strip().lower()
    try:
        validate_email(email)
    except ValidationError:
        raise ValidationFailed("Enter a valid email address.", field="email") from None
    return email_address_plain(email)


def invitation_mail_send(*, invitation_id: int) -> int:
    """E-mail an open invitation its link (the worker's side of invitation_create); returns
    how many messages were sent. One revoked, used or expired meanwhile is not sent.

    One whose organisation staff suspended meanwhile is sent, saying so (not why): the link
    works once the suspension is lifted, until the invitation expires. Held instead, it could
    expire unsent while its inviter believes it sent."""
    invitation = (
        Invitation.objects.select_related("organization", "invited_by")
        .filter(pk=invitation_id)
        .first()
    )
    if invitation is None:
        return 0
    try:
        invitation_check_open(invitation)
    except Conflict:
        return 0
    token = invitation_token(invitation.public_id)
    if invitation_token_hash(token) != invitation.token_hash:
        # SECRET_KEY changed since it was created: this link would not work.
        logger.error("invitation %s not sent: its token no longer matches", invitation.public_id)
        return 0
    context = {
        "organization": invitation.organization.name,
        "inviter": invitation.invited_by.get_username() if invitation.invited_by else "",
        "role": invitation.role,
        "expires_at": invitation.expires_at,
        "url": f"{settings.SITE_URL.rstrip('/')}/invitations/{token}",
        "suspended": invitation.organization.suspended_at is not None,
    }
    # One line whatever the name holds (one edited in the admin may carry a line break, which
    # would make the message unsendable).
    name = " ".join(invitation.organization.name.split())
    return send_mail(
        f"Join {name} on Switchyard",
        render_to_string("portal/invitation_email.txt", context),
        None,
        [invitation.email],
        fail_silently=False,
    )


def password_reset_mail_send(*, user_id: int) -> int:
    """E-mail an active account with a password its reset link, built here (the worker's side
    of the portal's reset form: the token never sits in the broker, and the request answers
    alike whether or not the address has an account). Returns how many messages were sent."""
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None or not user.has_usable_password() or not user.email:
        return 0
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    token = default_token_generator.make_token(user)
    path = reverse("portal:password-reset-confirm", kwargs={"uidb64": uid, "token": token})
    context = {
        "user": user,
        # SITE_URL as given, a path under it included, as the invitation links are.
        "url": settings.SITE_URL.rstrip("/") + path,
        "link_works_for": settings.PASSWORD_RESET_TIMEOUT,
    }
    subject = " ".join(render_to_string("portal/password_reset_subject.txt", context).split())
    body = render_to_string("portal/password_reset_email.txt", context)
    return send_mail(subject, body, None, [user.email])


@transaction.atomic
def invitation_create(*, actor: Membership, email: str, role: str) -> tuple[Invitation, str]:
    """Invite `email` to the actor's organisation with `role`; returns it and its secret token.

    The token is e-mailed (by a task, from the invitation's id, once the transaction commits)
    and returned here; only its hash is kept. An open invitation for the same address is
    refused by the database, not by a check. Sending is capped per organisation and day
    (INVITATIONS_PER_DAY, INVITATIONS_PER_ADDRESS_PER_DAY, revoked ones counted), so an
    organisation cannot make Switchyard mail an address again and again.
    """
    _check_role(role)
    email = _normalised_email(email)
    actor = _fresh(actor)
    _check_can_manage(actor=actor, role_involved=role)
    _invitations_within_caps(actor.organization_id, email)
    members = Membership.objects.filter(organization_id=actor.organization_id)
    if members.filter(user__email__iexact=email).exists():
        raise Conflict(
            "Someone with this email is already a member of the organisation.",
            code="already_member",
            field="email",
        )
    now = timezone.now()
    # An expired invitation still counts as open for the constraint; a new one replaces it.
    Invitation.objects.filter(
        organization_id=actor.organization_id,
        email=email,
        accepted_at=None,
        revoked_at=None,
        expires_at__lte=now,
    ).update(revoked_at=now)
    public_id = ids.invitation_id()
    token = invitation_token(public_id)
    try:
        with transaction.atomic():
            invitation = Invitation.objects.create(
                public_id=public_id,
                organization_id=actor.organization_id,
                email=email,
                role=role,
                token_hash=invitation_token_hash(token),
                invited_by_id=actor.user_id,
                expires_at=now + settings.INVITATION_TTL,
            )
    except IntegrityError:
        raise Conflict(
            "This address already has an open invitation; revoke it to send a new one.",
            code="invitation_exists",
            field="email",
        ) from None
    # Sent by a task after commit, from the invitation's id (the worker rebuilds the link):
    # the invitation stands if the mail server fails meanwhile; it can be revoked and sent again.
    mail_task_on_commit(INVITATION_MAIL_TASK, [invitation.pk])
    _audit_invitation(invitation, "invitation.create", {"after": {"email": email, "role": role}})
    return invitation, token


def _invitations_within_caps(organization_id: int, email: str) -> None:
    # Under the organisation's row lock, so two sends at once are counted one after the other,
    # and a suspension committed first is seen (one being written waits for this invitation).
    organization_unsuspended_lock(organization_id=organization_id)
    since = timezone.now() - timedelta(days=1)
    sent = Invitation.objects.filter(organization_id=organization_id, created_at__gte=since)
    caps = (
        (sent.filter(email=email), settings.INVITATIONS_PER_ADDRESS_PER_DAY, " to this address"),
        (sent, settings.INVITATIONS_PER_DAY, ""),
    )
    for invitations, cap, to_whom in caps:
        if invitations.count() >= cap:
            first = invitations.order_by("created_at").values_list("created_at", flat=True)[0]
            raise Conflict(
                f"This organisation has sent {cap} invitations{to_whom} in the last 24 hours "
                f"(revoked ones count); the next can be sent from "
                f"{(first + timedelta(days=1)).isoformat(timespec='seconds')}.",
                code="invitation_limit",
                field="email",
            )


@transaction.atomic
def invitation_revoke(*, actor: Membership, invitation: Invitation) -> Invitation:
    """Revoke an open invitation; its link stops working. Revoking twice is harmless."""
    if invitation.organization_id != actor.organization_id:
        raise NotFound("No such invitation.", code="invitation_not_found")
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    actor = _fresh(actor)
    _check_can_manage(actor=actor, role_involved=invitation.role)
    if invitation.accepted_at is not None:
        raise Conflict("This invitation has already been used.", code="invitation_used")
    if invitation.revoked_at is None:
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        _audit_invitation(invitation, "invitation.revoke", {"before": {"email": invitation.email}})
    return invitation


@transaction.atomic
def invitation_accept(*, token: str, user: AbstractBaseUser) -> Membership:
    """Join the invitation's organisation as `user`, with the invited role.

    The token is the proof (as at GitHub): the user's email need not match the invited one.
    If the user is already a member, nothing changes and the invitation stays open.
    """
    invitation = (
        Invitation.objects.select_for_update()
        .filter(token_hash=invitation_token_hash(token))
        .first()
    )
    if invitation is None:
        raise NotFound("No such invitation.", code="invitation_not_found")
    return _invitation_join(invitation, user)


def _invitation_join(invitation: Invitation, user: AbstractBaseUser) -> Membership:
    """Accept a locked invitation as `user` (invitation_accept, signup_confirm). Refused (403
    organization_suspended) while staff suspend its organisation: it stays open, and can be
    accepted once the suspension is lifted if it has not expired by then."""
    now = timezone.now()
    invitation_check_open(invitation, now=now)
    organization = organization_share_lock(organization_id=invitation.organization_id)
    if organization is not None and organization.suspended_at is not None:
        raise _invitation_suspended_error(invitation, organization)
    membership = _membership_create(
        organization_id=invitation.organization_id, user=user, role=invitation.role
    )
    invitation.accepted_at = now
    invitation.accepted_by = user
    invitation.save(update_fields=["accepted_at", "accepted_by"])
    return membership


# --- sign-up --------------------------------------------------------------------------------
# A sign-up answers the same whether or not its e-mail address has an account: the account is
# created only through a link mailed to the address (docs/portal.md). An address that has an
# account is mailed a notice instead, and nothing is created. So does a sign-up through an
# invitation's link: its token is no proof of the address typed (and the inviter has it too).

SIGNUP_MAIL_TASK = "marketplace.tasks.signup_mail_send"
SIGNUP_TAKEN_MAIL_TASK = "marketplace.tasks.signup_taken_mail_send"


def signup_token(public_id: str) -> str:
    """The secret of a sign-up link, derived from the pending sign-up's id with SECRET_KEY (as
    an invitation's is): the worker that mails it rebuilds it, the database keeps its hash."""
    return salted_hmac("marketplace.signup", public_id, algorithm="sha256").hexdigest()


def signup_request(
    *,
    email: str,
    username: str,
    organization_name: str,
    password: str,
    invitation: Invitation | None = None,
    next_url: str = "",
) -> None:
    """Record a sign-up and mail its address the link that finishes it; for an address that
    has an account, mail it a notice and record nothing. The caller cannot tell which
    happened: the same work (the password is hashed either way), no return value.

    Through `invitation` the account joins its organisation (`organization_name` is not
    used); `next_url`, already checked by the caller to be on this site, is where the
    confirmation goes afterwards."""
    if invitation is None:
        organization_name = display_name_clean(
            organization_name, what="An organisation", field="organization"
        )
    else:
        organization_name = ""
    email = email_address_plain(email.strip())  # it becomes the mail's To header
    if len(next_url) > SIGNUP_NEXT_MAX_LENGTH:
        next_url = ""
    hashed = make_password(password)
    accounts = list(
        get_user_model().objects.filter(email__iexact=email).values_list("pk", "is_active")
    )
    if accounts:
        for user_id, is_active in accounts:
            if is_active:
                mail_task_on_commit(SIGNUP_TAKEN_MAIL_TASK, [user_id])
        return
    pending = PendingSignup(
        email=email,
        username=username,
        organization_name=organization_name,
        password=hashed,
        invitation=invitation,
        next_url=next_url,
        expires_at=timezone.now() + timedelta(hours=settings.SIGNUP_CONFIRM_HOURS),
    )
    pending.token_hash = invitation_token_hash(signup_token(pending.public_id))
    pending.save()
    mail_task_on_commit(SIGNUP_MAIL_TASK, [pending.pk])


def _signup_check_open(pending: PendingSignup | None, *, now=None) -> PendingSignup:
    if pending is None:
        raise NotFound(
            "This sign-up link is not valid: copy the whole link from the e-mail, or sign up "
            "again.",
            code="signup_unknown",
        )
    if pending.used_at is not None:
        raise Gone("This sign-up link was already used: sign in.", code="signup_used")
    if pending.expires_at <= (now or timezone.now()):
        raise Gone("This sign-up link has expired: sign up again.", code="signup_expired")
    return pending


def signup_pending_open(*, token: str) -> PendingSignup:
    """The pending sign-up behind a link, if it can still be confirmed; else the error saying
    why (unknown, used, expired). Reads only: a mail scanner opening the link creates nothing."""
    pending = PendingSignup.objects.filter(token_hash=invitation_token_hash(token)).first()
    return _signup_check_open(pending)


def signup_mail_send(*, pending_signup_id: int) -> int:
    """E-mail a pending sign-up the link that finishes it (the worker's side of
    signup_request); returns how many messages were sent. One used or expired is not sent."""
    pending = (
        PendingSignup.objects.select_related("invitation__organization")
        .filter(pk=pending_signup_id)
        .first()
    )
    try:
        _signup_check_open(pending)
    except (NotFound, Gone):
        return 0
    token = signup_token(pending.public_id)
    if invitation_token_hash(token) != pending.token_hash:
        # SECRET_KEY changed since it was recorded: this link would not work.
        logger.error("sign-up %s not mailed: its token no longer matches", pending.public_id)
        return 0
    path = reverse("portal:signup-confirm", kwargs={"token": token})
    invitation = pending.invitation
    # One line whatever a name holds (an organisation renamed in the admin may hold a break).
    organization = invitation.organization.name if invitation else pending.organization_name
    context = {
        "username": pending.username,
        "organization": " ".join(organization.split()),
        "role": invitation.role if invitation else "",
        "url": settings.SITE_URL.rstrip("/") + path,
        "hours": settings.SIGNUP_CONFIRM_HOURS,
    }
    return send_mail(
        "Finish signing up to Switchyard",
        render_to_string("portal/signup_confirm_email.txt", context),
        None,
        [pending.email],
        fail_silently=False,
    )


def signup_taken_mail_send(*, user_id: int) -> int:
    """Tell an active account that someone tried to sign up with its e-mail address (the
    worker's side of signup_request); returns how many messages were sent."""
    user = get_user_model().objects.filter(pk=user_id, is_active=True).first()
    if user is None or not user.email:
        return 0
    site = settings.SITE_URL.rstrip("/")
    context = {
        "user": user,
        "login_url": site + reverse("portal:login"),
        "reset_url": site + reverse("portal:password-reset"),
    }
    return send_mail(
        "Someone tried to sign up to Switchyard with your address",
        render_to_string("portal/signup_taken_email.txt", context),
        None,
        [user.email],
        fail_silently=False,
    )


@transaction.atomic
def signup_confirm(*, token: str, username: str) -> tuple[AbstractBaseUser, Organization | None]:
    """Create the account and its organisation of a pending sign-up, as `username` (the one
    signed up with, or another if that was taken meanwhile); the link then stops working.

    One made through an invitation joins the invitation's organisation instead (returned);
    if the invitation was revoked, used or expired meanwhile, or its organisation is
    suspended, the account is still created, in no organisation (None is returned).

    Every pending sign-up of the address is locked first (in id order), so two links for one
    address, or one link sent twice, make one account."""
    user_model = get_user_model()
    token_hash = invitation_token_hash(token)
    email = PendingSignup.objects.filter(token_hash=token_hash).values_list("email", flat=True)
    locked = list(
        PendingSignup.objects.select_for_update()
        .filter(email__iexact=email.first() or "")
        .order_by("pk")
    )
    pending = _signup_check_open(next((p for p in locked if p.token_hash == token_hash), None))
    if user_model.objects.filter(email__iexact=pending.email).exists():
        raise Conflict(
            "An account with this e-mail address exists now: sign in, or reset its password.",
            code="signup_email_taken",
        )
    taken = ValidationFailed(
        "A user with that username already exists: choose another.",
        code="username_taken",
        field="username",
    )
    if user_model.objects.filter(username__iexact=username).exists():
        raise taken
    try:
        with transaction.atomic():
            user = user_model.objects.create(
                username=username, email=pending.email, password=pending.password
            )
    except IntegrityError:  # the same name, created a moment ago
        raise taken from None
    if pending.invitation_id is None:
        organization = organization_create(name=pending.organization_name, owner=user)
    else:
        organization = _signup_invitation_join(pending.invitation_id, user)
    pending.used_at = timezone.now()
    pending.password = ""  # the account holds it now
    pending.save(update_fields=["used_at", "password"])
    return user, organization


def _signup_invitation_join(invitation_id: int, user: AbstractBaseUser) -> Organization | None:
    invitation = (
        Invitation.objects.select_for_update()
        .select_related("organization")
        .filter(pk=invitation_id)
        .first()
    )
    if invitation is None:
        return None
    try:
        return _invitation_join(invitation, user).organization
    except (Conflict, PermissionDenied):
        # Closed meanwhile, or its organisation suspended: the account stands, in no
        # organisation (an invitation still open can be accepted later through its link).
        return None
