"""An organisation's saved SSH public keys, and putting them into a reservation's workload.

A key is checked by the same rule as a key given with a reservation
(provisioning.workload.ssh_public_key_validate). The same key (by fingerprint, whatever its
comment) is saved once per organisation: the unique constraint decides, not a prior read.
"""

from collections.abc import Sequence

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction

from config.errors import Conflict, ValidationFailed
from marketplace.models import Organization, SshKey
from marketplace.provisioning.workload import (
    MAX_SSH_KEYS,
    ssh_public_key_fingerprint,
    ssh_public_key_validate,
)
from marketplace.rules import display_name_clean
from marketplace.selectors.ssh_keys import ssh_key_list_for_org
from marketplace.services.audit import audit_record
from marketplace.services.suspension import organization_unsuspended_lock

__all__ = ["MAX_SAVED_KEYS", "ssh_key_create", "ssh_key_delete", "workload_add_saved_ssh_keys"]

_NAME_MAX = 100
# Saved keys per organisation (a reservation takes at most MAX_SSH_KEYS of them).
MAX_SAVED_KEYS = 100
_UNIQUE_FINGERPRINT = "ssh_key_unique_fingerprint"


@transaction.atomic
def ssh_key_create(
    *,
    organization: Organization,
    user: AbstractBaseUser | None,
    name: str,
    public_key: str,
) -> SshKey:
    """Save a public key for the organisation. Conflict ssh_key_exists if it is already saved;
    refused (403 organization_suspended) while staff suspend the organisation."""
    name = display_name_clean(name, what="An SSH key")
    if len(name) > _NAME_MAX:
        raise ValidationFailed(
            f"A name is at most {_NAME_MAX} characters.", code="max_length", field="name"
        )
    public_key = ssh_public_key_validate(public_key, field="public_key")
    fingerprint = ssh_public_key_fingerprint(public_key)
    # Counted under the organisation's row lock, so two requests cannot both pass the limit;
    # refused if staff suspended it (one suspending it meanwhile waits for this).
    organization_unsuspended_lock(organization_id=organization.pk)
    if SshKey.objects.filter(organization=organization).count() >= MAX_SAVED_KEYS:
        raise ValidationFailed(
            f"An organisation may save at most {MAX_SAVED_KEYS} SSH keys; delete one it no "
            "longer needs first.",
            code="too_many_ssh_keys_saved",
        )
    try:
        with transaction.atomic():
            key = SshKey.objects.create(
                organization=organization,
                name=name,
                public_key=public_key,
                fingerprint=fingerprint,
                created_by=user,
            )
        _audit(key, "ssh_key.create", {"after": {"name": name, "fingerprint": fingerprint}})
        return key
    except IntegrityError as exc:
        if getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None) != (
            _UNIQUE_FINGERPRINT
        ):
            raise
    existing = ssh_key_list_for_org(organization=organization).filter(fingerprint=fingerprint)
    saved_as = existing.values_list("name", flat=True).first()
    raise Conflict(
        f"This key ({fingerprint}) is already saved"
        + (f" as {saved_as!r}." if saved_as is not None else "."),
        code="ssh_key_exists",
        field="public_key",
    )


@transaction.atomic
def ssh_key_delete(*, ssh_key: SshKey, reason: str = "") -> None:
    """Forget a saved key (`reason`, when it is not its organisation's own doing, goes in the
    audit entry). Reservations that already carry it keep it in their workload."""
    SshKey.objects.filter(pk=ssh_key.pk).delete()
    changes = {"before": {"name": ssh_key.name, "fingerprint": ssh_key.fingerprint}}
    if reason:
        changes["reason"] = reason
    _audit(ssh_key, "ssh_key.delete", changes)


def ssh_keys_delete_created_by(*, organization_id: int, user) -> int:
    """Forget the keys `user` saved in the organisation (they left it or lost their account);
    each deletion audited with why. Machines already carrying a key keep it to their end."""
    keys = list(
        SshKey.objects.filter(organization_id=organization_id, created_by=user).order_by("pk")
    )
    for key in keys:
        ssh_key_delete(
            ssh_key=key, reason="the member who saved it no longer belongs to the organisation"
        )
    return len(keys)


def _audit(key: SshKey, action: str, changes: dict) -> None:
    audit_record(
        organization_id=key.organization_id,
        action=action,
        object_type="ssh_key",
        object_id=key.public_id,
        changes=changes,
    )


def workload_add_saved_ssh_keys(
    *, organization: Organization, workload: dict, ssh_key_ids: Sequence[str]
) -> dict:
    """A validated workload with the organisation's saved keys `ssh_key_ids` added.

    The workload's own keys come first, then the saved ones in the order asked; each key (by
    fingerprint, whatever its comment) appears once. An id that is not one of the organisation's
    saved keys (another organisation's, too) is refused: ValidationFailed on ssh_key_ids.
    """
    if not ssh_key_ids and not workload.get("ssh_public_keys"):
        return workload
    wanted = list(dict.fromkeys(ssh_key_ids))
    found = {
        key.public_id: key
        for key in ssh_key_list_for_org(organization=organization).filter(public_id__in=wanted)
    }
    missing = [public_id for public_id in wanted if public_id not in found]
    if missing:
        raise ValidationFailed(
            f"No saved SSH key {missing[0][:40]!r} in this organisation.",
            code="unknown_ssh_key",
            field="ssh_key_ids",
        )
    keys: dict[str, str] = {}
    for key in workload.get("ssh_public_keys", []):
        keys.setdefault(ssh_public_key_fingerprint(key), key)
    for public_id in wanted:
        keys.setdefault(found[public_id].fingerprint, found[public_id].public_key)
    if len(keys) > MAX_SSH_KEYS:
        raise ValidationFailed(
            f"At most {MAX_SSH_KEYS} SSH keys in all, given and saved.",
            code="too_many_ssh_keys",
            field="ssh_key_ids",
        )
    return {**workload, "ssh_public_keys": list(keys.values())}
