"""Organisation API keys.

A secret looks like sy_live_<prefix8>_<random40>. We store the visible prefix
(sy_live_<prefix8>) and the SHA-256 of the whole secret, never the secret itself: it is shown
once, at creation. SHA-256 without a salt is enough here because the secret is 40 random
characters (≈238 bits), not a password.
"""

import hashlib
import logging
import secrets
import string
from datetime import timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from redis.exceptions import RedisError

from config.errors import PermissionDenied, ValidationFailed
from marketplace.models import (
    MANAGER_ROLES,
    ApiKey,
    ApiKeyScope,
    EventType,
    Membership,
    Organization,
    Role,
)
from marketplace.rules import display_name_clean
from marketplace.services.audit import audit_record
from marketplace.services.events import api_key_event_record
from marketplace.services.suspension import organization_unsuspended_lock

__all__ = [
    "SECRET_PREFIX",
    "MAX_ACTIVE_KEYS",
    "LAST_USED_RESOLUTION",
    "api_key_hash",
    "api_key_create",
    "api_key_revoke",
    "api_keys_revoke_created_by",
    "api_key_record_use",
    "API_KEYS_GENERATION",
    "api_keys_changed",
]

logger = logging.getLogger(__name__)

SECRET_PREFIX = "sy_live_"
# Keys in use (not revoked) per organisation: one per integration, CI job or person, with room.
MAX_ACTIVE_KEYS = 100
# last_used_at is written at most once per this interval per key, so a busy key does not turn
# every read into a write.
LAST_USED_RESOLUTION = timedelta(minutes=1)

_LOWER_ALNUM = string.ascii_lowercase + string.digits
_ALNUM = string.ascii_letters + string.digits


# The cache key (under the cache's prefix) whose value changes whenever any API key changes, or
# anything a cached key carries (its organisation's suspension): marketplace.auth's key cache.
API_KEYS_GENERATION = "apikeys:generation"


def api_keys_changed() -> None:
    """Give the keys a new generation: every process drops its cached keys on its next
    request. Called after the commit of any change to a key."""
    try:
        cache.set(API_KEYS_GENERATION, secrets.token_hex(8), timeout=None)
    except (RedisError, OSError):
        # Processes that cannot read the generation either trust no cached key; those that
        # can still see the old one until API_KEY_CACHE_SECONDS pass.
        logger.error("could not publish an API key change to Redis", exc_info=True)


def api_key_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _random(alphabet: str, length: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


@transaction.atomic
def api_key_create(
    *,
    organization: Organization,
    name: str,
    scopes: list[str],
    created_by: AbstractBaseUser | None,
) -> tuple[ApiKey, str]:
    """Create a key and return it with its secret, which is not stored and cannot be shown again.
    Refused (403 organization_suspended) while staff suspend the organisation."""
    name = display_name_clean(name, what="An API key")
    scopes = sorted(set(scopes))
    if not scopes or not set(scopes) <= set(ApiKeyScope.values):
        raise ValidationFailed(
            f"Scopes must be a non-empty subset of {', '.join(ApiKeyScope.values)}.",
            code="invalid_scopes",
            field="scopes",
        )
    if ApiKeyScope.BILLING in scopes and created_by is not None:
        _require_owner(organization=organization, user=created_by)
    if ApiKeyScope.GRID in scopes and created_by is not None and not created_by.is_staff:
        # A grid key writes every zone's power prices, which set everyone's prices; members
        # never grant it (staff do, or code acting for the operator: created_by None).
        raise PermissionDenied(
            "Only staff can create a key with the grid scope.",
            code="insufficient_role",
            field="scopes",
        )
    # Counted under the organisation's row lock, so two requests cannot both pass the limit;
    # refused if staff suspended it (one suspending it meanwhile waits for this).
    organization_unsuspended_lock(organization_id=organization.pk)
    if ApiKey.objects.filter(organization=organization, revoked_at__isnull=True).count() >= (
        MAX_ACTIVE_KEYS
    ):
        raise ValidationFailed(
            f"An organisation may have at most {MAX_ACTIVE_KEYS} API keys in use; revoke one "
            "it no longer needs first.",
            code="too_many_api_keys",
        )
    for _ in range(5):
        prefix = SECRET_PREFIX + _random(_LOWER_ALNUM, 8)
        secret = f"{prefix}_{_random(_ALNUM, 40)}"
        try:
            with transaction.atomic():
                key = ApiKey.objects.create(
                    organization=organization,
                    name=name,
                    prefix=prefix,
                    secret_hash=api_key_hash(secret),
                    scopes=scopes,
                    created_by=created_by,
                )
            api_key_event_record(api_key=key, type=EventType.API_KEY_CREATED)
            _audit(key, "api_key.create", {"after": {"name": name, "scopes": scopes}})
            return key, secret
        except IntegrityError:  # a prefix collision (1 in 36^8): draw again
            continue
    raise RuntimeError("could not draw a unique API key prefix")  # pragma: no cover


def _require_owner(*, organization: Organization, user: AbstractBaseUser) -> None:
    # A billing key can move money; only an owner may hand that power to an integration.
    if not Membership.objects.filter(
        organization=organization, user=user, role=Role.OWNER
    ).exists():
        raise PermissionDenied(
            "Only an owner can create a key with the billing scope.",
            code="insufficient_role",
            field="scopes",
        )


@transaction.atomic
def api_key_revoke(*, api_key: ApiKey) -> ApiKey:
    """Revoke a key; it stops working at once. Revoking a revoked key changes nothing."""
    key = ApiKey.objects.select_for_update().get(pk=api_key.pk)
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        api_key_event_record(api_key=key, type=EventType.API_KEY_REVOKED)
        _audit(key, "api_key.revoke", {"before": {"revoked": False}, "after": {"revoked": True}})
    return key


def api_keys_revoke_created_by(*, organization_id: int, user, role: str | None = None) -> list:
    """Revoke the keys `user` created in the organisation that they could no longer create: a
    key outlives nobody's access. role None: they left or were removed (every key); a role
    that manages no keys (member, billing): every key; admin: those with the billing scope,
    which only an owner grants."""
    keys = ApiKey.objects.filter(
        organization_id=organization_id, created_by=user, revoked_at__isnull=True
    ).order_by("pk")
    if role == Role.OWNER:
        return []
    if role in MANAGER_ROLES:
        keys = keys.filter(scopes__contains=[ApiKeyScope.BILLING])
    return [api_key_revoke(api_key=key) for key in keys]


def _audit(key: ApiKey, action: str, changes: dict) -> None:
    audit_record(
        organization_id=key.organization_id,
        action=action,
        object_type="api_key",
        object_id=key.public_id,
        changes=changes,
    )


def api_key_record_use(*, api_key: ApiKey) -> None:
    """Note that the key was used, at most once per LAST_USED_RESOLUTION.

    The condition sits in the UPDATE itself, so concurrent requests write once between them.
    """
    now = timezone.now()
    if api_key.last_used_at and now - api_key.last_used_at < LAST_USED_RESOLUTION:
        return
    updated = ApiKey.objects.filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION),
        pk=api_key.pk,
    ).update(last_used_at=now)
    if updated:
        api_key.last_used_at = now
