"""Refuse input PostgreSQL cannot store, before any view sees it.

PostgreSQL refuses NUL (0x00) in text and jsonb, and lone UTF-16 surrogates cannot be encoded
for it at all; a deeply nested JSON body exhausts Python's recursion while being parsed. Left
to the views, each would be a 500 wherever such a value reaches a query. So one middleware
looks at every request's path, query string, form fields and JSON body and answers 400 (in the
API's error shape under /api/) when any of them carries such a value. Everything after it may
assume its strings are storable and its JSON is at most MAX_JSON_DEPTH deep.
"""

import json
import re

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, ValidationError
from django.http import HttpResponseBadRequest, JsonResponse
from django.utils.html import escape

from config.api.errors import error_body

__all__ = ["InputGuardMiddleware", "MAX_JSON_DEPTH", "unstorable"]

# Deeper than any request body the API documents (a reservation's workload is 3 levels).
MAX_JSON_DEPTH = 32
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
# A bad value in the cursor parameter is a bad cursor, as the pagination says.
_CODE_BY_PARAM = {"cursor": "invalid_cursor"}


def unstorable(text: str) -> bool:
    """Whether PostgreSQL would refuse this string (a NUL, or a lone surrogate)."""
    return _UNSTORABLE.search(text) is not None


class _Refused(Exception):
    def __init__(self, code: str, message: str, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.field, self.status = code, message, field, status


class InputGuardMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        try:
            _check(request)
        except _Refused as refused:
            return _refusal(request, refused)
        return self.get_response(request)

    def process_view(self, request, view_func, view_args, view_kwargs):
        # Django's admin filters by an action's selection without checking it: a forged
        # `_selected_action` of "abc" or "1.5" reached pk__in, a 500 on every list with an
        # action. Each is read as the model's primary key first.
        model_admin = getattr(view_func, "model_admin", None)
        if model_admin is None or request.method != "POST":
            return None
        pk = model_admin.model._meta.pk
        for value in request.POST.getlist("_selected_action"):
            try:
                pk.to_python(value)
            except ValidationError:
                return _refusal(
                    request,
                    _Refused(
                        "invalid", f"{value[:40]!r} selects no {pk.model._meta.verbose_name}."
                    ),
                )
        return None


def _check(request) -> None:
    if unstorable(request.path_info):
        raise _Refused("invalid_characters", "The URL contains a NUL or an invalid character.")
    for name, values in request.GET.lists():
        for text in (name, *values):
            if unstorable(text):
                raise _Refused(
                    _CODE_BY_PARAM.get(name, "invalid_characters"),
                    f"The query parameter {name!r} contains a NUL or an invalid character.",
                    field=name if not unstorable(name) else None,
                )
    content_type = request.content_type or ""
    if not content_type.startswith("multipart/") and _declared_too_large(request):
        # Said before it is read, whatever its type: a view that reads the body itself (a
        # signed webhook) would otherwise meet Django's RequestDataTooBig, a bare 400.
        # Multipart bodies' files do not count against the limit (Django's rule).
        raise _too_large()
    if "*" in content_type:
        # A body's type is named, never a pattern: DRF would read */* or application/* as
        # JSON, past the checks below.
        raise _Refused(
            "unsupported_media_type",
            "Name the body's type (application/json), not a pattern such as */*.",
            status=415,
        )
    if content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        # The body is read first, so the views (and the idempotency fingerprint) can still
        # read it after the form is parsed from it.
        for name, values in _body(request, lambda r: (r.body, r.POST)[1]).lists():
            for text in (name, *values):
                if unstorable(text):
                    raise _Refused(
                        "invalid_characters",
                        "A form field contains a NUL or an invalid character.",
                        field=name if not unstorable(name) else None,
                    )
    elif content_type == "application/json" or content_type.endswith("+json"):
        _check_json(_body(request, lambda r: r.body))


def _too_large() -> _Refused:
    return _Refused(
        "request_too_large",
        f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.",
        status=413,
    )


def _declared_too_large(request) -> bool:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return False
    return limit is not None and declared > limit


def _body(request, read):
    try:
        return read(request)
    except RequestDataTooBig:
        raise _too_large() from None


# In JSON text a NUL or a surrogate can only be written as such an escape: the raw characters
# are refused by any JSON parser (a control character in a string, invalid UTF-8).
_UNSTORABLE_ESCAPE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")


def _plainly_fine(body: bytes) -> bool:
    """A body that needs no parsing to be known storable and shallow enough: UTF-8 (no NUL
    byte, which UTF-16 and UTF-32 text always has), no escape of a NUL or a surrogate, and
    fewer brackets than the depth allowed (every level of nesting opens one). Most bodies are
    such; anything else is parsed and walked below."""
    return (
        b"\x00" not in body
        and body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH
        and _UNSTORABLE_ESCAPE.search(body) is None
    )


def _check_json(body: bytes) -> None:
    if _plainly_fine(body):
        return
    try:
        value = json.loads(body)
    except RecursionError:
        raise _Refused(
            "too_deeply_nested", f"JSON nested deeper than {MAX_JSON_DEPTH} levels."
        ) from None
    except ValueError:  # not JSON, or not UTF-8: the parser says so, with its own message
        return
    stack: list[tuple[object, str | None, int]] = [(value, None, 1)]
    while stack:
        item, field, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _Refused("too_deeply_nested", f"JSON nested deeper than {MAX_JSON_DEPTH} levels.")
        if isinstance(item, dict):
            for key, child in item.items():
                if unstorable(key):
                    raise _Refused(
                        "invalid_characters",
                        "A JSON key contains a NUL or an invalid character.",
                        field=field,
                    )
                stack.append((child, f"{field}.{key}" if field else key, depth + 1))
        elif isinstance(item, list):
            for index, child in enumerate(item):
                stack.append((child, f"{field}.{index}" if field else str(index), depth + 1))
        elif isinstance(item, str) and unstorable(item):
            raise _Refused(
                "invalid_characters",
                "A JSON string contains a NUL (\\u0000) or an unpaired surrogate.",
                field=field,
            )


def _refusal(request, refused: _Refused):
    if request.path_info.startswith("/api/"):
        return JsonResponse(
            error_body(
                type="invalid_request_error",
                code=refused.code,
                field=refused.field,
                message=refused.message,
            ),
            status=refused.status,
        )
    response = HttpResponseBadRequest(
        "<!doctype html><title>Bad request</title><h1>Bad request</h1>"
        f"<p>{escape(refused.message)}</p>"
    )
    response.status_code = refused.status
    return response
