"""Webhook endpoints: registration, settings, secret rotation, and the deliveries of an event.

An endpoint's URL must be https on a public address: its host may not resolve to a loopback,
private, link-local, shared, multicast, reserved or cloud-metadata address (checked here when
registered and changed, and again by the sender against the address it connects to, so a
DNS answer that changes later cannot turn a delivery inward). WEBHOOK_ALLOW_INSECURE, for
development and tests only, allows http and such addresses.
"""

import hashlib
import hmac
import ipaddress
import secrets
import socket
import threading
from collections.abc import Collection, Iterable
from datetime import datetime
from urllib.parse import urlsplit

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from config.celery import task_send
from config.dates import iso_utc
from config.errors import Conflict, ValidationFailed
from config.netaddr import is_public_address
from marketplace.models import (
    DeliveryStatus,
    Event,
    EventType,
    Organization,
    WebhookDelivery,
    WebhookEndpoint,
)
from marketplace.rules import display_name_clean
from marketplace.services.audit import audit_changes, audit_record
from marketplace.services.suspension import (
    organization_active_check,
    organization_unsuspended_lock,
)

__all__ = [
    "SIGNATURE_HEADER",
    "MAX_ENDPOINTS",
    "UnsafeAddress",
    "webhook_signature",
    "webhook_address_check",
    "webhook_url_resolve",
    "webhook_url_for_audit",
    "webhook_endpoint_create",
    "webhook_endpoint_update",
    "webhook_endpoint_rotate_secret",
    "webhook_endpoint_delete",
    "webhook_endpoint_secrets",
    "webhook_deliveries_create",
    "webhook_deliveries_create_many",
    "webhook_delivery_resend",
    "webhook_deliveries_release_held",
]

SIGNATURE_HEADER = "Switchyard-Signature"
MAX_ENDPOINTS = 16  # per organisation
_SECRET_PREFIX = "whsec_"


class UnsafeAddress(ValidationFailed):
    default_code = "webhook_url_unsafe"


def webhook_signature(*, payload: bytes, secrets_: Iterable[str], timestamp: int) -> str:
    """t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>"> (one v1 per secret that signs now)."""
    signed = b"%d." % timestamp + payload
    parts = [f"t={timestamp}"]
    for secret in secrets_:
        parts.append("v1=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest())
    return ",".join(parts)


def webhook_address_check(address: str) -> None:
    """Raise UnsafeAddress unless `address` is a public unicast address (or insecure is on)."""
    ipaddress.ip_address(address)  # a ValueError for what is no address at all, as before
    if settings.WEBHOOK_ALLOW_INSECURE:
        return
    if not is_public_address(address):
        raise UnsafeAddress(
            f"Webhook URLs must reach a public address; {address} is not one.", field="url"
        )


def _split(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    allowed = ("https", "http") if settings.WEBHOOK_ALLOW_INSECURE else ("https",)
    if scheme not in allowed:
        raise ValidationFailed(
            "A webhook URL must start with https://.", code="webhook_url_scheme", field="url"
        )
    if parts.username or parts.password:
        raise ValidationFailed(
            "A webhook URL may not carry a user name or password.",
            code="webhook_url_invalid",
            field="url",
        )
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise ValidationFailed(
            "The URL's port is invalid.", code="webhook_url_invalid", field="url"
        ) from None
    if not parts.hostname:
        raise ValidationFailed("The URL has no host.", code="webhook_url_invalid", field="url")
    return scheme, parts.hostname, port


def _getaddrinfo_within(host: str, port: int, timeout: float) -> list:
    """socket.getaddrinfo given at most `timeout` seconds. The system resolver takes no
    timeout of ours (a dead name server can hold it for minutes), so it runs in a daemon
    thread, which is left to finish on its own if it outlasts the wait."""
    answer: dict = {}

    def lookup() -> None:
        try:
            answer["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which re-raises it
            answer["error"] = exc

    thread = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    thread.start()
    thread.join(max(timeout, 0))
    if thread.is_alive():
        raise TimeoutError(f"no DNS answer within {timeout:g} s")
    if "error" in answer:
        raise answer["error"]
    return answer["infos"]


def webhook_url_resolve(
    url: str, *, timeout: float | None = None
) -> tuple[str, str, int, list[str]]:
    """(scheme, host, port, addresses): every address the host resolves to, each one checked.

    All of them must be safe, not only the first: which one is used is not up to us. The
    lookup takes at most `timeout` seconds (default WEBHOOK_TIMEOUT), so a hung resolver cannot
    hold a request or a sender's try past its deadline.
    """
    scheme, host, port = _split(url)
    if timeout is None:
        timeout = settings.WEBHOOK_TIMEOUT
    try:
        infos = _getaddrinfo_within(host, port, timeout)
    except TimeoutError:
        raise ValidationFailed(
            f"The host {host!r} did not resolve within {timeout:g} s.",
            code="webhook_url_unresolvable",
            field="url",
        ) from None
    except (socket.gaierror, UnicodeError) as exc:
        raise ValidationFailed(
            f"The host {host!r} does not resolve ({exc}).",
            code="webhook_url_unresolvable",
            field="url",
        ) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for address in addresses:
        webhook_address_check(address)
    return scheme, host, port, addresses


def _event_types_clean(event_types: list[str]) -> list[str]:
    unknown = sorted(set(event_types) - set(EventType.values))
    if unknown:
        raise ValidationFailed(
            f"Unknown event type {unknown[0]!r}.", code="invalid_event_type", field="event_types"
        )
    return sorted(set(event_types))


def _new_secret() -> str:
    return _SECRET_PREFIX + secrets.token_urlsafe(32)


@transaction.atomic
def webhook_endpoint_create(
    *,
    organization: Organization,
    url: str,
    event_types: list[str],
    description: str = "",
    enabled: bool = True,
    created_by: AbstractBaseUser | None = None,
    withheld_families: Collection[str] = (),
) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint; returns it with its signing secret (shown once). Refused (403
    organization_suspended) while staff suspend the organisation.

    `withheld_families`: the event families the caller may not see (the API's
    event_families_hidden), never sent to it: the caller has been refused any explicit type
    of them, and its "every type" means every type it may see."""
    description = display_name_clean(
        description, what="A webhook endpoint", part="description", field="description",
        blank_ok=True,
    )  # fmt: skip
    webhook_url_resolve(url)
    # Counted under the organisation's row lock, so two requests cannot both pass the limit;
    # refused if staff suspended it (one suspending it meanwhile waits for this).
    organization_unsuspended_lock(organization_id=organization.pk)
    if WebhookEndpoint.objects.filter(organization=organization).count() >= MAX_ENDPOINTS:
        raise ValidationFailed(
            f"An organisation may have at most {MAX_ENDPOINTS} webhook endpoints.",
            code="too_many_endpoints",
        )
    secret = _new_secret()
    endpoint = WebhookEndpoint.objects.create(
        organization=organization,
        url=url,
        description=description,
        event_types=_event_types_clean(event_types),
        withheld_event_families=sorted(set(withheld_families)),
        enabled=enabled,
        secret=secret,
        created_by=created_by,
    )
    _audit(endpoint, "webhook_endpoint.create", {"after": _settings(endpoint)})
    return endpoint, secret


@transaction.atomic
def webhook_endpoint_update(
    *,
    endpoint: WebhookEndpoint,
    url: str | None = None,
    event_types: list[str] | None = None,
    description: str | None = None,
    enabled: bool | None = None,
    withheld_families: Collection[str] = (),
) -> WebhookEndpoint:
    """Change what is given. Enabling again starts the failure clock afresh. Refused (403
    organization_suspended) while staff suspend the organisation, as is rotating its secret.

    `withheld_families` (the caller's unseen families, as for webhook_endpoint_create) are
    what the endpoint withholds from now on when the caller sets its event_types, and are
    added to what it withholds when the caller changes its URL: a caller can widen what an
    endpoint gets only to what it may see itself."""
    # A new URL is looked up before the row is locked: the sender records its tries under that
    # lock, and a slow name server must not hold it.
    checked = url is not None and url != endpoint.url
    if checked:
        webhook_url_resolve(url)
    # The organisation's row before the endpoint's, as a lift takes them.
    organization_active_check(organization_id=endpoint.organization_id)
    locked = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    before = _settings(locked)
    if url is not None and url != locked.url:
        if not checked:  # the row changed meanwhile, away from the URL given
            webhook_url_resolve(url)
        locked.url = url
        _withhold(locked, set(locked.withheld_event_families) | set(withheld_families))
    if event_types is not None:
        locked.event_types = _event_types_clean(event_types)
        _withhold(locked, set(withheld_families))
    if description is not None:
        locked.description = display_name_clean(
            description, what="A webhook endpoint", part="description", field="description",
            blank_ok=True,
        )  # fmt: skip
    if enabled is not None and enabled != locked.enabled:
        locked.enabled = enabled
        locked.failing_since = None
        locked.disabled_reason = "" if enabled else "Disabled by the organisation."
        if enabled:
            # What waited while it was off is retried from now, as if it were new: counted
            # from their events' time, the first failure could disable it again at once.
            WebhookDelivery.objects.filter(endpoint=locked, status=DeliveryStatus.PENDING).update(
                retry_from=timezone.now()
            )
    locked.save()
    changes = audit_changes(before, _settings(locked))
    if changes["after"]:
        _audit(locked, "webhook_endpoint.update", changes)
    return locked


# How many replaced secrets may sign at once, each in its own overlap.
PREVIOUS_SECRETS_MAX = 4


@transaction.atomic
def webhook_endpoint_rotate_secret(
    *,
    endpoint: WebhookEndpoint,
    expire_previous: bool = False,
    now: datetime | None = None,
    withheld_families: Collection[str] = (),
) -> tuple[WebhookEndpoint, str]:
    """A new secret signs from now on; the one it replaces also signs for
    WEBHOOK_SECRET_OVERLAP, and earlier ones until their own overlaps end, so each secret a
    receiver was promised keeps its promise. expire_previous (a leaked secret) stops every
    replaced secret now. `withheld_families` (the caller's unseen families) are added to what
    the endpoint withholds: whoever holds the new secret can read what it signs."""
    now = now or timezone.now()
    organization_active_check(organization_id=endpoint.organization_id)  # as in the update
    locked = WebhookEndpoint.objects.select_for_update().get(pk=endpoint.pk)
    kept = [] if expire_previous else locked.previous_secrets_signing(now)
    if len(kept) >= PREVIOUS_SECRETS_MAX:
        raise Conflict(
            f"{len(kept)} replaced secrets still sign; the oldest stops at "
            f"{kept[0][1].isoformat()}. Rotate then, or rotate with expire_previous to stop "
            "every replaced secret now.",
            code="too_many_signing_secrets",
        )
    if not expire_previous and settings.WEBHOOK_SECRET_OVERLAP:
        kept.append((locked.secret, now + settings.WEBHOOK_SECRET_OVERLAP))
    secret = _new_secret()
    locked.previous_secrets = [
        {"secret": kept_secret, "expires_at": iso_utc(until)} for kept_secret, until in kept
    ]
    locked.secret = secret
    withheld = set(locked.withheld_event_families) | set(withheld_families)
    narrowed = _withhold(locked, withheld)
    locked.save(update_fields=["secret", "previous_secrets", "updated_at", *narrowed])
    # The secrets themselves are never in the audit log.
    _audit(
        locked,
        "webhook_endpoint.rotate_secret",
        {
            "after": {
                "expire_previous": expire_previous,
                "previous_secrets_expire_at": [iso_utc(until) for _, until in kept],
                **({"withheld_event_families": sorted(withheld)} if narrowed else {}),
            }
        },
    )
    return locked, secret


@transaction.atomic
def webhook_endpoint_delete(*, endpoint: WebhookEndpoint) -> None:
    """Deliveries still pending for it are dropped with it."""
    WebhookEndpoint.objects.filter(pk=endpoint.pk).delete()
    _audit(endpoint, "webhook_endpoint.delete", {"before": _settings(endpoint)})


def _withhold(endpoint: WebhookEndpoint, families: set[str]) -> list[str]:
    """Set what the (locked) endpoint withholds; what it withholds newly and was still to be
    sent is failed, not sent to a URL or under a secret its changer chose. Returns the fields
    to save."""
    added = families - set(endpoint.withheld_event_families)
    if sorted(families) == endpoint.withheld_event_families:
        return []
    endpoint.withheld_event_families = sorted(families)
    if added:
        of_added = Q()
        for prefix in added:
            of_added |= Q(event__type__startswith=prefix)
        WebhookDelivery.objects.filter(
            of_added, endpoint=endpoint, status=DeliveryStatus.PENDING
        ).update(status=DeliveryStatus.FAILED, next_attempt_at=None)
    return ["withheld_event_families"]


def _settings(endpoint: WebhookEndpoint) -> dict:
    return {
        "url": webhook_url_for_audit(endpoint.url),
        "event_types": list(endpoint.event_types),
        "withheld_event_families": list(endpoint.withheld_event_families),
        "description": endpoint.description,
        "enabled": endpoint.enabled,
    }


def webhook_url_for_audit(url: str) -> str:
    """The URL as the audit log keeps it: its origin and a digest of the whole. A URL may carry
    a secret in its path or query (chat services' webhook URLs do), and the log is append-only
    and read with any read key, which may not read the endpoints themselves; the digest still
    shows that, and when, the URL changed."""
    parts = urlsplit(url)
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/… (sha256:{digest})"


def _audit(endpoint: WebhookEndpoint, action: str, changes: dict) -> None:
    audit_record(
        organization_id=endpoint.organization_id,
        action=action,
        object_type="webhook_endpoint",
        object_id=endpoint.public_id,
        changes=changes,
    )


def webhook_endpoint_secrets(endpoint: WebhookEndpoint, *, now: datetime) -> list[str]:
    """The secrets that sign now: the current one, and each replaced one in its overlap."""
    return [endpoint.secret] + [s for s, _ in endpoint.previous_secrets_signing(now)]


# An organisation's enabled endpoints, the event types each wants (none: every type) and the
# families it withholds whatever it wants.
_SUBSCRIBED_SQL = """
SELECT id, ARRAY(SELECT jsonb_array_elements_text(coalesce(event_types, '[]'::jsonb))),
    ARRAY(SELECT jsonb_array_elements_text(coalesce(withheld_event_families, '[]'::jsonb)))
FROM marketplace_webhookendpoint WHERE organization_id = %s AND enabled
"""


def webhook_deliveries_create(*, event: Event) -> list[WebhookDelivery]:
    """The event's deliveries, one per enabled endpoint that wants its type (in the event's
    transaction); each endpoint's sender is kicked once that commits."""
    return webhook_deliveries_create_many(events=[event])


def webhook_deliveries_create_many(*, events: list[Event]) -> list[WebhookDelivery]:
    """webhook_deliveries_create for several saved events of one organisation (a
    reservation's batched moves), reading its endpoints once."""
    if not events:
        return []
    with connection.cursor() as cur:  # on every event: a plain read, not an ORM query
        cur.execute(_SUBSCRIBED_SQL, [events[0].organization_id])
        endpoints = cur.fetchall()
    deliveries = [
        WebhookDelivery(
            endpoint_id=endpoint_id,
            event=event,
            event_created_at=event.created_at,
            retry_from=event.created_at,
            next_attempt_at=event.created_at,
        )
        for event in events
        for endpoint_id, event_types, withheld in endpoints
        if (not event_types or event.type in event_types)
        and not event.type.startswith(tuple(withheld))
    ]
    if not deliveries:
        return []
    deliveries = WebhookDelivery.objects.bulk_create(deliveries)
    _kick_on_commit(sorted({delivery.endpoint_id for delivery in deliveries}))
    return deliveries


@transaction.atomic
def webhook_delivery_resend(*, delivery: WebhookDelivery) -> WebhookDelivery:
    """Send the event again now (whatever became of it), as the next of its endpoint's.

    Refused (409 endpoint_disabled) while the endpoint is disabled: nothing would send it.
    """
    # The endpoint before the delivery, as the sender locks them: it cannot be disabled (and
    # its pending deliveries failed) between this check and the resend.
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=delivery.endpoint_id)
    if not endpoint.enabled:
        raise Conflict(
            f"The endpoint {endpoint.public_id} is disabled, so nothing would be sent: enable "
            "it first, then resend.",
            code="endpoint_disabled",
        )
    if delivery.event.type in endpoint.withheld_event_types:
        raise Conflict(
            f"The endpoint {endpoint.public_id} does not receive {delivery.event.type} events: "
            "what it gets, its URL or its secret was set by a caller who may not see them. "
            "Set its event_types as one who may (an owner or admin signed in), then resend.",
            code="event_type_withheld",
        )
    locked = WebhookDelivery.objects.select_for_update().get(pk=delivery.pk)
    now = timezone.now()
    locked.status = DeliveryStatus.PENDING
    locked.retry_from = locked.next_attempt_at = now
    locked.save(update_fields=["status", "retry_from", "next_attempt_at"])
    audit_record(
        organization_id=endpoint.organization_id,
        action="webhook_delivery.resend",
        object_type="webhook_delivery",
        object_id=locked.public_id,
    )
    _kick_on_commit([locked.endpoint_id])
    return locked


def webhook_deliveries_release_held(*, organization_id: int) -> int:
    """Staff lifted the organisation's suspension (in its transaction): what its endpoints held
    meanwhile is retried from now as new deliveries are (30 s, 1 min, …, for WEBHOOK_RETRY_FOR
    from the lift), and their failure clocks start afresh, as enabling an endpoint does: the
    time it was suspended counts against none of them. Sent once this commits, oldest event
    first. Returns how many deliveries were due."""
    endpoint_ids = list(
        WebhookEndpoint.objects.select_for_update(no_key=True)  # the sender's lock, first
        .filter(organization_id=organization_id, enabled=True)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if not endpoint_ids:
        return 0
    now = timezone.now()
    WebhookEndpoint.objects.filter(pk__in=endpoint_ids).update(failing_since=None)
    released = WebhookDelivery.objects.filter(
        endpoint_id__in=endpoint_ids, status=DeliveryStatus.PENDING
    ).update(retry_from=now, next_attempt_at=now)
    if released:
        _kick_on_commit(endpoint_ids)
    return released


def _kick_on_commit(endpoint_ids: list[int]) -> None:
    def kick():
        for endpoint_id in endpoint_ids:
            # A lost kick is found by the sweeper (marketplace.tasks.webhooks_sweep). With the
            # broker unreachable the sweeper sends the rest too: the request does not wait out
            # a hung Redis's timeout once per endpoint.
            if not task_send(
                "marketplace.tasks.webhook_endpoint_send",
                [endpoint_id],
                about=f"webhook endpoint {endpoint_id}",
                then="(the sweeper sends it)",
            ):
                break

    transaction.on_commit(kick)
