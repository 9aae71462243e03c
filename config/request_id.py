"""A request id on every response and on every log line written while the request ran.

An integrator quotes the `Request-Id` response header when something went wrong; support finds
the same id in the logs. A caller (or the proxy in front) may send its own `X-Request-Id`;
it is kept when it is a plain token of 8 to 64 characters, otherwise a new one is made.

A task enqueued while a request is served carries its id in the message headers (see
config/celery.py), and the worker runs the task under that id: one customer request can be
followed from the web log into every task it started.
"""

import contextvars
import logging
import re
import secrets

from django.core.signals import request_finished

__all__ = [
    "HEADER",
    "TASK_HEADER",
    "RequestIdLogFilter",
    "RequestIdMiddleware",
    "current_request_id",
    "request_id_bind",
    "request_id_unbind",
]

HEADER = "Request-Id"
# The Celery message header that carries the id of the request that enqueued a task.
TASK_HEADER = "request_id"
_INCOMING = "HTTP_X_REQUEST_ID"
_SAFE = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_current: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# The Celery task running in this context (name, id), for the log lines it writes.
_task: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("task", default=None)


def current_request_id() -> str:
    """The id of the request being served in this context, or "-" outside one."""
    return _current.get()


def request_id_bind(request_id: str | None, *, task: tuple[str, str] | None = None) -> tuple:
    """Run what follows under a request id that came from elsewhere (a task's headers);
    anything but a plain token is replaced by "-". Returns what request_id_unbind restores."""
    safe = request_id if request_id and _SAFE.match(request_id) else "-"
    return _current.set(safe), _task.set(task)


def request_id_unbind(tokens: tuple) -> None:
    current, task = tokens
    _current.reset(current)
    _task.reset(task)


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
    """Gives every record a `request_id` attribute for the log format, and in a Celery task
    its `task` name and `task_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _current.get()
        task = _task.get()
        if task is not None:
            record.task, record.task_id = task
        return True
