"""Errors, one class per error `type` of the API's error object (and one for the network).

Every API error carries the parsed fields: status, type, code, field, message, the raw body,
and request_id (the response's Request-Id, to quote when asking for help). Catch
SwitchyardError for all of them.
"""

from typing import Any

__all__ = [
    "SwitchyardError",
    "APIConnectionError",
    "APIError",
    "InvalidRequestError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ConflictError",
    "RateLimitError",
    "PaymentError",
    "ReservationEndedError",
    "WaitTimeoutError",
    "error_from_response",
]


class SwitchyardError(Exception):
    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        field: str | None = None,
        body: Any = None,
        request_id: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.field = field
        self.body = body
        self.request_id = request_id

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        code = f"{self.code}: " if self.code else ""
        return f"{code}{self.message}{where}"


class APIConnectionError(SwitchyardError):
    """The API could not be reached (after the retries)."""


class APIError(SwitchyardError):
    """api_error, or a response that is not the API's error shape (e.g. a 5xx from a proxy)."""


class InvalidRequestError(SwitchyardError):
    """invalid_request_error: bad input (400, 415, 422)."""


class AuthenticationError(SwitchyardError):
    """authentication_error: a missing, unknown or revoked key (401)."""


class PermissionDeniedError(SwitchyardError):
    """permission_error: the key's scope or the member's role does not allow this (403)."""


class NotFoundError(SwitchyardError):
    """not_found_error (404; 410 with code quote_expired for a quote deleted after it expired)."""


class ConflictError(SwitchyardError):
    """conflict_error: the object's state does not allow it, or capacity was taken (409)."""


class RateLimitError(SwitchyardError):
    """rate_limit_error (429); retry_after is in seconds."""

    retry_after: float | None = None


class PaymentError(SwitchyardError):
    """payment_error: balance or spend limit (402)."""


class ReservationEndedError(ConflictError):
    """Reservations.wait: the reservation ended (failed, cancelled, preempted, completed) before
    it reached the status waited for. `reservation` is the last one seen."""

    reservation: Any = None


class WaitTimeoutError(SwitchyardError):
    """Reservations.wait: the timeout passed first. `reservation` is the last one seen."""

    reservation: Any = None


_BY_TYPE: dict[str, type[SwitchyardError]] = {
    "invalid_request_error": InvalidRequestError,
    "authentication_error": AuthenticationError,
    "permission_error": PermissionDeniedError,
    "not_found_error": NotFoundError,
    "conflict_error": ConflictError,
    "rate_limit_error": RateLimitError,
    "payment_error": PaymentError,
    "api_error": APIError,
}


def error_from_response(
    status: int, body: Any, *, request_id: str | None = None, retry_after: str | None = None
) -> SwitchyardError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        # Not Switchyard's error body (a proxy's page): its status still says what it is.
        cls = RateLimitError if status == 429 else APIError
        exc = cls(f"HTTP {status}", status=status, body=body, request_id=request_id)
        if isinstance(exc, RateLimitError):
            exc.retry_after = _seconds(retry_after)
        return exc
    cls = _BY_TYPE.get(error.get("type", ""), APIError)
    exc = cls(
        error.get("message") or f"HTTP {status}",
        status=status,
        type=error.get("type"),
        code=error.get("code"),
        field=error.get("field"),
        body=body,
        request_id=request_id,
    )
    if isinstance(exc, RateLimitError):
        exc.retry_after = error.get("retry_after")
        if exc.retry_after is None:
            exc.retry_after = _seconds(retry_after)
    return exc


def _seconds(header: str | None) -> float | None:
    """A Retry-After header given in seconds (an HTTP date is left to the caller)."""
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None
