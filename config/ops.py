"""The operations endpoints: /healthz, /readyz (config/health.py) and /metrics
(config/metrics/). They are answered before host validation, the HTTPS redirect, sessions,
authentication and throttling: a load balancer probes by address rather than by one of
ALLOWED_HOSTS' names, and Prometheus scrapes each process directly over plain HTTP. /metrics
has its own protection (a bearer token or an address allow-list).
"""

from config import health
from config.metrics import views as metrics_views

_ENDPOINTS = {
    "/healthz": health.healthz,
    "/readyz": health.readyz,
    "/metrics": metrics_views.metrics,
}


class OpsEndpointsMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        endpoint = _ENDPOINTS.get(request.path_info)
        if endpoint is None or request.method not in ("GET", "HEAD"):
            return self.get_response(request)
        response = endpoint(request)
        response["Cache-Control"] = "no-store"
        return response
