import sys

from django.contrib import admin
from django.http import JsonResponse
from django.middleware.csrf import REASON_NO_CSRF_COOKIE
from django.shortcuts import render
from django.urls import include, path, re_path
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.views import SpectacularAPIView

from config import api_docs, staff
from config.outages import outage_response
from marketplace.portal.login import StaffSignInForm

admin.site.site_header = "Switchyard staff console"
admin.site.site_title = "Switchyard staff"
admin.site.index_title = "Fleet, customers and money"
# Sign-in attempts limited as the portal's are (PORTAL_SIGN_IN_RATE, one budget for both).
admin.site.login_form = StaffSignInForm

urlpatterns = [
    # First: most requests are the API's, and Django tries the patterns in order.
    path("api/v1/", include("config.api_urls")),
    path("staff/", staff.dashboard, name="staff-dashboard"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", api_docs.LocalSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/schema/agent/", api_docs.agent_schema, name="api-schema-agent"),
    path("api/redoc/", api_docs.LocalRedocView.as_view(url_name="api-schema"), name="api-redoc"),
    # Any other URL under /api/v1/ (also with DEBUG on, where handler404 is not used): the
    # API's JSON error, never Django's HTML page (nor the CSRF refusal's, for a POST: like the
    # API's own views, this one changes nothing).
    re_path(r"^api/v1/", csrf_exempt(lambda request: _api_not_found(request))),
    path("billing/", include("billing.portal_urls")),
    path("", include("marketplace.portal.urls")),
]


def _api_not_found(request):
    return JsonResponse(
        {
            "error": {
                "type": "not_found_error",
                "code": "not_found",
                "field": None,
                "message": f"No such endpoint: {request.method} {request.path}",
            }
        },
        status=404,
    )


# Under /api/ even a URL that matches nothing, or a crash, answers in the API's error shape.
def handler404(request, exception):
    if request.path.startswith("/api/"):
        return _api_not_found(request)
    return defaults.page_not_found(request, exception)


def handler400(request, exception):
    # Django refuses some requests before any view runs (a query string or form over
    # DATA_UPLOAD_MAX_NUMBER_FIELDS, a Host not in ALLOWED_HOSTS): under /api/, in the error shape.
    if request.path.startswith("/api/"):
        code, message = _BAD_REQUESTS.get(
            type(exception).__name__, ("bad_request", "The request is malformed.")
        )
        return JsonResponse(
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": code,
                    "field": None,
                    "message": message,
                }
            },
            status=400,
        )
    return defaults.bad_request(request, exception)


_BAD_REQUESTS = {
    "TooManyFieldsSent": ("too_many_fields", "Too many query or form parameters."),
    "DisallowedHost": ("invalid_host", "The Host header names no host this server answers for."),
}


def handler500(request):
    # An outage raised outside a view (the session or user loaded in middleware) is a 503 too.
    outage = outage_response(request, sys.exc_info()[1])
    if outage is not None:
        return outage
    if request.path.startswith("/api/"):
        return JsonResponse(
            {
                "error": {
                    "type": "api_error",
                    "code": "internal_error",
                    "field": None,
                    "message": "Something went wrong on our side; it has been logged.",
                }
            },
            status=500,
        )
    return defaults.server_error(request)


def csrf_failure(request, reason=""):
    """A form Django refused for its CSRF token (CSRF_FAILURE_VIEW): most often one from a page
    opened before its visitor last signed in or out, here or in another tab. Nothing was done;
    the page says so and what to do, instead of Django's "CSRF verification failed"."""
    if request.path.startswith("/api/"):
        return JsonResponse(
            {
                "error": {
                    "type": "permission_error",
                    "code": "csrf_failed",
                    "field": None,
                    "message": "A browser session's request needs its CSRF token "
                    "(X-CSRFToken); API keys need none.",
                }
            },
            status=403,
        )
    return render(
        request,
        "csrf_failure.html",
        {"no_cookie": reason == REASON_NO_CSRF_COOKIE},
        status=403,
    )
