"""PostgreSQL unreachable: 503 with Retry-After, never a 500.

A lost or refused database connection (OperationalError, InterfaceError) is an outage, not a
bug: the caller should retry shortly, and says so in the one error shape under /api/. Other
database errors (integrity, data, programming) are still bugs and stay 500s. The middleware
answers for exceptions from views; config.urls.handler500 asks `outage_response` for those
raised in other middleware (the session or the user, loaded from the database).
"""

import logging

from django.db import InterfaceError, OperationalError
from django.http import HttpResponse, JsonResponse

from config.api.errors import error_body

__all__ = ["DatabaseOutageMiddleware", "outage_response", "RETRY_AFTER_SECONDS"]

logger = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 5
_OUTAGES = (OperationalError, InterfaceError)


def outage_response(request, exc: BaseException | None) -> HttpResponse | None:
    """The 503 for a database outage, or None if `exc` is not one."""
    if not isinstance(exc, _OUTAGES):
        return None
    logger.error("database unavailable: %s", " ".join(str(exc).split())[:300])
    message = "The service is briefly unavailable; retry after the time in Retry-After."
    if request.path.startswith("/api/"):
        response = JsonResponse(
            error_body(type="api_error", code="service_unavailable", message=message), status=503
        )
    else:
        response = HttpResponse(
            "<!doctype html><title>Briefly unavailable</title><h1>Briefly unavailable</h1>"
            f"<p>{message.replace('after the time in Retry-After', 'in a few seconds')}</p>",
            status=503,
        )
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    return response


class DatabaseOutageMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        return self.get_response(request)

    def process_exception(self, request, exc):
        return outage_response(request, exc)
