"""Organisations and their members.

Rules: an organisation always keeps at least one owner; owners and admins manage members, but
only an owner may grant, change or remove the owner role.
"""

import secrets

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils.text import slugify

from config.errors import Conflict, NotFound, PermissionDenied, ValidationFailed
from marketplace.models import Membership, Organization, Role

__all__ = [
    "MANAGER_ROLES",
    "RESERVING_ROLES",
    "organization_create",
    "member_add",
    "member_change_role",
    "member_remove",
]

# Who may add, change and remove members and manage API keys.
MANAGER_ROLES = frozenset({Role.OWNER, Role.ADMIN})
# Who may quote, reserve, cancel and extend. The billing role reads; it does not buy.
RESERVING_ROLES = frozenset({Role.OWNER, Role.ADMIN, Role.MEMBER})


def _unique_slug(name: str) -> str:
    base = slugify(name)[:50] or "org"
    if not Organization.objects.filter(slug=base).exists():
        return base
    return f"{base}-{secrets.token_hex(3)}"


@transaction.atomic
def organization_create(*, name: str, owner: AbstractBaseUser) -> Organization:
    """Create an organisation with `owner` as its first owner; the slug is derived from the name."""
    name = name.strip()
    if not name:
        raise ValidationFailed("An organisation needs a name.", code="blank", field="name")
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
    return membership.role == Role.OWNER and not any(pk != membership.pk for pk in owner_pks)


def _fresh(actor: Membership) -> Membership:
    """The actor's role now, not as the request began (it may have changed meanwhile)."""
    fresh = Membership.objects.filter(pk=actor.pk).first()
    if fresh is None:
        raise PermissionDenied("You are no longer a member.", code="not_a_member")
    return fresh


_LAST_OWNER = "An organisation must keep at least one owner; make someone else owner first."


@transaction.atomic
def member_add(*, actor: Membership, user: AbstractBaseUser, role: str) -> Membership:
    """Add `user` to the actor's organisation with `role`."""
    _check_role(role)
    _check_can_manage(actor=actor, role_involved=role)
    try:
        with transaction.atomic():
            return Membership.objects.create(
                organization_id=actor.organization_id, user=user, role=role
            )
    except IntegrityError:
        raise Conflict(
            "This user is already a member of the organisation.", code="already_member"
        ) from None


@transaction.atomic
def member_change_role(*, actor: Membership, membership: Membership, role: str) -> Membership:
    """Change a member's role; the last owner cannot be demoted."""
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
    membership.role = role
    membership.save(update_fields=["role"])
    return membership


@transaction.atomic
def member_remove(*, actor: Membership, membership: Membership) -> None:
    """Remove a member (or let a member leave); the last owner cannot be removed."""
    if membership.organization_id != actor.organization_id:
        raise NotFound("No such member.", code="member_not_found")
    membership, owner_pks = _lock_with_owners(membership)
    actor = _fresh(actor)
    if membership.pk != actor.pk:
        _check_can_manage(actor=actor, role_involved=membership.role)
    if _is_last_owner(membership, owner_pks):
        raise Conflict(_LAST_OWNER, code="last_owner")
    membership.delete()
