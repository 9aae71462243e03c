"""Sending webhook deliveries: one endpoint at a time, its oldest due event first.

- The sender of an endpoint holds a short lease on it (sending_until, claimed in one UPDATE), so
  two workers never send to the same endpoint at once and its deliveries go out in the order of
  their events' `created`; a worker that dies leaves a lease that lapses.
- Each try connects to an address the host resolved to, checked again now (no DNS rebinding:
  the request goes to the address that was checked, the next one if it refuses, with the host
  name, in its ASCII form, in the Host header and in TLS's SNI and certificate check), follows
  no redirect, and keeps at most EXCERPT_BYTES of the answer. The whole try (the DNS lookup,
  connect, TLS, request, the answer's status, headers and excerpt) has WEBHOOK_TIMEOUT, however
  slowly a resolver or a receiver answers; the lease is derived from it and SEND_BUDGET, so it
  never lapses while a try is in flight. A sender releases only its own lease. No database
  transaction is open while it waits.
- What a receiver answers is stored as PostgreSQL text can hold it (a NUL becomes U+FFFD), and
  a try is recorded even if its answer cannot be: one bad answer never leaves a delivery
  unrecorded (and so sent again at once, for ever).
- A 2xx is success. Anything else is retried with exponential backoff (its tries counted from
  the event, or the resend) until WEBHOOK_RETRY_FOR after it, the last try on that deadline; an
  endpoint whose deliveries have failed without a success for that long is disabled and its
  owners and admins e-mailed.
- One call sends for at most SEND_BUDGET, then hands over (a slow endpoint gets a fair share
  of the webhooks queue, not all of it).
"""

import dataclasses
import http.client
import io
import json
import logging
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from django.conf import settings
from django.db import DataError, connection, transaction
from django.db.models import F
from django.utils import timezone

from config.errors import ValidationFailed
from marketplace.mail import mail_send_on_commit, portal_link
from marketplace.models import (
    DeliveryStatus,
    Membership,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
)
from marketplace.serializers import EventOutput
from marketplace.services.organizations import MANAGER_ROLES
from marketplace.services.webhooks import (
    SIGNATURE_HEADER,
    webhook_address_check,
    webhook_endpoint_secrets,
    webhook_signature,
    webhook_url_resolve,
)

__all__ = [
    "EXCERPT_BYTES",
    "SEND_BUDGET",
    "Outcome",
    "webhook_post",
    "webhook_backoff",
    "webhook_endpoint_send",
    "webhook_endpoints_due",
]

logger = logging.getLogger(__name__)

EXCERPT_BYTES = 1000
SEND_BUDGET = timedelta(seconds=30)
_USER_AGENT = "Switchyard-Webhooks/1"


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    status: int | None
    excerpt: str
    error: str
    address: str | None
    duration_ms: int


def webhook_post(*, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Outcome:
    """POST `body` to `url` once, on a checked address; never raises for network trouble.

    `timeout` bounds the whole try, from connecting to the last byte of the excerpt.
    """
    started = time.monotonic()
    deadline = started + timeout
    address = None

    def outcome(*, status=None, excerpt="", error="") -> Outcome:
        return Outcome(
            succeeded=status is not None and 200 <= status < 300,
            status=status,
            excerpt=excerpt,
            error=error[:500],
            address=address,
            duration_ms=int((time.monotonic() - started) * 1000),
        )

    try:
        # The lookup is part of the try: a hung resolver cannot hold it past its deadline.
        scheme, host, port, addresses = webhook_url_resolve(url, timeout=timeout)
    except ValidationFailed as exc:
        return outcome(error=exc.message)
    # One parse for host, port and target: the one webhook_url_resolve checked.
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    # Each checked address in turn until one answers, as a browser would: one dead address of
    # several (a load balancer's, an IPv6 one without a route) must not fail every try.
    sock, failures = None, []
    for address in addresses:  # the attempt records the last one tried
        try:
            sock = socket.create_connection((address, port), timeout=_time_left(deadline))
            break
        except OSError as exc:  # a TimeoutError too, once the deadline has passed
            failures.append(f"{address}: {exc}")
    if sock is None:
        return outcome(error="could not connect to " + "; ".join(failures))
    try:
        # The peer is the address that was checked; check what we are actually talking to.
        address = sock.getpeername()[0]
        webhook_address_check(address)
        # The name as DNS has it (IDNA, xn--…): a header cannot carry пример.рф.
        host = host.encode("idna").decode("ascii")
        if scheme == "https":
            sock.settimeout(_time_left(deadline))  # bounds the whole handshake
            context = ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPConnection(host, port)
        conn.sock = _DeadlineSocket(sock, deadline)
        conn.putrequest("POST", target, skip_host=True, skip_accept_encoding=True)
        default_port = 443 if scheme == "https" else 80
        authority = f"[{host}]" if ":" in host else host  # an IPv6 literal keeps its brackets
        conn.putheader("Host", authority if port == default_port else f"{authority}:{port}")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        excerpt = response.read(EXCERPT_BYTES).decode("utf-8", "replace")
        error = "" if 200 <= response.status < 300 else f"HTTP {response.status}"
        if 300 <= response.status < 400:
            error += " (redirects are not followed)"
        return outcome(status=response.status, excerpt=excerpt, error=error)
    except ValidationFailed as exc:
        return outcome(error=exc.message)
    except TimeoutError:
        return outcome(error=f"timed out: no complete answer within {timeout:g} s")
    except (OSError, http.client.HTTPException, ssl.SSLError, UnicodeError) as exc:
        return outcome(error=f"{type(exc).__name__}: {exc}")
    finally:
        sock.close()


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class _DeadlineSocket:
    """The socket as http.client uses it (sendall, makefile, close), each send and receive
    given only what is left until `deadline`: a socket's own timeout is per call, so an answer
    trickled a byte at a time would otherwise hold the sender for ever. webhook_post closes
    the socket itself."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline

    def recv_into(self, buffer) -> int:
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)

    def sendall(self, data: bytes) -> None:
        self._sock.settimeout(_time_left(self._deadline))
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self))

    def close(self) -> None:
        pass


class _DeadlineReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket):
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._sock.recv_into(buffer)


def webhook_backoff(attempts: int) -> timedelta:
    """After the n-th failed try: 30 s, 1 min, 2 min, … doubling, at most 6 hours."""
    return timedelta(seconds=min(30 * 2 ** max(attempts - 1, 0), 6 * 3600))


def _lease() -> timedelta:
    """How long a claim holds: twice the longest a sender keeps an endpoint (SEND_BUDGET, then
    one last try of at most WEBHOOK_TIMEOUT), so it cannot lapse while a try is in flight."""
    return 2 * (SEND_BUDGET + timedelta(seconds=settings.WEBHOOK_TIMEOUT))


# Not while its organisation is suspended by staff: its deliveries wait, due, until it is lifted.
_CLAIM_SQL = """
UPDATE marketplace_webhookendpoint e SET sending_until = %s
WHERE e.id = %s AND e.enabled AND (e.sending_until IS NULL OR e.sending_until < %s)
  AND NOT EXISTS (SELECT FROM marketplace_organization o
                  WHERE o.id = e.organization_id AND o.suspended_at IS NOT NULL)
RETURNING e.id
"""


def _claim(endpoint_id: int, now: datetime) -> datetime | None:
    """The lease taken on the endpoint (its sending_until), or None if it is not ours."""
    lease = now + _lease()
    with connection.cursor() as cur:
        cur.execute(_CLAIM_SQL, [lease, endpoint_id, now])
        return lease if cur.fetchone() is not None else None


def _release(endpoint_id: int, lease: datetime) -> None:
    # Only our own: had it lapsed and another sender claimed the endpoint, that lease is theirs.
    WebhookEndpoint.objects.filter(pk=endpoint_id, sending_until=lease).update(sending_until=None)


def _next_due(endpoint_id: int, now: datetime) -> WebhookDelivery | None:
    # Asked before each try: a suspension committed while the sender holds its claim stops it
    # at the next delivery, not once its SEND_BUDGET is spent.
    return (
        WebhookDelivery.objects.filter(
            endpoint_id=endpoint_id,
            status=DeliveryStatus.PENDING,
            next_attempt_at__lte=now,
            endpoint__organization__suspended_at__isnull=True,
        )
        .select_related("event", "event__organization", "endpoint")
        .order_by("event_created_at", "id")
        .first()
    )


def webhook_endpoint_send(*, endpoint_id: int) -> dict:
    """Send the endpoint's due deliveries, oldest event first, for up to SEND_BUDGET.

    Returns {"sent": n, "failed": n, "more": bool}: `more` when due work is left (the task
    queues itself again).
    """
    started = timezone.now()
    lease = _claim(endpoint_id, started)
    if lease is None:
        return {"sent": 0, "failed": 0, "more": False}  # taken, disabled or suspended
    sent = failed = 0
    more = False
    try:
        while True:
            now = timezone.now()
            delivery = _next_due(endpoint_id, now)
            if delivery is None:
                break
            if now - started >= SEND_BUDGET:
                more = True
                break
            endpoint = delivery.endpoint
            body = json.dumps(EventOutput(delivery.event).data, separators=(",", ":")).encode()
            timestamp = int(time.time())
            headers = {
                "Content-Type": "application/json",
                "User-Agent": _USER_AGENT,
                SIGNATURE_HEADER: webhook_signature(
                    payload=body,
                    secrets_=webhook_endpoint_secrets(endpoint, now=now),
                    timestamp=timestamp,
                ),
                "Switchyard-Event-Id": delivery.event.public_id,
                "Switchyard-Delivery-Id": delivery.public_id,
            }
            result = webhook_post(
                url=endpoint.url, body=body, headers=headers, timeout=settings.WEBHOOK_TIMEOUT
            )
            try:
                still_enabled = _record_try(delivery, result, at=now)
            except (WebhookEndpoint.DoesNotExist, WebhookDelivery.DoesNotExist):
                break  # deleted while we were sending: nothing left to record
            if result.succeeded:
                sent += 1
            else:
                failed += 1
            if not still_enabled:
                break
    finally:
        _release(endpoint_id, lease)
    return {"sent": sent, "failed": failed, "more": more}


def _storable(text: str) -> str:
    """`text` as a PostgreSQL text column can hold it: no NUL, nothing UTF-8 cannot encode."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def _record_try(delivery: WebhookDelivery, result: Outcome, *, at: datetime) -> bool:
    """_record, and if the database refuses what the receiver answered, the try without it: an
    unrecorded try would be sent again at once, for ever, holding up the endpoint's others."""
    try:
        return _record(delivery, result, at=at)
    except DataError:
        logger.exception("webhook delivery %s: the try's answer could not be stored", delivery.pk)
    escaped = dataclasses.replace(
        result,
        excerpt=ascii(result.excerpt)[1:-1][:EXCERPT_BYTES],  # printable ASCII only
        error=("the answer could not be stored as sent: " + ascii(result.error))[:500],
    )
    return _record(delivery, escaped, at=at)


@transaction.atomic
def _record(delivery: WebhookDelivery, result: Outcome, *, at: datetime) -> bool:
    """Record the try on the delivery and the endpoint; False if the endpoint is now disabled."""
    endpoint = WebhookEndpoint.objects.select_for_update().get(pk=delivery.endpoint_id)
    locked = WebhookDelivery.objects.select_for_update().get(pk=delivery.pk)
    error = _storable(result.error)[:500]
    WebhookAttempt.objects.create(
        delivery=locked,
        at=at,
        duration_ms=result.duration_ms,
        succeeded=result.succeeded,
        response_status=result.status,
        response_excerpt=_storable(result.excerpt)[:EXCERPT_BYTES],
        error=error,
        address=result.address,
    )
    locked.attempts = F("attempts") + 1
    locked.last_attempt_at = at
    locked.last_response_status = result.status
    locked.last_error = error
    now = timezone.now()
    if result.succeeded:
        locked.status = DeliveryStatus.SUCCEEDED
        locked.next_attempt_at = None
        endpoint.failing_since = None
        endpoint.last_success_at = at
    else:
        # Failing since the oldest delivery that has not got through, but not before the last
        # success.
        since = locked.retry_from
        if endpoint.last_success_at and endpoint.last_success_at > since:
            since = endpoint.last_success_at
        endpoint.failing_since = min(endpoint.failing_since or since, since)
        deadline = locked.retry_from + settings.WEBHOOK_RETRY_FOR
        if now >= deadline:
            locked.status = DeliveryStatus.FAILED
            locked.next_attempt_at = None
        else:  # the last try falls on the deadline itself
            # The tries since the event or the resend (this one too), not every try the
            # delivery ever had: a resent delivery is retried as a new one would be.
            tries = WebhookAttempt.objects.filter(delivery=locked, at__gte=locked.retry_from)
            locked.next_attempt_at = min(now + webhook_backoff(tries.count()), deadline)
    locked.save()
    disable = (
        not result.succeeded
        and endpoint.enabled
        and now - endpoint.failing_since >= settings.WEBHOOK_RETRY_FOR
    )
    if disable:
        _disable(endpoint, now=now)
    endpoint.save(
        update_fields=[
            "failing_since",
            "last_success_at",
            "enabled",
            "disabled_reason",
            "updated_at",
        ]
    )
    return endpoint.enabled


def _disable(endpoint: WebhookEndpoint, *, now: datetime) -> None:
    hours = int(settings.WEBHOOK_RETRY_FOR.total_seconds() // 3600)
    endpoint.enabled = False
    endpoint.disabled_reason = (
        f"Every delivery failed from {endpoint.failing_since:%Y-%m-%d %H:%M} UTC for "
        f"{hours} hours; disabled at {now:%Y-%m-%d %H:%M} UTC."
    )
    # What was waiting for it will not be sent; a resend after enabling it again will.
    WebhookDelivery.objects.filter(endpoint=endpoint, status=DeliveryStatus.PENDING).update(
        status=DeliveryStatus.FAILED, next_attempt_at=None
    )
    recipients = list(
        Membership.objects.filter(
            organization_id=endpoint.organization_id,
            role__in=MANAGER_ROLES,
            user__is_active=True,  # not an account deactivated since
        )
        .exclude(user__email="")
        .values_list("user__email", flat=True)
    )
    logger.warning("webhook endpoint %s disabled: %s", endpoint.public_id, endpoint.disabled_reason)
    if recipients:
        # Its origin, not its URL: a URL may carry a secret (chat services' webhook URLs do),
        # and the message waits in the broker.
        url = urlsplit(endpoint.url)
        message = (
            f"Switchyard stopped sending events to your webhook endpoint "
            f"{url.scheme}://{url.netloc.rpartition('@')[2]} "
            f"({endpoint.public_id}). {endpoint.disabled_reason}\n\nFix the endpoint, enable it "
            "again in the portal or through the API, and resend what it missed:\n"
            f"{portal_link('portal:webhook', public_id=endpoint.public_id)}\n"
        )
        mail_send_on_commit(
            subject="Switchyard: your webhook endpoint was disabled",
            body=message,
            recipients=recipients,
        )


def webhook_endpoints_due(*, now: datetime | None = None, limit: int = 500) -> list[int]:
    """Enabled endpoints with a due delivery and no live lease (for the sweeper), of
    organisations not suspended."""
    now = now or timezone.now()
    return list(
        WebhookDelivery.objects.filter(
            status=DeliveryStatus.PENDING,
            next_attempt_at__lte=now,
            endpoint__enabled=True,
            endpoint__organization__suspended_at__isnull=True,
        )
        .exclude(endpoint__sending_until__gte=now)
        .values_list("endpoint_id", flat=True)
        .distinct()
        .order_by("endpoint_id")[:limit]
    )
