"""The Switchyard API client.

    from switchyard import Client
    sy = Client(api_key="sy_live_…", base_url="https://api.switchyard.example")
    for offer in sy.availability.search(gpu_model="h100-sxm-80gb", gpu_count=8, end="…"):
        ...
    reservation = sy.reservations.create(quote=sy.quotes.create(...).id)

- Every POST carries an Idempotency-Key (a UUID, or yours), the same on every retry, so a
  retried request is never done twice.
- Retries (up to max_retries, with exponential backoff): 409 idempotency_key_in_use, 429 (after
  Retry-After), 502/503/504 and connection errors.
- Lists are iterators that follow the cursor pages.
- Errors are raised as the classes of switchyard.errors, by the error's `type`.
"""

# Resources have a method named `list`: annotations must not be evaluated in class bodies.
from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx

from switchyard import __version__
from switchyard.errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ReservationEndedError,
    WaitTimeoutError,
    error_from_response,
)
from switchyard.models import (
    ApiKey,
    ApiObject,
    AuditEntry,
    Event,
    GpuModel,
    Offer,
    Quote,
    Reservation,
    Site,
    SshKey,
    WebhookDelivery,
    WebhookEndpoint,
)

__all__ = ["Client", "EventFeed", "OPERATIONS"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
_RETRY_STATUSES = {502, 503, 504}


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


class Client:
    def __init__(
        self,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ):
        _check_api_key(api_key)
        self.base_url = _check_base_url(base_url).rstrip("/")
        self.max_retries = max_retries
        self.backoff = backoff
        self._http = httpx.Client(
            base_url=self.base_url + "/api/v1/",
            headers={
                "Authorization": f"Bearer {api_key}",
                "User-Agent": f"switchyard-python/{__version__}",
                "Accept": "application/json",
            },
            timeout=timeout,
            follow_redirects=False,
            transport=transport,
        )
        self.gpu_models = _GpuModels(self)
        self.sites = _Sites(self)
        self.availability = _Availability(self)
        self.quotes = _Quotes(self)
        self.reservations = _Reservations(self)
        self.api_keys = _ApiKeys(self)
        self.ssh_keys = _SshKeys(self)
        self.resale = _Resale(self)
        self.organization = _Organization(self)
        self.events = _Events(self)
        self.webhook_endpoints = _WebhookEndpoints(self)
        self.webhook_deliveries = _WebhookDeliveries(self)
        self.audit_log = _AuditLog(self)
        self.billing = _Billing(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the one request path ----------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        json: Any = None,
        idempotency_key: str | None = None,
        raw: bool = False,
    ) -> Any:
        response = self._send(method, path, params=params, json=json,
                              idempotency_key=idempotency_key)  # fmt: skip
        if raw:
            return response
        if response.status_code == 204:
            return None
        try:
            return response.json()
        except ValueError:
            # A 2xx that is not the API's JSON: a web server or a proxy at the base URL.
            raise APIError(
                f"The answer from {response.url} is not JSON "
                f"({response.headers.get('Content-Type') or 'no Content-Type'}, HTTP "
                f"{response.status_code}): is {self.base_url} the Switchyard API's address?",
                status=response.status_code,
                body=response.text[:1000],
                request_id=response.headers.get("Request-Id"),
            ) from None

    def stream(self, path: str, params: dict | None = None) -> Iterator[bytes]:
        """A GET's body in chunks (the CSV exports), retried as any request until it starts."""
        response = self._send("GET", path, params=params, stream=True)
        try:
            yield from response.iter_bytes()
        except httpx.TransportError as exc:
            raise APIConnectionError(f"The download from {self.base_url} broke off: {exc}") from exc
        finally:
            response.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: dict | None = None,
        json: Any = None,
        idempotency_key: str | None = None,
        stream: bool = False,
    ) -> httpx.Response:
        """The one request path: a 2xx/3xx response, or the error raised after the retries."""
        headers = {}
        if method == "POST":
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        attempt = 0
        while True:
            request = self._http.build_request(
                method, path.lstrip("/"), params=_clean(params or {}), json=json, headers=headers
            )
            try:
                response = self._http.send(request, stream=stream)
                if stream and response.status_code >= 300:
                    response.read()  # the error body, then the connection goes back to the pool
                    response.close()
            except httpx.TransportError as exc:
                if attempt >= self.max_retries:
                    raise APIConnectionError(f"Could not reach {self.base_url}: {exc}") from exc
                self._sleep(attempt, None)
                attempt += 1
                continue
            if response.status_code < 300:
                return response
            if response.status_code < 400:
                # Redirects are not followed (a POST would be resent as a GET, or the key sent
                # to another host): the base URL is not the API's.
                location = response.headers.get("Location")
                to = f" to {location}" if location else ""
                raise APIError(
                    f"The API at {self.base_url} answered HTTP {response.status_code}, a "
                    f"redirect{to}: use the API's own address as the base URL.",
                    status=response.status_code,
                    request_id=response.headers.get("Request-Id"),
                )
            if method == "DELETE" and attempt > 0 and response.status_code == 404:
                # A retry of a delete whose first try arrived but whose answer did not: the
                # thing is gone, which is what was asked.
                return response
            body = _json_or_text(response)
            if attempt < self.max_retries and _retryable(response, body):
                self._sleep(attempt, response.headers.get("Retry-After"))
                attempt += 1
                continue
            raise error_from_response(
                response.status_code,
                body,
                request_id=response.headers.get("Request-Id"),
                retry_after=response.headers.get("Retry-After"),
            )

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        if retry_after is not None:
            try:
                time.sleep(min(float(retry_after), 60.0))
                return
            except ValueError:
                pass
        time.sleep(self.backoff * 2**attempt * (1 + random.random() / 4))

    def iterate(self, path: str, params: dict | None = None, cls=ApiObject) -> Iterator[Any]:
        """Every item of a list, following the `next` links: cursor pages, or a feed's pages
        (`after=`) until it says it is caught up (`has_more` false)."""
        for page in self.pages(path, params):
            items = page if isinstance(page, list) else page.get("results", [])
            yield from (cls(item) for item in items)

    def pages(self, path: str, params: dict | None = None) -> Iterator[Any]:
        """Each page of a list as the API sent it, following the `next` links (see iterate)."""
        page = self.request("GET", path, params=params)
        while True:
            yield page
            if isinstance(page, list):
                return
            next_url = page.get("next")
            if not next_url or page.get("has_more") is False:
                return
            query = _query(next_url)
            if not query.get("cursor") and not (query.get("after") and page.get("results")):
                # Fetching the same page again would never end.
                raise APIError(
                    f"A next link without a cursor or a new position: {next_url}",
                    status=200,
                    body=page,
                )
            page = self.request("GET", path, params={**(params or {}), **query})


def _check_api_key(api_key: str) -> None:
    """A key is sent in a header: printable ASCII without spaces (never echoed in the error)."""
    if not isinstance(api_key, str) or not all("!" <= c <= "~" for c in api_key):
        raise AuthenticationError(
            "The API key is malformed: a key is printable ASCII without spaces (sy_live_…)."
        )


def _check_base_url(base_url: str) -> str:
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError) as exc:
        raise ValueError(f"The base URL {base_url!r} is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(
            f"The base URL {base_url!r} is not an http(s) URL (https://switchyard.example)."
        )
    return base_url


def _query(url: str) -> dict[str, str | list[str]]:
    """A link's query, a parameter given more than once (?type=a&type=b) kept as a list."""
    values: dict[str, list[str]] = {}
    for key, value in httpx.URL(url).params.multi_items():
        values.setdefault(key, []).append(value)
    return {key: vs[0] if len(vs) == 1 else vs for key, vs in values.items()}


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _retryable(response: httpx.Response, body: Any) -> bool:
    if response.status_code == 429 or response.status_code in _RETRY_STATUSES:
        return True
    if response.status_code == 409 and isinstance(body, dict):
        return (body.get("error") or {}).get("code") == "idempotency_key_in_use"
    return False


class _Resource:
    def __init__(self, client: Client):
        self._client = client

    def _get(self, path, cls=ApiObject, **params):
        return cls(self._client.request("GET", path, params=params))

    def _post(self, path, body=None, cls=ApiObject, idempotency_key=None):
        return cls(
            self._client.request("POST", path, json=body or {}, idempotency_key=idempotency_key)
        )

    def _list(self, path, cls=ApiObject, **params):
        return self._client.iterate(path, params, cls)


class _GpuModels(_Resource):
    def list(self) -> Iterator[GpuModel]:
        return self._list("gpu-models", GpuModel)


class _Sites(_Resource):
    def list(self) -> Iterator[Site]:
        return self._list("sites", Site)

    def availability(self, slug: str, **params) -> ApiObject:
        return self._get(f"sites/{slug}/availability", **params)

    def zone_prices(self, zone: str, **params) -> ApiObject:
        """A price zone's power prices (a site's `price_zone`); start, end (default 48 h)."""
        return self._get(f"grid/zones/{zone}/prices", **params)


class _Availability(_Resource):
    def search(self, **params) -> Iterator[Offer]:
        """gpu_model, min_gpu_memory_gb, gpu_count, start, end, region, site, tier, term,
        max_price."""
        return self._list("availability", Offer, **params)


class _Quotes(_Resource):
    def create(self, *, idempotency_key: str | None = None, **body) -> Quote:
        return self._post("quotes", body, Quote, idempotency_key)

    def retrieve(self, quote_id: str) -> Quote:
        return self._get(f"quotes/{quote_id}", Quote)


# What Reservations.wait waits for, by its `until`.
_ENDED = frozenset({"completed", "cancelled", "failed", "preempted"})
WAIT_UNTIL: dict[str, frozenset[str]] = {"active": frozenset({"active"}), "ended": _ENDED}
# Statuses from which a reservation does not become active again.
_NEVER_ACTIVE = _ENDED | {"releasing"}


class _Reservations(_Resource):
    def list(self, **filters) -> Iterator[Reservation]:
        return self._list("reservations", Reservation, **filters)

    def create(self, *, idempotency_key: str | None = None, **body) -> Reservation:
        """From a quote (quote="quo_…") or directly (gpu_model, gpu_count, starts_at, …)."""
        return self._post("reservations", body, Reservation, idempotency_key)

    def retrieve(self, reservation_id: str) -> Reservation:
        return self._get(f"reservations/{reservation_id}", Reservation)

    def cancel(
        self,
        reservation_id: str,
        *,
        reason: str = "",
        expected_refund_fraction: str | None = None,
        idempotency_key=None,
    ):
        """Cancel or stop early. `expected_refund_fraction`: the `refund_fraction` that
        cancellation_terms showed; if the rule now gives less, ConflictError refund_changed and
        nothing changes."""
        body = {"reason": reason}
        if expected_refund_fraction is not None:
            body["expected_refund_fraction"] = str(expected_refund_fraction)
        return self._post(
            f"reservations/{reservation_id}/cancel", body, Reservation, idempotency_key
        )

    def extend(self, reservation_id: str, *, ends_at: str, idempotency_key=None) -> Reservation:
        return self._post(
            f"reservations/{reservation_id}/extend", {"ends_at": ends_at}, Reservation,
            idempotency_key,
        )  # fmt: skip

    def cancellation_terms(self, reservation_id: str) -> ApiObject:
        return self._get(f"reservations/{reservation_id}/cancellation-terms")

    def extension_terms(self, reservation_id: str, *, ends_at: str) -> ApiObject:
        return self._get(f"reservations/{reservation_id}/extension-terms", ends_at=ends_at)

    def telemetry(self, reservation_id: str, **params) -> ApiObject:
        return self._get(f"reservations/{reservation_id}/telemetry", **params)

    def wait(
        self,
        reservation_id: str,
        *,
        until: str = "active",
        timeout: float = 900.0,
        interval: float = 5.0,
        on_status=None,
    ) -> Reservation:
        """Poll until the reservation is active (until="active") or has ended (until="ended":
        completed, cancelled, failed or preempted), and return it. `on_status(reservation)`
        is called each time the status seen changes, the first one included.

        ReservationEndedError (a ConflictError) when it ends before it is active;
        WaitTimeoutError when `timeout` seconds pass first. Both carry the last reservation
        seen. Each poll is a GET, retried by the client like any other."""
        if until not in WAIT_UNTIL:
            raise ValueError(f"until must be one of {', '.join(WAIT_UNTIL)}, not {until!r}.")
        deadline = time.monotonic() + timeout
        seen = None
        while True:
            reservation = self.retrieve(reservation_id)
            if reservation.status != seen:
                seen = reservation.status
                if on_status is not None:
                    on_status(reservation)
            if reservation.status in WAIT_UNTIL[until]:
                return reservation
            if until == "active" and reservation.status in _NEVER_ACTIVE:
                reason = f" ({reservation.status_reason})" if reservation.status_reason else ""
                exc = ReservationEndedError(
                    f"{reservation_id} is {reservation.status}{reason}; it will not become active.",
                    code="reservation_ended",
                )
                exc.reservation = reservation
                raise exc
            left = deadline - time.monotonic()
            if left <= 0:
                exc = WaitTimeoutError(
                    f"{reservation_id} is still {reservation.status} after {timeout:g} s "
                    f"(it starts at {reservation.starts_at}).",
                    code="wait_timeout",
                )
                exc.reservation = reservation
                raise exc
            time.sleep(min(interval, left))


class _ApiKeys(_Resource):
    def list(self, **filters) -> Iterator[ApiKey]:
        return self._list("api-keys", ApiKey, **filters)

    def create(self, *, name: str, scopes: list[str] | None = None, idempotency_key=None):
        body = {"name": name, **({"scopes": scopes} if scopes else {})}
        return self._post("api-keys", body, ApiKey, idempotency_key)

    def revoke(self, key_id: str) -> ApiKey:
        return self._post(f"api-keys/{key_id}/revoke", None, ApiKey)


class _SshKeys(_Resource):
    def list(self) -> Iterator[SshKey]:
        return self._list("ssh-keys", SshKey)

    def create(self, *, name: str, public_key: str, idempotency_key=None) -> SshKey:
        return self._post(
            "ssh-keys", {"name": name, "public_key": public_key}, SshKey, idempotency_key
        )

    def retrieve(self, ssh_key_id: str) -> SshKey:
        return self._get(f"ssh-keys/{ssh_key_id}", SshKey)

    def delete(self, ssh_key_id: str) -> None:
        self._client.request("DELETE", f"ssh-keys/{ssh_key_id}")


class _Resale(_Resource):
    """Resold reserved time: your listings and sales (buy one with reservations.create(
    listing=…, gpu_count=…, starts_at=…, ends_at=…))."""

    def listings(self, **filters) -> Iterator[ApiObject]:
        return self._list("resale/listings", **filters)

    def create_listing(self, *, idempotency_key: str | None = None, **body) -> ApiObject:
        return self._post("resale/listings", body, idempotency_key=idempotency_key)

    def retrieve_listing(self, listing_id: str) -> ApiObject:
        return self._get(f"resale/listings/{listing_id}")

    def withdraw_listing(self, listing_id: str, *, idempotency_key=None) -> ApiObject:
        return self._post(
            f"resale/listings/{listing_id}/withdraw", {}, idempotency_key=idempotency_key
        )

    def sales(self) -> Iterator[ApiObject]:
        return self._list("resale/sales")


class _Organization(_Resource):
    def retrieve(self) -> ApiObject:
        return self._get("organization")

    def members(self, **filters) -> Iterator[ApiObject]:
        return self._list("organization/members", **filters)

    def update_member(self, member_id: str, *, role: str) -> ApiObject:
        return ApiObject(
            self._client.request("PATCH", f"organization/members/{member_id}", json={"role": role})
        )

    def remove_member(self, member_id: str) -> None:
        self._client.request("DELETE", f"organization/members/{member_id}")

    def invitations(self) -> Iterator[ApiObject]:
        return self._list("organization/invitations")

    def invite(self, *, email: str, role: str, idempotency_key=None) -> ApiObject:
        return self._post(
            "organization/invitations", {"email": email, "role": role},
            idempotency_key=idempotency_key,
        )  # fmt: skip

    def revoke_invitation(self, invitation_id: str) -> ApiObject:
        return self._post(f"organization/invitations/{invitation_id}/revoke")


class _Events(_Resource):
    def list(self, **filters) -> Iterator[Event]:
        """Newest first; filters type (str or list), created_after, created_before, object_id.
        With order="oldest" or after="evt_…": the forward feed (see poll)."""
        return self._list("events", Event, **filters)

    def poll(self, after: str | None = None, **filters) -> EventFeed:
        """The events committed after the event `after` (None: from the oldest kept, or from
        created_after), oldest first, until caught up. Pass the feed's `position` (the last
        event's id, or further on when filters skipped the rest) as `after` next time: an
        event that commits late still comes after it, so none is missed. Same filters as
        list."""
        params = {**_clean({"order": "oldest", "after": after}), **filters}
        return EventFeed(self._client, params)

    def retrieve(self, event_id: str) -> Event:
        return self._get(f"events/{event_id}", Event)


class EventFeed:
    """The forward feed's events, oldest first, until caught up (an iterator).

    `position` is where to continue (`after=` next time): the id of the last event given
    while the walk goes on, and once it has ended, the feed's head, past the events the
    filters skipped. A filtered poller that kept its last match instead would stand on an
    ever older event, one that retention deletes in time (then 404 event_not_found)."""

    def __init__(self, client: Client, params: dict):
        self._client = client
        self._params = params
        self.position: str | None = params.get("after")

    def __iter__(self) -> Iterator[Event]:
        for page in self._client.pages("events", self._params):
            for item in page.get("results", []):
                event = Event(item)
                self.position = event.id
                yield event
            if page.get("has_more") is False:
                # Caught up, every event given: the next link stands on the head.
                head = _query(page.get("next") or "").get("after")
                if isinstance(head, str) and head:
                    self.position = head


class _WebhookEndpoints(_Resource):
    def list(self) -> Iterator[WebhookEndpoint]:
        return self._list("webhook-endpoints", WebhookEndpoint)

    def create(self, *, url: str, event_types: list[str] | None = None, description: str = "",
               enabled: bool = True, idempotency_key=None) -> WebhookEndpoint:  # fmt: skip
        body = {"url": url, "event_types": event_types or [], "description": description,
                "enabled": enabled}  # fmt: skip
        return self._post("webhook-endpoints", body, WebhookEndpoint, idempotency_key)

    def retrieve(self, endpoint_id: str) -> WebhookEndpoint:
        return self._get(f"webhook-endpoints/{endpoint_id}", WebhookEndpoint)

    def update(self, endpoint_id: str, **changes) -> WebhookEndpoint:
        """url, event_types, description, enabled."""
        return WebhookEndpoint(
            self._client.request("PATCH", f"webhook-endpoints/{endpoint_id}", json=changes)
        )

    def delete(self, endpoint_id: str) -> None:
        self._client.request("DELETE", f"webhook-endpoints/{endpoint_id}")

    def rotate_secret(self, endpoint_id: str, *, expire_previous: bool = False) -> WebhookEndpoint:
        """A new secret; expire_previous (a leaked secret) stops the replaced ones now."""
        body = {"expire_previous": True} if expire_previous else None
        return self._post(f"webhook-endpoints/{endpoint_id}/rotate-secret", body, WebhookEndpoint)

    def deliveries(self, endpoint_id: str, **filters) -> Iterator[WebhookDelivery]:
        return self._list(f"webhook-endpoints/{endpoint_id}/deliveries", WebhookDelivery, **filters)


class _WebhookDeliveries(_Resource):
    def resend(self, delivery_id: str) -> WebhookDelivery:
        return self._post(f"webhook-deliveries/{delivery_id}/resend", None, WebhookDelivery)


class _AuditLog(_Resource):
    def list(self, **filters) -> Iterator[AuditEntry]:
        """Newest first; filters actor, action (a family ending in "."), object_id, times."""
        return self._list("audit-log", AuditEntry, **filters)


class _Billing(_Resource):
    def balance(self) -> ApiObject:
        return self._get("billing/balance")

    def update_settings(self, **settings) -> ApiObject:
        return ApiObject(self._client.request("PATCH", "billing/settings", json=settings))

    def ledger(self) -> Iterator[ApiObject]:
        return self._list("billing/ledger")

    def usage(self, *, since: str | None = None, until: str | None = None) -> Iterator[ApiObject]:
        return self._list("billing/usage", since=since, until=until)

    def usage_csv(self, *, since: str | None = None, until: str | None = None) -> Iterator[bytes]:
        """The usage export, streamed: bytes chunks of CSV."""
        return self._stream("billing/usage.csv", since=since, until=until)

    def ledger_csv(self, *, since: str | None = None, until: str | None = None) -> Iterator[bytes]:
        return self._stream("billing/ledger.csv", since=since, until=until)

    def _stream(self, path: str, **params) -> Iterator[bytes]:
        return self._client.stream(path, params)

    def invoices(self) -> Iterator[ApiObject]:
        return self._list("billing/invoices")

    def statement(self, *, year: int, month: int) -> ApiObject:
        """A month's statement (UTC): opening and closing balance, totals, usage."""
        return self._get(f"billing/statements/{year}-{month:02d}")

    def payment_methods(self) -> Iterator[ApiObject]:
        return self._list("billing/payment-methods")

    def attach_payment_method(self, *, payment_method: str, setup_intent: str = "",
                              idempotency_key=None) -> ApiObject:  # fmt: skip
        body = {"payment_method": payment_method, **({"setup_intent": setup_intent} if setup_intent else {})}  # fmt: skip
        return self._post("billing/payment-methods", body, idempotency_key=idempotency_key)

    def detach_payment_method(self, payment_method_id: str) -> None:
        self._client.request("DELETE", f"billing/payment-methods/{payment_method_id}")

    def set_default_payment_method(self, payment_method_id: str) -> ApiObject:
        return self._post(f"billing/payment-methods/{payment_method_id}/default")

    def create_setup_intent(self) -> ApiObject:
        return self._post("billing/payment-methods/setup-intent")

    def top_ups(self) -> Iterator[ApiObject]:
        return self._list("billing/top-ups")

    def top_up(self, *, amount: str, idempotency_key=None) -> ApiObject:
        return self._post("billing/top-ups", {"amount": amount}, idempotency_key=idempotency_key)


# Every operation of the API's OpenAPI schema (operationId) and the SDK method that performs
# it; tests/client/test_sdk_coverage.py fails when the schema has one that is not here.
OPERATIONS: dict[str, str] = {
    "gpu_models_list": "gpu_models.list",
    "sites_list": "sites.list",
    "sites_availability": "sites.availability",
    "zone_prices_list": "sites.zone_prices",
    "availability_search": "availability.search",
    "quotes_create": "quotes.create",
    "quotes_retrieve": "quotes.retrieve",
    "reservations_list": "reservations.list",
    "reservations_create": "reservations.create",
    "reservations_retrieve": "reservations.retrieve",
    "reservations_cancel": "reservations.cancel",
    "reservations_extend": "reservations.extend",
    "reservations_cancellation_terms": "reservations.cancellation_terms",
    "reservations_extension_terms": "reservations.extension_terms",
    "reservations_telemetry": "reservations.telemetry",
    "api_keys_list": "api_keys.list",
    "api_keys_create": "api_keys.create",
    "api_keys_revoke": "api_keys.revoke",
    "ssh_keys_list": "ssh_keys.list",
    "ssh_keys_create": "ssh_keys.create",
    "ssh_keys_retrieve": "ssh_keys.retrieve",
    "ssh_keys_destroy": "ssh_keys.delete",
    "resale_listings_list": "resale.listings",
    "resale_listings_create": "resale.create_listing",
    "resale_listings_retrieve": "resale.retrieve_listing",
    "resale_listings_withdraw": "resale.withdraw_listing",
    "resale_sales_list": "resale.sales",
    "organization_retrieve": "organization.retrieve",
    "organization_members_list": "organization.members",
    "organization_members_update": "organization.update_member",
    "organization_members_destroy": "organization.remove_member",
    "organization_invitations_list": "organization.invitations",
    "organization_invitations_create": "organization.invite",
    "organization_invitations_revoke": "organization.revoke_invitation",
    "events_list": "events.list",
    "events_retrieve": "events.retrieve",
    "webhook_endpoints_list": "webhook_endpoints.list",
    "webhook_endpoints_create": "webhook_endpoints.create",
    "webhook_endpoints_retrieve": "webhook_endpoints.retrieve",
    "webhook_endpoints_update": "webhook_endpoints.update",
    "webhook_endpoints_destroy": "webhook_endpoints.delete",
    "webhook_endpoints_rotate_secret": "webhook_endpoints.rotate_secret",
    "webhook_deliveries_list": "webhook_endpoints.deliveries",
    "webhook_deliveries_resend": "webhook_deliveries.resend",
    "audit_log_list": "audit_log.list",
    "billing_balance": "billing.balance",
    "billing_settings_update": "billing.update_settings",
    "billing_ledger": "billing.ledger",
    "billing_ledger_csv": "billing.ledger_csv",
    "billing_usage": "billing.usage",
    "billing_usage_csv": "billing.usage_csv",
    "billing_invoices": "billing.invoices",
    "billing_statement": "billing.statement",
    "billing_payment_methods": "billing.payment_methods",
    "billing_payment_method_attach": "billing.attach_payment_method",
    "billing_payment_method_detach": "billing.detach_payment_method",
    "billing_payment_method_set_default": "billing.set_default_payment_method",
    "billing_setup_intent_create": "billing.create_setup_intent",
    "billing_top_ups": "billing.top_ups",
    "billing_top_up_create": "billing.top_up",
}
