"""Idempotency-Key for every POST.

Protocol (documented in docs/api.md):
- The key is scoped to the organisation and the caller (API key or user): two callers may use
  the same key without meeting.
- The first request claims the key by inserting a row (the unique constraint decides races);
  its response is stored when it finishes, in the same transaction as the action's writes
  for a success, so "done" and "recorded" cannot come apart.
- The same key with the same request (method, path, JSON body) replays the stored response
  with `Idempotent-Replayed: true`. With another request: 422 idempotency_key_mismatch.
  While the first is still running: 409 idempotency_key_in_use (retry shortly).
- 2xx and 4xx responses are stored; a 5xx or a crash releases the key so a retry runs again.
- Keys expire after 24 hours: after that the same key starts a new request.
- Fields listed in a view's `idempotency_redacted_fields` (an API key's secret) are never
  stored, so a replay shows them as null.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta

from django.db import connection
from django.utils import timezone
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request

from config.errors import ApplicationError, Conflict, ValidationFailed
from config.retention import delete_in_batches
from marketplace.models import IdempotencyRecord, Organization

__all__ = [
    "HEADER",
    "REPLAYED_HEADER",
    "KEY_TTL",
    "IN_FLIGHT_TIMEOUT",
    "Claim",
    "IdempotentReplay",
    "idempotency_claim",
    "idempotency_complete",
    "idempotency_release",
    "idempotency_records_purge",
    "request_fingerprint",
]

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEY_TTL = timedelta(hours=24)
# A claim older than this whose request never finished (the process died) may be taken over.
# Well past the longest a request can run: gunicorn ends a sync worker silent for 30 s, and
# the slowest path, a card call to Stripe, takes at most two tries of STRIPE_TIMEOUT_SECONDS.
IN_FLIGHT_TIMEOUT = timedelta(minutes=5)
MAX_KEY_LENGTH = 255


# Claiming is one statement: the unique constraint decides a race without raising, so a claim
# needs neither a transaction nor a savepoint of its own (a request's hot path).
_CLAIM_SQL = """
INSERT INTO marketplace_idempotencyrecord (organization_id, principal, key, request_hash, created_at)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT ON CONSTRAINT idempotency_key_unique DO NOTHING
RETURNING id
"""
# The body goes in as the JSON text already rendered, kept as text: a replay sends the same
# bytes (jsonb would reorder the keys and drop duplicate whitespace choices).
_COMPLETE_SQL = """
UPDATE marketplace_idempotencyrecord
SET response_status = %s, response_body = %s, completed_at = %s
WHERE id = %s
"""


class IdempotencyKeyInvalid(ValidationFailed):
    default_code = "idempotency_key_invalid"


class IdempotencyKeyMismatch(ApplicationError):
    status_code = 422
    default_code = "idempotency_key_mismatch"


class IdempotencyKeyInUse(Conflict):
    default_code = "idempotency_key_in_use"


class IdempotentReplay(Exception):  # noqa: N818 - control flow, not an error
    """Raised to short-circuit the view with the stored response."""

    def __init__(self, record: IdempotencyRecord):
        self.record = record


@dataclass
class Claim:
    record_id: int
    redacted_fields: tuple[str, ...] = ()


def request_fingerprint(request: Request) -> str:
    body = request.body
    try:
        # Key order and whitespace do not make a different request.
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, UnicodeDecodeError):
        canonical = body
    digest = hashlib.sha256()
    for part in (request.method.encode(), request.get_full_path().encode(), canonical):
        digest.update(part)
        digest.update(b"\x00")
    return digest.hexdigest()


def idempotency_claim(
    *, request: Request, organization: Organization, principal: str, redacted_fields=()
) -> Claim | None:
    """Claim the request's Idempotency-Key, or raise to replay or refuse. None: no key sent."""
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not (0 < len(key) <= MAX_KEY_LENGTH) or not key.isascii() or not key.isprintable():
        raise IdempotencyKeyInvalid(
            "Idempotency-Key must be 1 to 255 printable ASCII characters.", field=HEADER
        )
    fingerprint = request_fingerprint(request)
    scope = {"organization": organization, "principal": principal, "key": key}
    for _ in range(3):
        with connection.cursor() as cur:
            cur.execute(
                _CLAIM_SQL,
                [organization.pk, principal, key, fingerprint, timezone.now()],
            )
            claimed = cur.fetchone()
        if claimed is not None:
            return Claim(record_id=claimed[0], redacted_fields=tuple(redacted_fields))
        existing = IdempotencyRecord.objects.filter(**scope).first()
        if existing is None:  # released between our insert and our read: try again
            continue
        now = timezone.now()
        stale = now - existing.created_at >= KEY_TTL or (
            existing.response_status is None and now - existing.created_at >= IN_FLIGHT_TIMEOUT
        )
        if stale:
            # Delete only the row we looked at, so two takers cannot both delete and both win.
            IdempotencyRecord.objects.filter(
                pk=existing.pk, created_at=existing.created_at
            ).delete()
            continue
        if existing.request_hash != fingerprint:
            raise IdempotencyKeyMismatch(
                "This Idempotency-Key was used with a different request (method, path or "
                "body). Use a new key for a new request.",
                field=HEADER,
            )
        if existing.response_status is None:
            raise _in_use()
        raise IdempotentReplay(existing)
    raise _in_use()


def _in_use() -> IdempotencyKeyInUse:
    return IdempotencyKeyInUse(
        "A request with this Idempotency-Key is still being processed; retry in a moment.",
        field=HEADER,
    )


def _storable(data, redacted_fields: tuple[str, ...]) -> str | None:
    """The response body as JSON text, as the client received it, minus the redacted fields."""
    if data is None:
        return None
    rendered = JSONRenderer().render(data).decode()
    if not redacted_fields:
        return rendered
    body = json.loads(rendered)
    if isinstance(body, dict):
        for name in redacted_fields:
            if name in body:
                body[name] = None
    return json.dumps(body)


def idempotency_complete(*, claim: Claim, status: int, data) -> None:
    with connection.cursor() as cur:
        cur.execute(
            _COMPLETE_SQL,
            [status, _storable(data, claim.redacted_fields), timezone.now(), claim.record_id],
        )


def once_claim(*, organization: Organization, principal: str, key: str) -> bool:
    """Claim a one-time key (a portal form's: sent twice by a double click or a reload) in the
    caller's transaction: True the first time, False while the key is remembered (KEY_TTL).
    The unique constraint decides between two sends at once; an action that rolls back
    leaves the key free, so sending again after a refusal works."""
    with connection.cursor() as cur:
        cur.execute(_CLAIM_SQL, [organization.pk, principal, key, "once", timezone.now()])
        return cur.fetchone() is not None


def idempotency_release(*, claim: Claim) -> None:
    IdempotencyRecord.objects.filter(pk=claim.record_id, response_status__isnull=True).delete()


def idempotency_records_purge(*, now=None) -> int:
    """Delete records past KEY_TTL (they no longer replay anything); returns how many.

    Meant for a periodic task; claims already ignore expired rows, so running it late is safe.
    """
    now = now or timezone.now()
    return delete_in_batches(IdempotencyRecord.objects.filter(created_at__lt=now - KEY_TTL))
