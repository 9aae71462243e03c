"""A request id on every response and on every log line written while the request ran.

An integrator quotes the `Request-Id` response header when something went wrong; support finds
the same id in the logs. A caller (or the proxy in front) may send its own `X-Request-Id`;
it is kept when it is a plain token of 8 to 64 characters, otherwise a new one is made.
"""

import contextvars
import logging
import re
import secrets

from django.core.signals import request_finished

__all__ = ["RequestIdMiddleware", "RequestIdLogFilter", "current_request_id", "HEADER"]

HEADER = "Request-Id"
_INCOMING = "HTTP_X_REQUEST_ID"
_SAFE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def current_request_id() -> str:
    """The id of the request being served in this context, or "-" outside one."""
    return _current.get()


class RequestIdMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.META.get(_INCOMING, "")
        request_id = incoming if _SAFE.match(incoming) else f"req_{secrets.token_hex(12)}"
        request.request_id = request_id
        # Kept until the response is closed (request_finished), not only while the views run:
        # Django logs 4xx and 5xx responses after the middleware has returned.
        _current.set(request_id)
        response = self.get_response(request)
        response[HEADER] = request_id
        return response


def _request_finished(**_kwargs) -> None:
    _current.set("-")


request_finished.connect(_request_finished, dispatch_uid="config.request_id.finished")


class RequestIdLogFilter(logging.Filter):
    """Gives every record a `request_id` attribute for the log format."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get()
        return True
